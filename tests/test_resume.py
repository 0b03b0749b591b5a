"""Preemption: SIGTERM saves and stops, kill -9 loses only the steps after the last complete checkpoint, and the
resumed run is bit-identical to one that was never interrupted (metrics, trained state and export), also when it
resumes between two logged records (every 2 steps; checkpoints every 3)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp

from kept_jax import train
from kept_jax.runlog import read_metrics

STEPS = 36
LOG_EVERY = 2


def job_args(source, out):
    return ["--out", out, f"source={source}", f"train.steps={STEPS}", f"train.log_every={LOG_EVERY}",
            "train.eval_every=18", "checkpoint.every=3", "checkpoint.keep=2", "verify=false", "trainable=lora",
            "data.seq_len=32", "data.batch_size=4", "data.calib_tokens=256", "data.eval_tokens=256"]


def start(args):
    return subprocess.Popen([sys.executable, "-m", "kept_jax.train", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def steps_saved(out):
    path = os.path.join(out, "checkpoints")
    return sorted(int(n) for n in os.listdir(path) if n.isdigit()) if os.path.isdir(path) else []


def wait_for_checkpoint(proc, out, at_least, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if any(s >= at_least for s in steps_saved(out)):
            return
        time.sleep(0.02)
    raise AssertionError(f"no checkpoint at step >= {at_least}; exit {proc.poll()}: {proc.communicate()[1][-2000:]}")


def file_bytes(run, name):
    with open(os.path.join(run, name), "rb") as f:
        return f.read()


def assert_same_weights(reference, out, last_step):
    """The final checkpoint's state and the exported weights of two runs are bit-identical."""
    a, b = (ocp.StandardCheckpointer().restore(os.path.join(run, "checkpoints", str(last_step), "state"))
            for run in (reference, out))
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert file_bytes(out, "export/model.safetensors") == file_bytes(reference, "export/model.safetensors")


def test_interrupted_run_resumes_bit_identically(orion_checkpoint, tmp_path, capsys):
    source = orion_checkpoint[0]
    reference = str(tmp_path / "reference")
    assert train.main(job_args(source, reference)) == 0

    out = str(tmp_path / "run")
    proc = start(job_args(source, out))
    wait_for_checkpoint(proc, out, 9)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    stopped_at = int(err.split("stopped by a signal after step ")[1].split(";")[0])
    assert steps_saved(out)[-1] == stopped_at < STEPS  # saved at the step it stopped, off the every-3 grid or not

    proc = start(job_args(source, out))
    wait_for_checkpoint(proc, out, stopped_at + 9)
    proc.kill()  # SIGKILL: no handler runs, an async save may be cut mid-write
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    killed_after = steps_saved(out)[-1]
    assert stopped_at < killed_after < STEPS
    # Resume from a checkpoint between two logged records: its next record sums steps from before and after the
    # kill. Of the last two checkpoints (consecutive multiples of 3) one is off the grid; a newer one is dropped,
    # as if the kill had come before it was written.
    off_grid = [s for s in steps_saved(out) if s % LOG_EVERY][-1]
    for step in steps_saved(out):
        if step > off_grid:
            shutil.rmtree(os.path.join(out, "checkpoints", str(step)))
    # A checkpoint directory left mid-write (orbax's temporary name) must never be used.
    partial = os.path.join(out, "checkpoints", f"{STEPS - 1}.orbax-checkpoint-tmp-1234567890")
    os.makedirs(os.path.join(partial, "state"))
    with open(os.path.join(partial, "state", "_METADATA"), "w") as f:
        f.write("{truncated")

    assert train.main(job_args(source, out)) == 0  # the last run in this process: it need not be killed
    err = capsys.readouterr().err
    resumed_from = int(err.split("resuming from the checkpoint at step ")[1].split()[0])
    assert resumed_from == off_grid > stopped_at

    # The reproducible record is byte-identical (what `sha256sum metrics.jsonl` checks); measured speed is not in it.
    assert file_bytes(out, "metrics.jsonl") == file_bytes(reference, "metrics.jsonl")
    assert all("tokens_per_s" in r for r in read_metrics(out, "timings.jsonl"))
    steps = [r["step"] for r in read_metrics(out) if r["split"] == "train"]
    assert steps == list(range(LOG_EVERY, STEPS + 1, LOG_EVERY))  # nothing lost, nothing repeated
    assert_same_weights(reference, out, STEPS)
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["resumed_from_step"] == resumed_from
