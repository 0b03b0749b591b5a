"""`python -m kept_jax.score`: logits through the CLI match Transformers; text uses the checkpoint's tokenizer."""

import contextlib
import io
import os
import re

import numpy as np
import pytest
import sentencepiece as spm
from transformers import AutoTokenizer

from kept_jax import score
from tests import fixtures as fx

TEXT = "Return a new dictionary with the keys and values of the given mapping."


def _cli(*args):
    """`python -m kept_jax.score ARGS`, run in this process (its main is the command line); returns the stdout."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert score.main(list(args)) == 0
    return out.getvalue()


@pytest.mark.parametrize("which", ["orion", "llama"])
def test_cli_logits_match_transformers(which, orion_checkpoint, llama_checkpoint, tmp_path):
    path, torch_model = orion_checkpoint if which == "orion" else llama_checkpoint
    tokens = np.random.default_rng(3).integers(0, 512, size=40)
    out = tmp_path / "logits.npy"
    stdout = _cli("--model", path, "--tokens", ",".join(map(str, tokens)), "--save-logits", str(out))
    ours = np.load(out)
    ref = fx.torch_logits(torch_model, tokens[None])[0].numpy()
    assert ours.shape == (40, 512) and ours.dtype == np.float32
    np.testing.assert_array_less(np.abs(ours - ref).max(), 1e-4)
    np.testing.assert_array_equal(ours.argmax(-1), ref.argmax(-1))
    # The printed NLL is the mean next-token NLL of these logits.
    log_probs = ref - np.log(np.exp(ref - ref.max(-1, keepdims=True)).sum(-1, keepdims=True)) - ref.max(-1, keepdims=True)
    nll = -np.mean(log_probs[np.arange(39), tokens[1:]])
    printed = float(re.search(r"mean NLL:\s+([0-9.]+)", stdout).group(1))
    assert abs(printed - nll) < 1e-4
    assert f"perplexity: {np.exp(printed):.4f}"[:16] in stdout
    assert "tokens:     40 (39 predicted)" in stdout


def test_text_uses_orion_sentencepiece(orion_checkpoint, sp_model, tmp_path):
    path, _ = orion_checkpoint
    ids = spm.SentencePieceProcessor(model_file=sp_model).encode(TEXT)  # Orion: no BOS
    text_file = tmp_path / "in.txt"
    text_file.write_text(TEXT, encoding="utf-8")
    for args in (["--text", TEXT], ["--file", str(text_file)]):
        assert f"tokens:     {len(ids)} (" in _cli("--model", path, *args)
    by_ids = _cli("--model", path, "--tokens", ",".join(map(str, ids)))
    assert by_ids.splitlines()[2:] == _cli("--model", path, "--text", TEXT).splitlines()[2:]


def test_text_uses_llama_tokenizer_json(llama_checkpoint):
    path, _ = llama_checkpoint
    ids = AutoTokenizer.from_pretrained(path)(TEXT).input_ids
    assert len(ids) > 5
    by_text = _cli("--model", path, "--text", TEXT)
    by_ids = _cli("--model", path, "--tokens", ",".join(map(str, ids)))
    assert by_text.splitlines()[1:] == by_ids.splitlines()[1:]


def test_bfloat16_runs(orion_checkpoint):
    assert "bfloat16" in _cli("--model", orion_checkpoint[0], "--tokens", "1,2,3,4", "--dtype", "bfloat16")


def _fails(argv, capsys, tmp_path=None):
    assert score.main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("error: ")
    return err


def test_user_errors(orion_checkpoint, tmp_path, capsys):
    path, _ = orion_checkpoint
    assert "at least 2 tokens" in _fails(["--model", path, "--tokens", "7"], capsys)
    assert "outside the model's vocabulary [0, 512)" in _fails(["--model", path, "--tokens", "1,512"], capsys)
    assert "comma-separated integers" in _fails(["--model", path, "--tokens", "1,x"], capsys)
    assert "does not exist" in _fails(["--model", path, "--file", str(tmp_path / "none.txt")], capsys)
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("café".encode("latin-1"))
    assert "not UTF-8" in _fails(["--model", path, "--file", str(latin1)], capsys)
    missing_dir = str(tmp_path / "no" / "x.npy")
    assert "does not exist" in _fails(["--model", path, "--tokens", "1,2", "--save-logits", missing_dir], capsys)


def test_no_tokenizer(orion_copy, capsys):
    os.remove(os.path.join(orion_copy, "tokenizer.model"))
    assert "has no tokenizer" in _fails(["--model", orion_copy, "--text", "hello"], capsys)


def test_existing_output_needs_force(orion_checkpoint, tmp_path, capsys):
    out = tmp_path / "logits.npy"
    out.write_bytes(b"keep me")
    args = ["--model", orion_checkpoint[0], "--tokens", "1,2,3", "--save-logits", str(out)]
    assert "already exists" in _fails(args, capsys)
    assert out.read_bytes() == b"keep me"
    assert score.main(args + ["--force"]) == 0
    assert np.load(out).shape == (3, 512)
