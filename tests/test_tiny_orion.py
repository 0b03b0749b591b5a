"""The embedded tiny Orion: layout and size, what its log claims, and a reproducible pretraining script."""

import hashlib
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import sentencepiece as spm

from bridge.checkpoint import load_checkpoint
from kept_jax import corpus, pretrain
from kept_jax.models import build_model

ASSET = os.path.join(os.path.dirname(pretrain.__file__), "assets", "tiny-orion")


@pytest.fixture(scope="module")
def asset():
    config, params, _ = load_checkpoint(ASSET)
    with open(os.path.join(ASSET, "pretrain_log.json")) as f:
        log = json.load(f)
    return config, params, log


def test_layout_and_size(asset):
    files = sorted(os.listdir(ASSET))
    assert files == ["config.json", "model.safetensors", "pretrain_log.json", "tokenizer.model", "tokenizer_config.json"]
    assert sum(os.path.getsize(os.path.join(ASSET, f)) for f in files) <= 10 * 2**20
    config, _, _ = asset
    assert config.architecture == "orion" and config.dtype == "bfloat16"
    assert json.load(open(os.path.join(ASSET, "tokenizer_config.json")))["add_bos_token"] is False


def test_advertised_context_is_the_one_it_was_trained_on(asset):
    """Outside tools take the window from config.json: past the pretraining length the NLL rises (1.9 -> 3.2)."""
    config, _, log = asset
    assert config.max_position_embeddings == log["args"]["seq_len"] == log["config"]["max_position_embeddings"]


def _heldout_rows(seq_len=256):
    sp = spm.SentencePieceProcessor(model_file=os.path.join(ASSET, "tokenizer.model"))
    return corpus.token_rows(corpus.HELDOUT, sp.encode, seq_len, sp.eos_id())


def test_heldout_perplexity_is_what_the_log_says(asset):
    config, params, log = asset
    model = build_model(config)
    rows = _heldout_rows()

    @jax.jit
    def nll(tokens):
        logp = jax.nn.log_softmax(model.apply({"params": params}, tokens)[:, :-1])
        return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], -1))

    measured = float(sum(nll(rows[i : i + 16]) * len(rows[i : i + 16]) for i in range(0, len(rows), 16)) / len(rows))
    assert measured == pytest.approx(log["heldout_nll"], abs=0.02)  # the log measured the fp32 weights
    assert math.exp(measured) < 10  # a trained model, not random weights (random: ~2048)


def test_norm_biases_and_residual_means_are_not_trivial(asset):
    """What makes the OPM strategies distinguishable on this teacher (sizes are reported in docs/kept.md)."""
    config, params, _ = asset
    layers = params["model"]["layers"]
    betas = [np.asarray(layers[s]["bias"], np.float32) for s in ("input_layernorm", "post_attention_layernorm")]
    betas.append(np.asarray(params["model"]["norm"]["bias"], np.float32)[None])
    assert min(float(np.sqrt((b**2).mean())) for b in betas) > 0.02
    inputs, _ = build_model(config).apply({"params": params}, jnp.asarray(_heldout_rows()[:4]), method="norm_inputs",
                                       mutable="intermediates")
    ratios = [float(jnp.mean(jnp.abs(x.mean(-1)) / jnp.sqrt((x.astype(jnp.float32) ** 2).mean(-1)))) for x in inputs.values()]
    assert max(ratios) > 0.05


def _digest(path):
    return {f: hashlib.sha256(open(os.path.join(path, f), "rb").read()).hexdigest()
            for f in ("model.safetensors", "tokenizer.model")}


def test_pretraining_is_reproducible(tmp_path):
    args = ["--steps", "3", "--batch", "2", "--seq-len", "64", "--eval-tokens", "2048", "--warmup", "1", "--seed", "7"]
    assert pretrain.main(args + ["--out", str(tmp_path / "a")]) == 0
    assert pretrain.main(args + ["--out", str(tmp_path / "b")]) == 0
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert json.load(open(tmp_path / "a" / "config.json"))["max_position_embeddings"] == 64  # --seq-len
    assert json.load(open(tmp_path / "a" / "pretrain_log.json"))["heldout_tokens"] == 32 * 63  # --eval-tokens: 32 rows
    assert pretrain.main(args[:-1] + ["8", "--out", str(tmp_path / "c")]) == 0
    assert _digest(tmp_path / "c")["model.safetensors"] != _digest(tmp_path / "a")["model.safetensors"]


def test_too_few_eval_tokens_are_refused_before_any_work(tmp_path, capsys):
    assert pretrain.main(["--seq-len", "64", "--eval-tokens", "63", "--out", str(tmp_path / "a")]) == 2
    assert "--eval-tokens 63 is less than one row of --seq-len 64" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_sigterm_leaves_no_partial_output(tmp_path):
    """A job stopped by SIGTERM exits 130 and removes its temporary directory; the output never appears."""
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "kept_jax.pretrain", "--steps", "100000", "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not any(p.name.startswith(".run.tmp-") for p in tmp_path.iterdir()):
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read() if proc.poll() is not None else "timeout"
        time.sleep(0.2)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert list(tmp_path.iterdir()) == []
