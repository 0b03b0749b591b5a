"""`python -m kept_jax.convert` and `python -m bridge.verify` as a user runs them, on the embedded tiny Orion."""

import json
import os

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from bridge import verify
from kept_jax import convert
from tests import fixtures as fx

@pytest.fixture(scope="module")
def exported(kept_export):
    return kept_export


def test_convert_prints_the_report_and_exports_a_stock_llama(exported):
    out, stdout = exported
    assert "absorb" in stdout and "KL(t||c)" in stdout and "rank-1 absorb of input_layernorm beta" in stdout
    report = json.load(open(os.path.join(out, "conversion_report.json")))
    assert report["dtype"] == "bfloat16" and set(report["strategies"]) == {"absorb"}
    hf = json.load(open(os.path.join(out, "config.json")))
    assert hf["model_type"] == "llama" and not hf["attention_bias"] and not hf["mlp_bias"]
    tokenizer = AutoTokenizer.from_pretrained(out, trust_remote_code=False)
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=False)
    prompt = tokenizer("Return a new list of", return_tensors="pt")
    generated = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert generated.shape[1] == prompt.input_ids.shape[1] + 8


def test_verify_passes_and_fails_past_its_tolerance(exported, capsys):
    out, _ = exported
    source = convert.DEFAULT_SOURCE
    assert verify.main(["--hf", out, "--reference", source, "--tokens", "512"]) == 0
    printed = capsys.readouterr().out
    assert "max-abs logit error" in printed and "KL(teacher || exported)" in printed and "verified" in printed
    assert verify.main(["--hf", out, "--reference", source, "--tokens", "512", "--max-reference-kl", "1e-12"]) == 2
    assert "verification failed" in capsys.readouterr().err


def test_verify_on_an_orion_directory_says_to_convert_it_first(capsys):
    assert verify.main(["--hf", convert.DEFAULT_SOURCE]) == 2
    err = capsys.readouterr().err
    assert "is an Orion checkpoint" in err and "convert it first" in err and "pip install" not in err


def test_verify_fails_when_transformers_and_kept_jax_disagree(exported, monkeypatch, capsys):
    """A kept_jax side that is off by a small logit bias on one word must fail the check."""
    real = verify._kept_jax_logits

    def shifted(model_dir, rows):
        logits = real(model_dir, rows)
        logits[..., 5] += 0.01
        return logits

    monkeypatch.setattr(verify, "_kept_jax_logits", shifted)
    assert verify.main(["--hf", exported[0], "--tokens", "256"]) == 2
    assert "max-abs error" in capsys.readouterr().err


def _fails(argv, capsys):
    assert convert.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    return err


def test_convert_user_errors(tmp_path, capsys, llama_checkpoint):
    out = str(tmp_path / "out")
    assert "does not exist" in _fails(["--source", str(tmp_path / "none"), "--out", out], capsys)
    assert "--opm applies to an Orion source; " in _fails(["--source", llama_checkpoint[0], "--out", out, "--opm", "lsq"],
                                                          capsys)
    os.makedirs(out)
    open(os.path.join(out, "x"), "w").close()
    assert "exists and is not empty" in _fails(["--out", out], capsys)
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    assert "holds no text" in _fails(["--out", str(tmp_path / "o2"), "--calib", str(empty)], capsys)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"body": "no text field"}\n')
    assert "bad.jsonl:2: no string field 'text' (found: body)" in _fails(
        ["--out", str(tmp_path / "o3"), "--calib", str(bad)], capsys)
    assert "must be positive" in _fails(["--out", str(tmp_path / "o4"), "--calib-tokens", "0"], capsys)
    assert not os.path.exists(tmp_path / "o2") and not os.path.exists(tmp_path / "o3")


def test_the_kept_export_teaches_a_llamba(exported, tmp_path):
    """Orion -> Llama (KEPT) -> Llamba: the Llama this project exports is a teacher like any other."""
    from bridge.checkpoint import load_checkpoint

    out = str(tmp_path / "llamba")
    assert convert.main(["--to", "llamba", "--source", exported[0], "--out", out, "--eval-tokens", "1024"]) == 0
    config, _, _ = load_checkpoint(out)
    teacher = json.load(open(os.path.join(exported[0], "config.json")))
    assert config.architecture == "llamba" and config.padded_vocab_size == teacher["vocab_size"] == 2048
    assert (config.n_v_heads, config.head_dim, config.num_hidden_layers) == (3, 64, 4)
    report = json.load(open(os.path.join(out, "conversion_report.json")))
    assert report["dtype"] == "bfloat16" and 0 < report["strategies"]["mohawk"]["kl"] < 20


