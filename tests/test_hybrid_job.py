"""`python -m kept_jax.train` with recipe: mohawk and student: hybrid: a Llama -> a Mamba-2/attention hybrid in three
stages on the one step, an export that Transformers' GraniteMoeHybridForCausalLM loads and agrees with, and a run
killed in each stage that resumes bit-identically.

Stage 2 trains the MLPs only (the shared MLP of every layer), so that the Mamba-2 mixers stage 1 trained are frozen
in stage 2 and must come back from the checkpoint, not from the conversion.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from bridge.checkpoint import load_checkpoint
from kept_jax import dry_run, train
from kept_jax.errors import KeptError
from kept_jax.runlog import read_metrics
from kept_jax.train_config import load_config
from tests.test_resume import assert_same_weights, file_bytes, steps_saved, wait_for_checkpoint

# 128 tokens per step: stages of 4, 6 and 4 steps.
STAGES = ("stages=[{name: matrix, objective: matrix, tokens: 512, lr: 3.0e-3, trainable: [mamba/]},"
          " {name: hidden, objective: hidden, tokens: 768, lr: 3.0e-3, trainable: [shared_mlp/]},"
          " {name: kd, objective: kl, tokens: 512, lr: 1.0e-3, trainable: all}]")
TOTAL = 14
TINY_HYBRID = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "tiny-hybrid.yaml")


def job_args(source, out):
    return ["--config", TINY_HYBRID, "--out", out, f"source={source}", "attention_layers=0", STAGES,
            "train.log_every=1", "checkpoint.every=1", "checkpoint.keep=3", "data.seq_len=32", "data.batch_size=4",
            "data.calib_tokens=256", "data.eval_tokens=256"]


@pytest.fixture(scope="module")
def reference(llama_bpe_checkpoint, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("hybrid") / "reference")
    assert train.main(job_args(llama_bpe_checkpoint[0], out)) == 0
    return out


@pytest.mark.xdist_group("hybrid-reference")  # one worker runs the reference job once
def test_three_stages_export_a_hybrid_transformers_agrees_with(reference, llama_bpe_checkpoint):
    summary = json.load(open(os.path.join(reference, "summary.json")))
    assert summary["student"] == "hybrid (attention in layers 0)" and summary["steps"] == TOTAL
    assert [s["steps"] for s in summary["stages"]] == [4, 6, 4]
    assert summary["verified"] is True, summary.get("why")  # bridge.verify: Transformers' logits within 1e-3
    assert summary["stages"][-1]["kl"] < summary["kl_init"]
    config, params, _ = load_checkpoint(os.path.join(reference, "export"))
    assert config.architecture == "granitemoehybrid" and config.layer_types == ("attention", "mamba")
    # Stages 1 and 2 align the replaced layer alone: one entry per eval.
    evals = [r for r in read_metrics(reference) if r["split"] == "eval"]
    assert [len(r["hidden_by_layer"]) for r in evals] == [1, 1, 1, 1]
    assert evals[2]["hidden"] < evals[1]["hidden"]  # stage 2 trains that distance (here through the MLP)
    # The kept attention layer is frozen in stages 1 and 2, reading the teacher's buffers (the plan shares its
    # leaves: the teacher's layers are laid out as the student's); stage 3 trains it.
    teacher, teacher_params, _ = load_checkpoint(llama_bpe_checkpoint[0], scan_layers=False)
    q = params["model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"]
    assert not np.array_equal(np.asarray(q), np.asarray(teacher_params["model"]["layers"]["0"]["self_attn"]["q_proj"][
        "kernel"]))
    plan = train.plan_job(load_config(TINY_HYBRID, job_args(llama_bpe_checkpoint[0], reference)[4:])[0], 1)
    shared = dry_run.estimate(plan)["stages"][0]["shared_leaves"]
    assert shared >= 4 + 2 + 1  # q, k, v and o of layer 0, the norms, the output MLP projections, the embedding


@pytest.mark.xdist_group("hybrid-reference")
def test_killed_in_every_stage_the_rerun_is_bit_identical(llama_bpe_checkpoint, reference, tmp_path, capsys):
    out = str(tmp_path / "run")
    argv = job_args(llama_bpe_checkpoint[0], out)
    for stage, (first, last) in {"matrix": (1, 4), "hidden": (5, 10), "kd": (11, 14)}.items():
        proc = subprocess.Popen([sys.executable, "-m", "kept_jax.train", *argv], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        wait_for_checkpoint(proc, out, first + 1, timeout=300)
        proc.kill()
        proc.communicate(timeout=60)
        killed_after = steps_saved(out)[-1]
        assert first < killed_after <= last, f"killed after step {killed_after}, not in stage {stage}"
        if stage == "hidden":  # stage 1's mixers, frozen in stage 2, are saved with its checkpoints
            assert os.path.isdir(os.path.join(out, "checkpoints", str(killed_after), "carried"))
    assert train.main(argv) == 0
    assert "resuming from the checkpoint at step" in capsys.readouterr().err
    assert file_bytes(out, "metrics.jsonl") == file_bytes(reference, "metrics.jsonl")
    assert_same_weights(reference, out, TOTAL)


@pytest.mark.parametrize("overrides, message", [
    (["mixer_init=mohawk"], "mixer_init 'mohawk' is not an init of a hybrid student; choose mamba2 or attention"),
    (["student=llamba", "mixer_init=mohawk"], "attention_layers shape a hybrid student"),
    (["student_config=configs/models/tiny-hybrid.json"], "attention_layers and student_config both say"),
])
def test_config_errors(overrides, message):
    with pytest.raises(KeptError, match=message):
        load_config(TINY_HYBRID, overrides)


def test_auto_layers_in_a_job_say_how_to_choose_them(tmp_path, capsys):
    assert train.main(["--config", TINY_HYBRID, "--dry-run", "attention_layers=auto:2"]) == 2
    err = capsys.readouterr().err
    assert "run python -m kept_jax.convert --to hybrid" in err and "--attention-layers auto:2" in err
