"""Export: round trip to bit-identical params (Llama and Llamba), sharding, tokenizer ids, atomic and refusing
output directories."""

import json
import os

import jax
import numpy as np
import pytest
import sentencepiece as spm
import torch
from safetensors import safe_open
from tokenizers import Tokenizer
from transformers import AutoTokenizer, LlamaForCausalLM

from bridge.hf_export import write_params
from bridge.checkpoint import load_checkpoint
from bridge.tokenizer_export import export_tokenizer
from kept_jax import corpus
from kept_jax.models import config_from_hf
from kept_jax.errors import KeptError
from kept_jax.fileio import atomic_file, atomic_output_dir
from kept_jax.models import build_model, init_params
from tests import fixtures as fx

TOKENS = np.random.default_rng(9).integers(0, 512, size=(1, 20))


def _llama_config(**kw):
    return config_from_hf({**fx.base_config("tiny-llama"), "attention_bias": True, "mlp_bias": True}, **kw)


@pytest.mark.parametrize("arch, dtype, scan_layers", [
    ("llama", "float32", True), ("llama", "float32", False), ("llama", "bfloat16", True), ("llama", "bfloat16", False),
    ("llamba", "float32", True), ("llamba", "bfloat16", False),
])
def test_round_trip_is_bit_identical(tmp_path, arch, dtype, scan_layers):
    runtime = dict(param_dtype=dtype, scan_layers=scan_layers)
    config = (_llama_config(**runtime) if arch == "llama"
              else config_from_hf(fx.base_config("tiny-llamba"), **runtime))
    params = init_params(config, jax.random.key(0))
    write_params(str(tmp_path), params, config, dtype)
    loaded_config, loaded, _ = load_checkpoint(tmp_path, param_dtype=dtype, scan_layers=scan_layers)
    assert loaded_config.replace(dtype=config.dtype) == config
    assert jax.tree.structure(loaded) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(loaded)):
        assert a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b))
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["model_type"] == arch if arch == "llama" else "model_type" not in written  # known by its layout
    assert os.listdir(tmp_path).count("model.safetensors") == 1


def test_sharded_export_loads_in_transformers(tmp_path):
    config = _llama_config()
    params = init_params(config, jax.random.key(1))
    files = write_params(str(tmp_path), params, config, "float32", max_shard_bytes=100_000)
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    with open(tmp_path / "model.safetensors.index.json") as f:
        index = json.load(f)
    assert sorted(set(index["weight_map"].values())) == files
    with safe_open(str(tmp_path / files[0]), framework="numpy") as f:
        assert f.metadata() == {"format": "pt"}
    hf = LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ours = np.asarray(build_model(config).apply({"params": params}, TOKENS))
    np.testing.assert_allclose(fx.torch_logits(hf, TOKENS).numpy(), ours, atol=1e-4, rtol=0)
    hf_config = json.loads((tmp_path / "config.json").read_text())
    assert hf_config["model_type"] == "llama" and hf_config["architectures"] == ["LlamaForCausalLM"]


def test_rope_settings_survive_in_both_forms(tmp_path):
    """A LongChat-like export: Transformers reads the same theta and scaling from config.json."""
    hf = {**fx.base_config("tiny-llama"), "rope_theta": 5e7,
          "rope_scaling": {"rope_type": "linear", "factor": 2.0}}
    config = config_from_hf(hf)
    params = init_params(config, jax.random.key(2))
    write_params(str(tmp_path), params, config, "float32")
    model = LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert model.config.rope_parameters["rope_theta"] == 5e7 and model.config.rope_parameters["factor"] == 2.0
    ours = np.asarray(build_model(config).apply({"params": params}, TOKENS))
    np.testing.assert_allclose(fx.torch_logits(model, TOKENS).numpy(), ours, atol=1e-4, rtol=0)


