"""`python -m kept_jax.train`: the whole job on a tiny Orion, its summary, its export and its refusals."""

import json
import os
import re
import shutil
import struct

import pytest
from transformers import AutoModelForCausalLM

from kept_jax import train
from kept_jax.runlog import read_metrics

def tensorboard_scalars(log_dir: str) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value)]} read straight from the event files (TFRecord framing of Event protos)."""
    from tensorboardX.proto.event_pb2 import Event

    scalars: dict = {}
    for name in sorted(os.listdir(log_dir)):
        with open(os.path.join(log_dir, name), "rb") as f:
            while header := f.read(12):
                length = struct.unpack("<Q", header[:8])[0]
                event = Event.FromString(f.read(length))
                f.read(4)
                for value in event.summary.value:
                    scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


FAST = ["train.steps=4", "train.warmup=2", "train.log_every=2", "data.seq_len=32", "data.batch_size=4", "data.calib_tokens=512",
        "data.eval_tokens=512"]


def test_job_writes_summary_logs_and_a_verified_export(orion_checkpoint, tmp_path, capsys):
    out = str(tmp_path / "run")
    assert train.main(["--out", out, f"source={orion_checkpoint[0]}", "trainable=lora", "train.eval_every=2",
                       *FAST]) == 0
    captured = capsys.readouterr()
    printed = captured.out
    assert "KL (nats/tok)" in printed and "verified=True" in printed
    # stderr names every phase, in order, as it starts and when it ends (with its time).
    phases = ["check data", "load", "calibrate and convert", "pack", "evaluate", "distill", "evaluate", "export",
              "verify"]
    ends = [line.rsplit(":", 1)[0] for line in captured.err.splitlines() if re.fullmatch(r"[a-z ]+: \d+\.\d s", line)]
    assert ends == ["check data", "load", "calibrate and convert", "pack", "evaluate", "evaluate", "distill", "export",
                    "verify"]  # the closing evaluation ends inside distill
    starts = [line.split(" (")[0] for line in captured.err.splitlines() if line.endswith(" ...")][1:]
    assert starts == phases
    summary = json.load(open(os.path.join(out, "summary.json")))
    for key in ("kl_init", "kl_final", "agreement_init", "agreement_final", "steps", "tokens", "export_dir", "opm",
                "trainable"):
        assert key in summary
    assert summary["steps"] == 4 and summary["tokens"] == 4 * 4 * 32 and summary["trainable"] == "lora"
    assert summary["verified"] is True and summary["kl_init"] > 0
    assert [h["step"] for h in summary["history"]] == [2, 4]
    model = AutoModelForCausalLM.from_pretrained(summary["export_dir"], trust_remote_code=False)
    assert type(model).__name__ == "LlamaForCausalLM"

    records = read_metrics(out)
    assert [(r["split"], r["step"], r["tokens"]) for r in records] == [
        ("eval", 0, 0), ("train", 2, 256), ("eval", 2, 256), ("train", 4, 512), ("eval", 4, 512)]
    assert all(0 < r["kl"] and 0 < r["agreement"] <= 1 for r in records)
    assert records[0]["kl"] == summary["kl_init"] and records[-1]["kl"] == summary["kl_final"]
    scalars = tensorboard_scalars(os.path.join(out, "tensorboard"))
    assert [step for step, _ in scalars["train/kl"]] == [2, 4]
    assert [v for _, v in scalars["eval/agreement"]] == pytest.approx([r["agreement"] for r in records
                                                                       if r["split"] == "eval"])
    with open(os.path.join(out, "report.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == ["4"]  # every=100 > steps: only the last

    # The same command again finds the finished run; another config is refused without touching it.
    assert train.main(["--out", out, f"source={orion_checkpoint[0]}", "trainable=lora", "train.eval_every=2",
                       *FAST]) == 0
    assert "is complete" in capsys.readouterr().out
    assert train.main(["--out", out, f"source={orion_checkpoint[0]}", "trainable=lora", *FAST[1:],
                       "train.steps=5"]) == 2
    assert "different config (train.steps: 4 -> 5)" in capsys.readouterr().err
    assert json.load(open(os.path.join(out, "summary.json")))["steps"] == 4

    # A run killed before its first checkpoint, in the middle of an export: the rerun says it starts from step 0
    # and clears the export's leftovers. --restart says what it deletes.
    for name in ("checkpoints", "export"):
        shutil.rmtree(os.path.join(out, name))
    os.remove(os.path.join(out, "summary.json"))
    os.makedirs(os.path.join(out, ".export.tmp-k1ll3d"))
    assert train.main(["--out", out, f"source={orion_checkpoint[0]}", "trainable=lora", "train.eval_every=2",
                       *FAST]) == 0
    assert "holds this run but no checkpoint yet (it stopped before its first): starting from step 0" in \
        capsys.readouterr().err
    assert not [n for n in os.listdir(out) if n.startswith(".")]
    assert train.main(["--out", out, f"source={orion_checkpoint[0]}", "trainable=lora", "--restart", *FAST[1:],
                       "train.steps=5", "verify=false"]) == 0
    assert f"--restart: deleting the run in {out} (its checkpoints at steps 4; checkpoints, config.json, export" in \
        capsys.readouterr().err
    assert json.load(open(os.path.join(out, "summary.json")))["steps"] == 5


def test_a_new_run_directory_is_created_with_its_parents(tmp_path):
    from kept_jax import checkpoint

    run = str(tmp_path / "runs" / "tiny")  # the default --out, runs/<config>, on a fresh clone
    assert checkpoint.check_run_dir(run, {"a": 1}, restart=False) is False
    checkpoint.create_run_dir(run, {"a": 1}, restart=False)
    assert checkpoint.check_run_dir(run, {"a": 1}, restart=False) is True


def test_job_refuses_a_directory_that_is_not_a_run(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert train.main(["--out", str(out), *FAST]) == 2
    assert "is not a kept_jax run directory" in capsys.readouterr().err
    assert os.listdir(out) == ["notes.txt"]


def test_job_user_errors(orion_checkpoint, llama_checkpoint, tmp_path, capsys):
    assert train.main(["--out", str(tmp_path / "a"), f"source={llama_checkpoint[0]}", *FAST]) == 2
    assert "must be an Orion checkpoint" in capsys.readouterr().err
    assert train.main(["--out", str(tmp_path / "b"), f"source={orion_checkpoint[0]}", "trainable=[nothing_matches]",
                       *FAST]) == 2
    assert "selects no parameter" in capsys.readouterr().err
    assert train.main(["--out", str(tmp_path / "c"), "train.stepz=3"]) == 2
    assert "did you mean train.steps?" in capsys.readouterr().err
    assert not any(os.path.exists(tmp_path / d) for d in "abc")


def test_job_reads_user_text_files(orion_checkpoint, tmp_path, capsys):
    import json as _json

    from kept_jax import corpus

    train_file = tmp_path / "train.jsonl"
    with open(train_file, "w") as f:
        for doc in corpus.read_documents(corpus.TRAIN)[:3]:
            f.write(_json.dumps({"text": doc}) + "\n")
    out = str(tmp_path / "run")
    assert train.main(["--out", out, f"source={orion_checkpoint[0]}", f"data.train={train_file}", "verify=false",
                       "trainable=norms", "data.eval=split", "data.eval_fraction=0.34", *FAST]) == 0
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["config"]["data"]["train"] == str(train_file)
    assert summary["eval_tokens"] > 0
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    assert train.main(["--out", str(tmp_path / "run2"), f"source={orion_checkpoint[0]}", f"data.train={empty}",
                       *FAST]) == 2
    assert "holds no text" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "run2")


def test_job_checks_before_working(orion_checkpoint, tmp_path, capsys):
    """Nonsense values, a context past the teacher's, an output under a file or without space: one line each, exit
    2, nothing written."""
    cases = [
        (["train.lr=-1"], "train.lr = -1.0 is out of range: it must be finite and > 0"),
        (["data.seq_len=2048"], "data.seq_len 2048 is longer than the source's context, max_position_embeddings"),
    ]
    for overrides, message in cases:
        assert train.main(["--out", str(tmp_path / "run"), f"source={orion_checkpoint[0]}", *FAST, *overrides]) == 2
        assert message in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    assert train.main(["--out", str(tmp_path / "file" / "run"), *FAST]) == 2
    assert "which is a regular file, not a directory" in capsys.readouterr().err
    assert os.listdir(tmp_path) == ["file"]


def test_no_space_is_one_line_before_the_work(tmp_path, monkeypatch, capsys):
    import collections
    import shutil

    monkeypatch.setattr(shutil, "disk_usage", lambda path: collections.namedtuple("u", "total used free")(1, 1, 1000))
    assert train.main(["--out", str(tmp_path / "run"), *FAST]) == 2
    err = capsys.readouterr().err
    assert "not enough space on" in err and "the output needs about" in err and not os.listdir(tmp_path)


def test_restart_never_deletes_what_kept_jax_did_not_write(tmp_path, capsys):
    out = tmp_path / "run"
    (out / "data").mkdir(parents=True)
    (out / "config.json").write_text("{}")  # looks like a run directory, but the user keeps data in it
    (out / "data" / "corpus.txt").write_text("mine")
    assert train.main(["--out", str(out), "--restart", *FAST]) == 2
    assert "--restart replaces only what kept_jax wrote" in capsys.readouterr().err
    assert (out / "data" / "corpus.txt").read_text() == "mine"
    assert train.main(["--out", str(out), "--force", *FAST]) == 2  # the old flag: a message, and nothing deleted
    assert "no longer takes --force; to start over (deleting the run's checkpoints) pass --restart" in \
        capsys.readouterr().err
    assert (out / "data" / "corpus.txt").read_text() == "mine"


def test_a_job_that_ends_worse_than_it_started_fails(orion_checkpoint, tmp_path, capsys):
    out = str(tmp_path / "run")
    argv = ["--out", out, f"source={orion_checkpoint[0]}", "trainable=all", "train.lr=0.5", "verify=false", *FAST]
    assert train.main(argv) == 2
    err = capsys.readouterr().err
    assert "held-out KL ended worse than it started" in err and "is not a result" in err
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert not summary["kl_final"] <= summary["kl_init"] and summary["rejected"]
    assert train.main(argv) == 2  # the finished run says so again


def test_a_bar_inside_a_bar_leaves_no_escapes_in_a_log(capsys):
    """Training's bar stays open while an evaluation's bar runs: on a terminal both are drawn, but in a log file the
    inner one would leave cursor-up escapes (`[A`) on every line it draws."""
    from kept_jax import runlog

    with runlog.progress(4, "xkd", "step") as outer:
        outer.update(1)
        with runlog.progress(3, "evaluate", "batch", leave=False) as inner:
            inner.update(3)
        outer.update(3)
    err = capsys.readouterr().err
    assert "xkd" in err and "4/4" in err
    assert "\x1b[A" not in err
