"""`python -m kept_jax.train` with recipe: mohawk: Orion -> Llama -> Llamba in one job, three stages on the one
step, an export the float64 oracle agrees with, and a run killed in each stage that resumes bit-identically. The
Orion has a byte-level BPE tokenizer.json (the KEPT job test's has SentencePiece), which the export carries.

The stages here train different sets on purpose (stage 2 only the MLPs), so that the mixers stage 1 trained are
frozen in stage 2 and must come back from the checkpoint, not from the conversion.
"""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from bridge.checkpoint import load_checkpoint
from kept_jax import train
from kept_jax.errors import KeptError
from kept_jax.runlog import read_metrics
from kept_jax.train_config import load_config
from tests.test_train_job import tensorboard_scalars
from tests.test_resume import assert_same_weights, file_bytes, steps_saved, wait_for_checkpoint

# 128 tokens per step: stages of 4, 6 and 4 steps.
STAGES = ("stages=[{name: matrix, objective: matrix, tokens: 512, lr: 3.0e-3, trainable: [mixer/]},"
          " {name: hidden, objective: hidden, tokens: 768, lr: 3.0e-3, trainable: [mlp/]},"
          " {name: kd, objective: kl, tokens: 512, lr: 1.0e-3, trainable: all}]")
TOTAL = 14
TINY_LLAMBA = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "tiny-llamba.yaml")


def job_args(source, out):
    return ["--config", TINY_LLAMBA, "--out", out, f"source={source}", STAGES, "train.log_every=1",
            "checkpoint.every=1", "checkpoint.keep=3", "data.seq_len=32", "data.batch_size=4",
            "data.calib_tokens=256", "data.eval_tokens=256"]


@pytest.fixture(scope="module")
def reference(orion_bpe_checkpoint, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("mohawk") / "reference")
    assert train.main(job_args(orion_bpe_checkpoint[0], out)) == 0
    return out


@pytest.mark.xdist_group("mohawk-reference")  # one worker runs the reference job once
def test_three_stages_export_a_llamba_the_oracle_agrees_with(reference, orion_bpe_checkpoint):
    summary = json.load(open(os.path.join(reference, "summary.json")))
    assert summary["recipe"] == "mohawk" and summary["steps"] == TOTAL
    assert [s["name"] for s in summary["stages"]] == ["matrix", "hidden", "kd"]
    assert [s["steps"] for s in summary["stages"]] == [4, 6, 4]
    assert summary["verified"] is True, summary.get("why")
    assert summary["oracle"]["max_relative_error"] < 1e-4 and summary["oracle"]["argmax_agreement"] == 1.0
    for stage in summary["stages"]:
        assert np.isfinite(stage["kl"]) and stage["loss_last"] is not None
    assert summary["stages"][-1]["kl"] < summary["kl_init"]
    records = read_metrics(reference)
    assert {r["stage"] for r in records if r["split"] == "train"} == {"matrix", "hidden", "kd"}
    assert all("kl" not in r for r in records if r["split"] == "train" and r["stage"] != "kd")
    assert [r["step"] for r in records if r["split"] == "eval"] == [0, 4, 10, 14]
    config, params, _ = load_checkpoint(os.path.join(reference, "export"))
    assert config.architecture == "llamba"
    # Stages 1 and 2 are judged by the held-out distance of each block from the teacher's layer.
    evals = [r for r in records if r["split"] == "eval"]
    for r in evals:
        assert len(r["hidden_by_layer"]) == config.num_hidden_layers
        assert r["hidden"] == pytest.approx(sum(r["hidden_by_layer"]), rel=1e-6)
    assert evals[2]["hidden"] < evals[1]["hidden"]  # stage 2 trains exactly that distance (here the MLPs)
    assert [s["hidden"] for s in summary["stages"]] == [r["hidden"] for r in evals[1:]]
    scalars = tensorboard_scalars(os.path.join(reference, "tensorboard"))
    assert [v for _, v in scalars["eval/hidden_by_layer/01"]] == pytest.approx([r["hidden_by_layer"][1] for r in evals])
    for name in ("tokenizer.json", "tokenizer_config.json"):  # the teacher's byte-level BPE, byte for byte
        assert open(os.path.join(reference, "export", name), "rb").read() == \
            open(os.path.join(orion_bpe_checkpoint[0], name), "rb").read()
    assert os.path.isfile(os.path.join(reference, "report.png"))


@pytest.mark.xdist_group("mohawk-reference")  # one worker runs the reference job once
def test_killed_in_every_stage_the_rerun_is_bit_identical(orion_bpe_checkpoint, reference, tmp_path, capsys):
    """The same command, killed (kill -9) once in each stage and rerun, ends with the uninterrupted run's metrics,
    state and export, byte for byte."""
    out = str(tmp_path / "run")
    argv = job_args(orion_bpe_checkpoint[0], out)
    for stage, (first, last) in {"matrix": (1, 4), "hidden": (5, 10), "kd": (11, 14)}.items():
        proc = subprocess.Popen([sys.executable, "-m", "kept_jax.train", *argv], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        wait_for_checkpoint(proc, out, first + 1, timeout=300)
        proc.kill()
        proc.communicate(timeout=60)
        killed_after = steps_saved(out)[-1]
        assert first < killed_after <= last, f"killed after step {killed_after}, not in stage {stage}"
        if stage == "hidden":
            # Stage 2 keeps stage 1's mixers frozen: they are saved with its checkpoints, and without them the
            # resumed run would restart stage 2 from the converted mixers and not match the reference.
            assert os.path.isdir(os.path.join(out, "checkpoints", str(killed_after), "carried"))

    assert train.main(argv) == 0  # the last run in this process: it need not be killed
    assert "resuming from the checkpoint at step" in capsys.readouterr().err
    assert file_bytes(out, "metrics.jsonl") == file_bytes(reference, "metrics.jsonl")
    assert_same_weights(reference, out, TOTAL)


@pytest.mark.parametrize("override, message", [
    ("stages=[]", "needs a stages: list"),
    ("trainable=lora", "remove the top-level trainable and lora keys"),
    ("train.lr=0.1", "not train.steps/warmup/lr/weight_decay/clip"),
    ("train.clip=1.0", "not train.steps/warmup/lr/weight_decay/clip"),
    ("stages=[{name: a, objective: matrix, tokens: 10, lr: -1.0}]", "stages[0].lr = -1.0 is out of range"),
    ("stages=[{name: a, objective: matrics, tokens: 10, lr: 1.0}]", "did you mean 'matrix'"),
    ("stages=[{name: a, objective: kl, tokens: 10, lr: 1.0, warmup: 0.6, decay: 0.6}]", "warmup + decay <= 1"),
    ("stages=[{name: a, objective: kl, tokens: 10, lr: 1.0, trainable: mixers}]", "trainable must be one of"),
])
def test_stage_config_errors(override, message):
    with pytest.raises(KeptError, match=re.escape(message)):
        load_config(TINY_LLAMBA, [override])


def test_a_stage_that_trains_nothing_is_refused_before_loading(tmp_path, capsys):
    """A later stage's pattern that matches no parameter costs neither the teacher's loading nor the earlier
    stages; the message shows what the student's paths look like."""
    stages = ("stages=[{name: matrix, objective: matrix, tokens: 512, lr: 1.0e-3, trainable: [mixer/]},"
              " {name: kd, objective: kl, tokens: 512, lr: 1.0e-3, trainable: [mixr/]}]")
    assert train.main(["--config", TINY_LLAMBA, "--out", str(tmp_path / "run"), stages]) == 2
    err = capsys.readouterr().err
    assert "stage kd: trainable=[mixr/] selects no parameter of the student (llamba, whose paths are like " \
           "backbone/layers/" in err
    assert "load" not in err.split("error:")[0] and not os.path.exists(tmp_path / "run")


def test_stages_out_of_mohawk_order_get_a_note(capsys):
    stages = ("stages=[{name: kd, objective: kl, tokens: 512, lr: 1.0e-3},"
              " {name: matrix, objective: matrix, tokens: 512, lr: 1.0e-3, trainable: [mixer/]}]")
    assert train.main(["--config", TINY_LLAMBA, "--dry-run", stages]) == 0
    assert "note: the stages' objectives run kl -> matrix, not in MOHAWK's order" in capsys.readouterr().err
    assert train.main(["--config", TINY_LLAMBA, "--dry-run", STAGES]) == 0
    assert "note:" not in capsys.readouterr().err


def test_wsd_schedule_warms_holds_and_decays():
    from kept_jax.stages import WSD_END, wsd_schedule

    lr = wsd_schedule(2.0, 100, 0.1, 0.1)
    assert float(lr(0)) == 0.0 and float(lr(5)) == pytest.approx(1.0)  # linear warmup over 10 updates
    assert all(float(lr(k)) == pytest.approx(2.0) for k in (10, 50, 89))  # stable
    assert float(lr(95)) == pytest.approx(1.0, rel=1e-6) and float(lr(100)) == pytest.approx(WSD_END)
    no_warmup = wsd_schedule(2.0, 10, 0.0, 0.5)
    assert float(no_warmup(0)) == pytest.approx(2.0) and float(no_warmup(10)) == pytest.approx(WSD_END)