def test_tokenizer_ids_match_the_source(tmp_path, sp_model):
    source = tmp_path / "source"
    source.mkdir()
    fx.add_orion_tokenizer(str(source), sp_model)
    out = tmp_path / "out"
    out.mkdir()
    export_tokenizer(str(source), str(out), "orion")
    assert {"tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"} <= set(os.listdir(out))
    assert json.loads((out / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    sp = spm.SentencePieceProcessor(model_file=sp_model)
    auto = AutoTokenizer.from_pretrained(out)
    raw = Tokenizer.from_file(str(out / "tokenizer.json"))
    samples = [d[:3000] for d in corpus.read_documents(corpus.HELDOUT)[:4]]
    samples += ["café ünïcödé 日本語 🙂", "two  spaces\n\n\ttab ", "x = 1234567.89"]
    for text in samples:
        assert auto.decode(auto(text).input_ids) == text
    for text in samples + [" leading space", "  two leading"]:  # Transformers v5's LlamaTokenizer differed here
        assert raw.encode(text).ids == auto(text).input_ids == sp.encode(text), text[:40]


@pytest.mark.parametrize("normalization, remove_extra_whitespaces", [("nmt_nfkc", True), ("identity", True),
                                                                     ("nfkc", False)])
def test_normalizing_sentencepiece_models_are_reproduced(tmp_path, normalization, remove_extra_whitespaces):
    """The normalizer spec (NFKC character map, extra whitespace removal) is reproduced, as Transformers' own
    SentencePiece converters do, and verified (bridge.tokenizer_export.check_tokenizer) through tokenizers and
    AutoTokenizer; it used to be refused as 'a normalization kept_jax cannot convert'."""
    from bridge.tokenizer_export import TOKENIZER_PROBES, check_tokenizer

    source = tmp_path / "source"
    source.mkdir()
    fx.add_orion_tokenizer(str(source), fx.train_sentencepiece(str(tmp_path / "sp"), 512, normalization,
                                                               remove_extra_whitespaces))
    out = tmp_path / "out"
    out.mkdir()
    export_tokenizer(str(source), str(out), "orion")
    check_tokenizer(str(source), str(out))
    sp = spm.SentencePieceProcessor(model_file=str(source / "tokenizer.model"))
    auto = AutoTokenizer.from_pretrained(out)
    for text in TOKENIZER_PROBES:
        assert auto(text).input_ids == sp.encode(text), text
    if normalization != "identity":
        assert sp.encode("ｆｕｌｌ") == sp.encode("full")  # the character map is really in use

    # A pipeline that drops part of the normalizer is caught, and the message names the text and the ids.
    config = json.loads((out / "tokenizer.json").read_text())
    config["normalizer"]["normalizers"] = config["normalizer"]["normalizers"][1:]
    (out / "tokenizer.json").write_text(json.dumps(config))
    with pytest.raises(KeptError, match=r"on '.*' the source gives \[.*\] and tokenizer.json gives \[.*\] from token"):
        check_tokenizer(str(source), str(out))


def test_output_directory_is_refused_unless_forced_and_never_partial(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("{}")  # an earlier export
    with pytest.raises(KeptError, match="exists and is not empty"):
        with atomic_output_dir(str(out), force=False):
            pass
    with pytest.raises(RuntimeError):
        with atomic_output_dir(str(out), force=True) as tmp:
            (open(os.path.join(tmp, "half.safetensors"), "w")).write("partial")
            raise RuntimeError("interrupted")
    assert os.listdir(out) == ["config.json"]
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no temporary directory left behind
    with atomic_output_dir(str(out), force=True) as tmp:
        (open(os.path.join(tmp, "model.safetensors"), "w")).write("new")
    assert os.listdir(out) == ["model.safetensors"]
    assert sorted(os.listdir(tmp_path)) == ["out"]
    (out / "keep.txt").write_text("mine")  # a file kept_jax did not write: --force refuses, and keeps it
    with pytest.raises(KeptError, match="--force replaces only what kept_jax wrote.*keep.txt"):
        with atomic_output_dir(str(out), force=True):
            pass
    assert sorted(os.listdir(out)) == ["keep.txt", "model.safetensors"]


def test_atomic_file_replaces_whole_or_not_at_all(tmp_path):
    path = tmp_path / "summary.json"
    path.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_file(str(path)) as f:
            f.write("half")
            raise RuntimeError("stopped mid-write")
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["summary.json"]
    with atomic_file(str(path)) as f:
        f.write("new")
    umask = os.umask(0)
    os.umask(umask)
    assert path.read_text() == "new" and os.listdir(tmp_path) == ["summary.json"]
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask
