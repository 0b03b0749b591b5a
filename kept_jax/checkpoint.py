"""Checkpoints of a training run with orbax's CheckpointManager, and the run directory's life cycle.

A checkpoint holds the train state (trainable leaves, optimizer state, step), the grain iterator's position, the
stage it was taken in, the sums of the train metrics since the last logged record (a run stopped between two records
logs the next one over the same steps as a run never stopped), and the leaves an earlier stage trained that this one
keeps frozen (MOHAWK's stage 2 keeps nothing frozen that stage 1 trained, but a config may). The student's other
frozen weights and the teacher are not saved: they are rebuilt, bit for bit, from the source checkpoint by the same
deterministic conversion. There is no other randomness to save: the data order lives in the iterator state and the
LoRA initialisation is in the trainable leaves.

orbax writes each checkpoint to a temporary directory and renames it when complete, so a checkpoint interrupted
mid-write (a `kill -9`, a lost node) is never listed, and the next start resumes from the last complete one.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import sys
import threading

import grain
import jax
import orbax.checkpoint as ocp

from kept_jax.errors import KeptError
from kept_jax.fileio import atomic_file, check_location, check_output_dir

CONFIG_FILE = "config.json"
# Settings a resumed run may change: they do not touch the trained weights or the data order.
RESUMABLE_CHANGES = {"verify", "train.log_every", "train.eval_every", "checkpoint.every", "checkpoint.keep",
                     "checkpoint.async_save", "chat.questions", "chat.max_new_tokens"}


class Checkpoints:
    def __init__(self, directory: str, every: int, keep: int, async_save: bool):
        self.every = every
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(os.path.abspath(directory), options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, data_iterator, force: bool = False, carried: dict | None = None,
             stage: str | None = None, log_window: dict | None = None) -> bool:
        """Saves when `step` is due (a multiple of `every`) or when forced; returns whether it saved. `log_window`:
        the train metrics summed since the last logged record (JSON floats round-trip exactly)."""
        if step % self.every and not force:
            return False
        items = dict(state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(data_iterator))
        if carried:
            items["carried"] = ocp.args.StandardSave(_by_path(carried))
        if stage is not None:
            items["stage"] = ocp.args.JsonSave({"stage": stage, "log_window": log_window or {}})
        return self.manager.save(step, args=ocp.args.Composite(**items), force=True)

    def restore(self, step: int, abstract_state, data_iterator, carried: dict | None = None):
        """(the state, the carried leaves, the log window) at `step`, with the shardings of `abstract_state` and
        `carried`; the iterator is moved to its position."""
        items = dict(state=ocp.args.StandardRestore(abstract_state),
                     data=grain.checkpoint.CheckpointRestore(data_iterator), stage=ocp.args.JsonRestore())
        if carried:
            items["carried"] = ocp.args.StandardRestore(_by_path(carried))
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        carried = {key: restored.carried["/".join(key)] for key in carried} if carried else {}
        return restored.state, carried, restored.stage.get("log_window", {})

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def _by_path(flat: dict) -> dict:
    """A flat dict keyed by (collection, *path) as one keyed by 'collection/path' strings, as orbax stores it."""
    return {"/".join(key): value for key, value in flat.items()}


def abstract_like(tree, shardings):
    """ShapeDtypeStructs with the given shardings: the restore target."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def _diff(old, new, prefix=""):
    """(dotted key, old value, new value) for every leaf that differs."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new)):
            yield from _diff(old.get(key), new.get(key), f"{prefix}{key}.")
    elif old != new:
        yield prefix[:-1], old, new


def check_run_dir(run_dir: str, config: dict, restart: bool, needed_bytes: int = 0) -> bool:
    """Whether `run_dir` holds this config's run to resume; writes nothing, so a failing start leaves no trace.

    A run directory holds the config it was started with, and the same command resumes it. A different config
    (beyond logging and checkpoint settings), or a non-empty directory that is not a run directory, is an error
    unless `restart` starts over, which it does only where kept_jax wrote everything. The location must be writable
    with `needed_bytes` free.
    """
    if os.path.exists(run_dir) and not os.path.isdir(run_dir):
        raise KeptError(f"--out {run_dir!r} is a file; give a directory path")
    if restart and os.path.isdir(run_dir) and os.listdir(run_dir):  # --restart deletes only what kept_jax wrote
        check_output_dir(run_dir, force=True, needed_bytes=needed_bytes, flag="--restart")
    else:
        check_location(run_dir, needed_bytes)
    if restart or not os.path.isdir(run_dir) or not os.listdir(run_dir):
        return False
    path = os.path.join(run_dir, CONFIG_FILE)
    if not os.path.isfile(path):
        raise KeptError(f"{run_dir!r} is not empty and is not a kept_jax run directory; "
                        f"use --out for another directory")
    with open(path, encoding="utf-8") as f:
        saved = json.load(f)
    changes = [f"{key}: {old!r} -> {new!r}" for key, old, new in _diff(saved, config) if key not in RESUMABLE_CHANGES]
    if changes:
        shown = "; ".join(changes[:4]) + ("; ..." if len(changes) > 4 else "")
        raise KeptError(f"{run_dir!r} holds a run with a different config ({shown}); run the same config to "
                        f"resume it, or --out for a new run directory, or --restart to delete that run and start over")
    return True


def create_run_dir(run_dir: str, config: dict, restart: bool) -> None:
    """Starts a fresh run directory that records `config`; with `restart`, first deletes the run it holds (saying
    what it deletes)."""
    if restart and os.path.isdir(run_dir) and os.listdir(run_dir):
        steps = sorted(int(n) for n in os.listdir(os.path.join(run_dir, "checkpoints")) if n.isdigit()) \
            if os.path.isdir(os.path.join(run_dir, "checkpoints")) else []
        kept = f"its checkpoints at steps {', '.join(map(str, steps))}" if steps else "no checkpoint"
        print(f"--restart: deleting the run in {run_dir} ({kept}; {', '.join(sorted(os.listdir(run_dir)))})",
              file=sys.stderr, flush=True)
        shutil.rmtree(run_dir)
    os.makedirs(run_dir, exist_ok=True)
    with atomic_file(os.path.join(run_dir, CONFIG_FILE)) as f:
        json.dump(config, f, indent=2)


def config_dict(cfg) -> dict:
    """The validated job config as JSON-compatible data (tuples as lists), for run-directory comparison."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


class StopRequest:
    """SIGTERM/SIGINT set a flag that the training loop reads between steps, so the state is never cut mid-step.

    A second signal interrupts at once (the last complete checkpoint still stands). Across hosts the flag is
    agreed on, so every process saves the same step.
    """

    def __init__(self):
        self.signal: int | None = None
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signal is not None:
            raise KeyboardInterrupt
        self.signal = signum

    def requested(self) -> bool:
        stop = self.signal is not None
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            stop = bool(multihost_utils.process_allgather(stop).any())
        return stop

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        return False
