"""What a careless user breaks (issue 39): each case is one line on stderr, exit code 2, before any work, nothing
half-written, and what a killed run left is removed by the next one."""

import os
import subprocess
import sys

import pytest

from bridge import gguf_import
from kept_jax import convert
from kept_jax.fileio import sweep_leftovers
from tests.test_gguf import gguf_files, vocabs  # noqa: F401  (module fixtures)


def _dead_pid() -> int:
    """The pid of a process that has ended (a killed writer's)."""
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                           check=True)
    return int(child.stdout)


def test_a_killed_exports_leftover_is_removed_by_the_next_run(gguf_files, tmp_path, capsys):  # noqa: F811
    """`convert --out NAME` killed during its export leaves `.NAME.tmp-*` (152 MB for SmolLM2): the next run removes
    it and says so; a leftover of a live run, or another output's, stays. (And the mapping is not 272 rows.)"""
    out = tmp_path / "tiny"
    killed = tmp_path / f".tiny.tmp-{_dead_pid()}-abc123"
    older = tmp_path / ".tiny.tmp-k2j4h5"  # the name an earlier kept_jax gave, without its writer's pid
    live = tmp_path / f".tiny.tmp-{os.getpid()}-def456"
    other = tmp_path / f".other.tmp-{_dead_pid()}-abc123"
    for folder in (killed, older, live, other):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"half")
    assert convert.main(["--source", gguf_files["float"], "--out", str(out)]) == 0
    printed, err = capsys.readouterr()
    # A GGUF's conversion is a copy of every tensor: one line says so, not a row per tensor (272 for SmolLM2).
    assert "mapping: 21 tensors copied unchanged (identity" in printed and " identity " not in printed
    assert not killed.exists() and not older.exists() and live.exists() and other.exists()
    assert f"removed {killed}, left by an interrupted run" in err and f"removed {older}" in err
    assert sorted(os.listdir(tmp_path)) == sorted([live.name, other.name, "tiny"])


def test_a_killed_gguf_readers_staging_folder_is_removed_by_the_next_reader(gguf_files, tmp_path, monkeypatch):  # noqa: F811
    """`generate --model X.gguf` killed leaves its tokenizer files in the temporary folder: the next reader of a GGUF
    sweeps such folders whose process has ended."""
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    killed = tmp_path / f"{gguf_import.GGUF_STAGING}{_dead_pid()}-xyz"
    live = tmp_path / f"{gguf_import.GGUF_STAGING}{os.getpid()}-xyz"
    for folder in (killed, live):
        folder.mkdir()
        (folder / "tokenizer.json").write_text("{}")
    files = gguf_import.GGUFFile(gguf_files["float"]).files_dir
    assert not killed.exists() and live.exists() and os.path.dirname(files) == str(tmp_path)


def test_only_kept_jax_names_are_swept(tmp_path):
    (tmp_path / "tiny.tmp-1-x").mkdir()  # not hidden: not a name kept_jax gives
    (tmp_path / ".tiny.tmpfile").write_text("mine")
    assert sweep_leftovers(str(tmp_path), ".tiny.tmp-") == []
    assert sorted(os.listdir(tmp_path)) == [".tiny.tmpfile", "tiny.tmp-1-x"]


# ---- Tracebacks that became one line ------------------------------------------------------------------------------

INVALID_UTF8 = "abc\udcff\udcfe\udc80def"  # what Python makes of the bytes abc\xff\xfe\x80def on a command line


def _one_line(capsys, message: str) -> str:
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith("error: ") and message in err, err
    return err


def _never(*args, **kwargs):
    raise AssertionError("work was done before the refusal")


@pytest.mark.parametrize("program, flag", [("generate", "--prompt"), ("score", "--text")])
def test_text_that_is_not_utf8_is_refused(program, flag, gguf_files, capsys):  # noqa: F811
    from kept_jax import generate, score

    main = {"generate": generate.main, "score": score.main}[program]
    for model in ("kept_jax/assets/tiny-orion", gguf_files["float"]):  # SentencePiece, and a GGUF's BPE
        assert main(["--model", model, flag, INVALID_UTF8]) == 2
        _one_line(capsys, f"argument {flag}: not valid UTF-8 (byte 0xff at character 3); give UTF-8 text")


def test_argument_errors_are_one_line_not_a_usage_block(capsys):
    from kept_jax import generate, train

    assert generate.main(["--prompt", "hi"]) == 2
    _one_line(capsys, "the following arguments are required: --model (`python -m kept_jax.generate --help` lists")
    assert train.main(["--bogus"]) == 2
    _one_line(capsys, "unrecognized arguments: --bogus")


@pytest.mark.parametrize("argv, message", [
    (["--model_args", "path=out/tiny-llama"], "--model kept_jax needs the checkpoint: --model_args pretrained=PATH"),
    ([], "--model kept_jax needs the checkpoint"),
    (["--model_args", "pretrained=kept_jax/assets/tiny-orion,size=2"], "does not take size; its arguments are "
                                                                       "pretrained, dtype"),
    (["--model_args", "pretrained=kept_jax/assets/tiny-orion", "--limit", "0"], "--limit 0: give a positive number"),
    (["--model_args", "pretrained=nowhere/model"], "model 'nowhere/model' does not exist"),
    (["--model_args", "pretrained=kept_jax/assets/tiny-orion,dtype=float16"], "dtype='float16': choose one of"),
    (["--model_args", "pretrained=kept_jax/assets/tiny-orion", "--output_path", "/sys/results"],
     "cannot write to '/sys'"),
])
def test_harness_mistakes_are_refused_before_lm_eval_runs(argv, message, monkeypatch, capsys):
    pytest.importorskip("lm_eval")
    import lm_eval.__main__

    from kept_jax import harness

    monkeypatch.setattr(lm_eval.__main__, "cli_evaluate", _never)
    assert harness.main(["run", "--model", "kept_jax", "--tasks", "kept_heldout", *argv]) == 2
    _one_line(capsys, message)