def test_llamba_conversion_user_errors(tmp_path, capsys, llama_checkpoint):
    out = str(tmp_path / "out")
    llama = llama_checkpoint[0]
    assert "--source must be a Llama checkpoint; " in _fails(["--to", "llamba", "--out", out], capsys)
    assert "--opm does not apply to --to llamba" in _fails(["--to", "llamba", "--source", llama, "--out", out,
                                                            "--opm", "exact"], capsys)
    assert "the student's d_model is 2048 but the teacher's is 64" in _fails(
        ["--to", "llamba", "--source", llama, "--out", out, "--target-config",
         os.path.join(fx.MODEL_CONFIGS, "llamba-1b.json")], capsys)
    wrong = tmp_path / "llamba.json"
    wrong.write_text(json.dumps({"model_type": "llamba", "vocab_size": 512, "d_model": 64, "n_layer": 2,
                                 "mlp_cfg": {"intermediate_size": 160}, "ssm_cfg": {"n_v_heads": 4, "n_qk_heads": 4}}))
    assert "--mixer-init attention reads q/k/v/o as they are, so the student needs d_state=16 (not 64)" in _fails(
        ["--to", "llamba", "--source", llama, "--out", out, "--target-config", str(wrong), "--mixer-init", "attention"],
        capsys)
    assert not os.path.exists(out)


def test_a_source_without_tokenizer_converts_from_token_id_files(tmp_path, capsys):
    """Calibration and evaluation from .npy token ids give the same weights as from the same text; the export has
    no tokenizer files and says so; without ids the message names the flags that exist."""
    import shutil

    import numpy as np
    import sentencepiece as spm

    from kept_jax import corpus

    source = tmp_path / "orion"
    shutil.copytree(convert.DEFAULT_SOURCE, source, ignore=shutil.ignore_patterns("tokenizer*"))
    common = ["--source", str(source), "--seq-len", "64", "--calib-tokens", "1024", "--eval-tokens", "1024",
              "--dtype", "float32"]
    err = _fails(common + ["--out", str(tmp_path / "none")], capsys)
    assert "--calib-ids" in err and "--eval-ids" in err and "--tokens" not in err

    sp = spm.SentencePieceProcessor(model_file=os.path.join(convert.DEFAULT_SOURCE, "tokenizer.model"))
    ids = corpus.token_rows(corpus.HELDOUT, sp.encode, 64, sp.eos_id())  # what the text path reads
    np.save(tmp_path / "ids.npy", ids.reshape(-1).astype(np.int64))
    from_text = ["--source", convert.DEFAULT_SOURCE] + common[2:] + ["--no-eval", "--out", str(tmp_path / "text")]
    assert convert.main(from_text) == 0
    assert convert.main(common + ["--calib-ids", str(tmp_path / "ids.npy"), "--eval-ids", str(tmp_path / "ids.npy"),
                                  "--out", str(tmp_path / "ids")]) == 0
    out = capsys.readouterr().out
    assert "note: no tokenizer" in out
    report = json.load(open(tmp_path / "ids" / "conversion_report.json"))
    assert report["tokenizer_note"].startswith("no tokenizer") and report["strategies"]["absorb"]["kl"] > 0
    assert report["evaluation"]["skipped_calibration_rows"] == 16  # the same file: evaluation starts after them
    assert not [n for n in os.listdir(tmp_path / "ids") if n.startswith("tokenizer") or n == "special_tokens_map.json"]
    weights = [open(tmp_path / run / "model.safetensors", "rb").read() for run in ("text", "ids")]
    assert weights[0] == weights[1]

    np.save(tmp_path / "far.npy", np.asarray([0, 5, 999999]))
    err = _fails(common + ["--calib-ids", str(tmp_path / "far.npy"), "--no-eval", "--out", str(tmp_path / "x")], capsys)
    assert "outside the source's vocabulary" in err
    err = _fails(common + ["--calib-ids", str(tmp_path / "missing.npy"), "--no-eval", "--out", str(tmp_path / "x")],
                 capsys)
    assert "does not exist" in err
