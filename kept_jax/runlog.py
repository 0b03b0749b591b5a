"""What a run reports as it goes: `metrics.jsonl`, `timings.jsonl` and TensorBoard event files in the run directory;
`report.png`.

Each line of `metrics.jsonl` is one JSON object: `{"split": "train" | "eval", "stage", "step", "tokens", "kl",
"agreement", ...}` (MOHAWK's matrix and hidden stages log their own `loss`, without `kl`). Train lines average the
steps since the previous train line; eval lines cover the whole held-out set. Measured speed (tokens/s, MFU) goes to
`timings.jsonl` instead, so that `metrics.jsonl` of a resumed run is byte-identical. Lines are flushed as they are
written, so `tail -f` and TensorBoard (`tensorboard --logdir RUN_DIR/tensorboard`) follow a
live run. On resume, lines past the restored step are dropped, since those steps run again.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from typing import Any, Callable, Iterable, Iterator

from kept_jax.fileio import atomic_file

METRICS_FILE = "metrics.jsonl"
TIMINGS_FILE = "timings.jsonl"
TENSORBOARD_DIR = "tensorboard"
REPORT_FILE = "report.png"


@contextlib.contextmanager
def phase(name: str, detail: str = "", timings: dict[str, float] | None = None) -> Iterator[None]:
    """One phase of a command on stderr: `name (detail) ...` as it starts, `name: N s` when it ends; its wall time
    goes into `timings` (seconds by phase name), never into a record that must reproduce."""
    print(f"{name}{f' ({detail})' if detail else ''} ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    yield
    seconds = time.perf_counter() - start
    if timings is not None:
        timings[name] = round(seconds, 3)
    print(f"{name}: {seconds:.1f} s", file=sys.stderr, flush=True)


_OPEN_BARS: list = []  # the bars of `progress` now open, outermost first


@contextlib.contextmanager
def progress(total: int, desc: str, unit: str, initial: int = 0, leave: bool = True) -> Iterator[Any]:
    """A tqdm progress bar on stderr, drawn by the first host only, closed when the block ends. A bar opened inside
    another (an evaluation during training) is drawn only on a terminal: nesting moves the cursor up, which a log
    file would keep as `[A` escapes."""
    import jax
    from tqdm import tqdm

    nested_in_a_file = bool(_OPEN_BARS) and not sys.stderr.isatty()
    bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True,
               mininterval=1.0, leave=leave, disable=jax.process_index() != 0 or nested_in_a_file)
    _OPEN_BARS.append(bar)
    try:
        yield bar
    finally:
        _OPEN_BARS.remove(bar)
        bar.close()


def counted(items: Iterable, total: int, desc: str, unit: str) -> Iterator:
    """`items` as they come, with a progress bar; no item is kept once the consumer asks for the next (a streamed
    layer of a large model must be gone before the next one is read)."""
    with progress(total, desc, unit) as bar:
        for item in items:
            yield item
            del item
            bar.update(1)


def read_metrics(run_dir: str, name: str = METRICS_FILE) -> list[dict]:
    """The records of `metrics.jsonl` (or of `timings.jsonl`), [] when there is none yet."""
    path = os.path.join(run_dir, name)
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _summary_writer_class():
    """tensorboardX's SummaryWriter, loaded without torch: tensorboardX imports torch when it is installed, only to
    accept torch tensors (this log gives it floats), and that import cost ~2.7 s of every job's start here. Hidden
    only while tensorboardX loads; `import torch` works as before afterwards."""
    import sys

    if "torch" in sys.modules:
        from tensorboardX import SummaryWriter

        return SummaryWriter
    sys.modules["torch"] = None  # `import torch` raises ImportError, as it does where torch is not installed
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter


class RunLog:
    def __init__(self, run_dir: str, keep: Callable[[dict], bool], enabled: bool = True):
        """`keep` selects the records of an earlier process that stand (on resume, those up to the restored step).
        `enabled` is False on every host but the first, which alone writes."""
        self.run_dir, self.enabled = run_dir, enabled
        if not enabled:
            return
        SummaryWriter = _summary_writer_class()
        self._files, last = {}, -1
        for name in (METRICS_FILE, TIMINGS_FILE):
            path = os.path.join(run_dir, name)
            kept = [r for r in read_metrics(run_dir, name) if keep(r)]
            with atomic_file(path) as f:
                f.writelines(json.dumps(r) + "\n" for r in kept)
            self._files[name] = open(path, "a", encoding="utf-8")
            last = max([last] + [r["step"] for r in kept])
        # purge_step hides events after the last kept step from TensorBoard: those steps run again.
        self._writer = SummaryWriter(os.path.join(run_dir, TENSORBOARD_DIR), purge_step=last + 1, flush_secs=10)

    def write(self, record: dict, timing: dict | None = None) -> None:
        """`record` goes to `metrics.jsonl`, which a resumed or repeated run reproduces byte for byte; `timing`
        (tokens/s, MFU: measured, so never the same twice) to `timings.jsonl`, with the record's split, stage and
        step. Both go to TensorBoard."""
        if not self.enabled:
            return
        lines = [(METRICS_FILE, record)]
        if timing:
            lines.append((TIMINGS_FILE, {key: record[key] for key in ("split", "stage", "step")} | timing))
        for name, line in lines:
            self._files[name].write(json.dumps(line) + "\n")
            self._files[name].flush()
            for key, value in line.items():
                if key in ("step", "split"):
                    continue
                tags = ({f"{key}/{i:02d}": v for i, v in enumerate(value)} if isinstance(value, list)
                        else {key: value})  # a list (hidden_by_layer): one scalar per entry
                for tag, v in tags.items():
                    if isinstance(v, (int, float)) and math.isfinite(v):
                        self._writer.add_scalar(f"{record['split']}/{tag}", v, record["step"])

    def close(self) -> None:
        if self.enabled:
            for f in self._files.values():
                f.close()
            self._writer.close()


def write_report(run_dir: str, title: str) -> str:
    """`report.png`: KL (log scale) and top-1 agreement against training tokens, train and held-out; for a job of
    several stages each stage's own loss; for a Llamba the held-out hidden-state distance, per layer and summed.
    Dotted lines mark where a stage ends."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    stages = list(dict.fromkeys(r["stage"] for r in records if r["split"] == "train" and r.get("stage")))
    hidden = [r for r in records if r["split"] == "eval" and "hidden" in r]
    panels = (3 if len(stages) > 1 else 2) + bool(hidden)
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4), constrained_layout=True)
    ax_kl, ax_agree = axes[:2]
    for split, style in (("train", dict(alpha=0.6, lw=1)), ("eval", dict(marker="o", lw=2))):
        rows = [r for r in records if r["split"] == split and "kl" in r]
        if rows:
            tokens = [r["tokens"] for r in rows]
            ax_kl.plot(tokens, [r["kl"] for r in rows], label=split if split == "train" else "held-out", **style)
            ax_agree.plot(tokens, [100 * r["agreement"] for r in rows], label=split, **style)
    ax_kl.set(xlabel="training tokens", ylabel="KL(teacher || student), nats/token", yscale="log")
    ax_agree.set(xlabel="training tokens", ylabel="top-1 agreement with the teacher (%)")
    if hidden:  # how far each block is from the teacher's layer, held-out: what judges stages 1 and 2
        ax, tokens = axes[-1], [r["tokens"] for r in hidden]
        by_layer = list(zip(*(r["hidden_by_layer"] for r in hidden)))
        colors = plt.cm.viridis([i / max(len(by_layer) - 1, 1) for i in range(len(by_layer))])
        for i, (values, color) in enumerate(zip(by_layer, colors)):
            ax.plot(tokens, values, color=color, lw=0.8, alpha=0.8, label="each layer (dark: first)" if i == 0 else None)
        ax.plot(tokens, [r["hidden"] for r in hidden], "k-o", lw=2, label="sum over layers")
        ax.set(xlabel="training tokens", ylabel="held-out ||block(u) - teacher layer(u)|| per token", yscale="log")
    if len(stages) > 1:
        for stage in stages:
            rows = [r for r in records if r["split"] == "train" and r.get("stage") == stage]
            axes[2].plot([r["tokens"] for r in rows], [r["loss"] for r in rows], label=stage)
        axes[2].set(xlabel="training tokens", ylabel="the stage's own loss", yscale="log")
        ends = [max(r["tokens"] for r in records if r["split"] == "train" and r.get("stage") == s) for s in stages]
        for ax in axes:
            for end in ends[:-1]:
                ax.axvline(end, color="gray", ls=":", lw=1)
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    path = os.path.join(run_dir, REPORT_FILE)
    with atomic_file(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)
    return path