def test_verify_refuses_a_reference_of_another_vocabulary_before_comparing(llama_checkpoint, gguf_files,  # noqa: F811
                                                                            monkeypatch, capsys):
    from bridge import verify
    from bridge.checkpoint import load_config

    monkeypatch.setattr(verify, "_kept_jax_logits", _never)
    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", _never)
    ours, theirs = load_config(llama_checkpoint[0]).vocab_size, load_config(gguf_files["float"]).vocab_size
    assert ours != theirs
    assert verify.main(["--hf", llama_checkpoint[0], "--reference", gguf_files["float"]]) == 2
    _one_line(capsys, f"has a vocabulary of {theirs:,} tokens and --hf {llama_checkpoint[0]} one of {ours:,}")


def _truncated(source: str, folder, size: int) -> str:
    path = str(folder / f"cut-{size}.gguf")
    with open(source, "rb") as f, open(path, "wb") as out:
        out.write(f.read(size))
    return path


@pytest.mark.parametrize("size", [100, 5000, -4096])
def test_a_truncated_gguf_is_named_as_such(size, gguf_files, tmp_path, capsys):  # noqa: F811
    from kept_jax import score

    source = gguf_files["float"]
    path = _truncated(source, tmp_path, size if size > 0 else os.path.getsize(source) + size)
    assert score.main(["--model", path, "--text", "hello"]) == 2
    err = _one_line(capsys, "download it again")
    assert "truncated" in err and "out of bounds" not in err and "dtype" not in err


def test_evaluate_and_verify_open_every_checkpoint_before_any_work(llama_checkpoint, gguf_files, tmp_path,  # noqa: F811
                                                                   monkeypatch, capsys):
    pytest.importorskip("lm_eval")
    from bridge import verify
    from kept_jax import evaluate

    cut = _truncated(gguf_files["float"], tmp_path, os.path.getsize(gguf_files["float"]) - 4096)
    monkeypatch.setattr(evaluate, "run_tasks", _never)
    assert evaluate.main(["--teacher", "kept_jax/assets/tiny-orion", "--student", cut, "--limit", "2"]) == 2
    _one_line(capsys, "download it again")
    monkeypatch.setattr(verify, "_kept_jax_logits", _never)
    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", _never)
    assert verify.main(["--hf", llama_checkpoint[0], "--reference", cut]) == 2
    _one_line(capsys, "download it again")


def test_save_logits_to_an_unwritable_place_is_refused_before_scoring(monkeypatch, capsys):
    import bridge.checkpoint
    from kept_jax import score

    monkeypatch.setattr(bridge.checkpoint, "load_checkpoint", _never)
    assert score.main(["--model", "kept_jax/assets/tiny-orion", "--text", "hello", "--save-logits",
                       "/sys/logits.npy"]) == 2
    _one_line(capsys, "cannot write to '/sys'")


@pytest.mark.parametrize("argv, message", [
    (["--quantize", "int8", "--group-size", "64"], "--group-size sets int4's groups, and int8 has one scale"),
    (["--quantize", "int8", "--quantize-head"], "--quantize-head quantizes an untied output head, and "),
])
def test_quantization_options_that_would_do_nothing_are_refused(argv, message, gguf_files, monkeypatch,  # noqa: F811
                                                                capsys):
    import bridge.checkpoint
    from kept_jax import generate

    monkeypatch.setattr(bridge.checkpoint, "load_checkpoint", _never)
    tied = gguf_files["legacy-quants"]
    assert bridge.checkpoint.load_config(tied).tie_word_embeddings
    assert generate.main(["--model", tied, "--prompt", "hello", *argv]) == 2
    _one_line(capsys, message)


def test_messages_name_the_gguf_given_not_its_private_folder(gguf_files, capsys):  # noqa: F811
    """`--tokenizer X.gguf` of a larger vocabulary (600 against 512): the message names X.gguf (it named a
    temporary folder)."""
    from kept_jax import generate

    assert generate.main(["--model", gguf_files["k-quants"], "--tokenizer", gguf_files["float"], "--prompt",
                          "a fairly long prompt with many different words, digits 12345 and more text"]) == 2
    err = _one_line(capsys, f"the tokenizer ({gguf_files['float']}) gives id")
    assert "kept_jax-gguf-" not in err


def test_a_streamed_answer_says_why_it_stopped(capsys):
    from kept_jax import generate

    assert generate.main(["--model", "kept_jax/assets/tiny-orion", "--prompt", "Return a new", "--max-new-tokens",
                          "3"]) == 0
    assert "stopped at --max-new-tokens (3)" in capsys.readouterr().err


def test_the_offline_tasks_leave_nothing_for_lm_eval_to_warn_of(caplog):
    """Each metric of the project's own tasks has its aggregation and direction (lm-eval warned six times per run,
    twice over for `evaluate`)."""
    import logging

    pytest.importorskip("lm_eval")
    from lm_eval.tasks import get_task_dict

    from kept_jax.harness import task_manager

    tasks = ["kept_heldout", "kept_next_line"]
    with caplog.at_level(logging.WARNING):
        assert set(get_task_dict(tasks, task_manager(tasks))) == set(tasks)
    assert not [r.getMessage() for r in caplog.records if "is defined, but" in r.getMessage()]
