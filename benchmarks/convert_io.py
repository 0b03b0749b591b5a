"""Conversion speed and memory on a synthetic sharded Orion checkpoint: the whole `python -m kept_jax.convert` command.

    python -m benchmarks.convert_io [--size 2GB] [--shards 4] [--workdir DIR]

Writes a random Orion-layout checkpoint of about `--size` in bf16 (several safetensors shards, an index, config.json
and the embedded teacher's tokenizer) under a temporary directory, then runs

    python -m kept_jax.convert --source ORION --out LLAMA --no-eval --calib-tokens 4096 --max-shard-size ...

in a child process, whose phases (from its stderr and its report's `timings_s`) are

  calibrate the teacher read from its files one layer at a time (validated), run on 4k tokens, norm statistics
  export    every absorb rule run in float64 row blocks as the writer asks for its tensor, written to shards

and reports each phase's MB/s (checkpoint bytes / seconds) and the child's resident memory: each phase's peak
(sampled every 5 ms) and the whole command's peak (`getrusage(RUSAGE_CHILDREN)`, or the largest sample when
higher), from interpreter start to exit, against the target 1.25 x checkpoint + 300 MB. The layout keeps Orion-14B's
proportions (hidden 2048, ffn 2.75 x, 128-wide heads) with a 32k vocabulary so that no single tensor is a larger
share of the checkpoint than Orion-14B's head is. The KL evaluation (the command without --no-eval) holds both
models in memory and is not part of the measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

from benchmarks.common import environment, write_result
from kept_jax.models import LlamaConfig
from kept_jax.errors import KeptError, cli_entry

MB = 1e6
TINY_ORION = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "kept_jax", "assets", "tiny-orion")
CALIB_TOKENS, CALIB_SEQ = 4096, 256  # statistics only: this phase is not I/O, and is timed apart


def synthetic_config(size_bytes: int, hidden: int = 2048, vocab: int = 32000) -> LlamaConfig:
    """An Orion layout with as many layers as make about `size_bytes` of bf16 weights. A narrower `hidden` and
    `vocab` (same proportions) make a quick check of the benchmark itself, not a measurement."""
    def layout(layers: int) -> LlamaConfig:
        return LlamaConfig(architecture="orion", vocab_size=vocab, hidden_size=hidden,
                           intermediate_size=hidden * 11 // 4, num_hidden_layers=layers,
                           num_attention_heads=hidden // 128, num_key_value_heads=hidden // 128, head_dim=128,
                           max_position_embeddings=4096, dtype="bfloat16", bos_token_id=1, eos_token_id=2,
                           pad_token_id=0)

    per_layer = layout(2).num_params() - layout(1).num_params()
    fixed = layout(1).num_params() - per_layer
    return layout(max(1, round((size_bytes / 2 - fixed) / per_layer)))


def write_checkpoint(out_dir: str, config: LlamaConfig, shards: int) -> int:
    """Random weights (unit-scale activations, norms near 1) in `shards` safetensors files; returns the bytes."""
    from bridge.hf_export import write_config, write_weights
    from kept_jax.config import NUMPY_DTYPES

    rng = np.random.default_rng(0)
    shapes = {s.hf_name: s.hf_shape for s in config.tensor_table()}
    total = 2 * config.num_params()

    def get(name: str) -> np.ndarray:
        shape = shapes[name]
        if "norm" in name:
            values = (1.0 if name.endswith("weight") else 0.0) + 0.1 * rng.standard_normal(shape, np.float32)
        else:
            values = rng.standard_normal(shape, np.float32) / np.sqrt(shape[-1] if "embed" not in name else 1)
        return values.astype(NUMPY_DTYPES["bfloat16"])

    os.makedirs(out_dir)
    write_config(out_dir, config)
    write_weights(out_dir, list(shapes.items()), "bfloat16", get, -(-total // shards) + 1)
    for name in ("tokenizer.model", "tokenizer_config.json"):
        shutil.copy(os.path.join(TINY_ORION, name), out_dir)
    return total


def rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (FileNotFoundError, ProcessLookupError):
        return 0  # the child has exited


def run_command(argv: list[str]) -> tuple[int, list[tuple[float, int]], list[tuple[float, str]], str]:
    """Runs `argv`, sampling its resident memory every 5 ms and timestamping its stderr lines; returns the exit
    status, the samples, the lines and the whole stderr."""
    child = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    samples, lines, done = [], [], threading.Event()

    def sample():
        while not done.wait(0.005):
            samples.append((time.perf_counter(), rss(child.pid)))

    def read():
        for line in child.stderr:
            lines.append((time.perf_counter(), line.rstrip("\n")))

    threads = [threading.Thread(target=sample, daemon=True), threading.Thread(target=read, daemon=True)]
    for thread in threads:
        thread.start()
    status = child.wait()
    done.set()
    for thread in threads:
        thread.join()
    return status, samples, lines, "\n".join(line for _, line in lines)


def run(size_bytes: int, shards: int, workdir: str, **layout) -> dict:
    config = synthetic_config(size_bytes, **layout)
    source, out = os.path.join(workdir, "orion"), os.path.join(workdir, "llama")
    start = time.perf_counter()
    ckpt_bytes = write_checkpoint(source, config, shards)
    files = sorted(n for n in os.listdir(source) if n.endswith(".safetensors"))
    print(f"synthetic Orion: {config.num_hidden_layers} layers x hidden {config.hidden_size}, vocab "
          f"{config.vocab_size}; {ckpt_bytes / MB:,.0f} MB bf16 in {len(files)} shards "
          f"(written in {time.perf_counter() - start:.0f} s)", flush=True)
    argv = [sys.executable, "-m", "kept_jax.convert", "--source", source, "--out", out, "--no-eval",
            "--calib-tokens", str(CALIB_TOKENS), "--seq-len", str(CALIB_SEQ),
            "--max-shard-size", str(-(-ckpt_bytes // shards) + 1)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    status, samples, lines, stderr = run_command(argv)
    if status != 0:
        raise KeptError(f"the conversion failed (exit {status}):\n{stderr}")
    with open(os.path.join(out, "conversion_report.json"), encoding="utf-8") as f:
        timings = json.load(f)["timings_s"]

    # Each phase runs from its "name ..." line to the next phase's line (or the end).
    starts = [(t, line.split(" ")[0]) for t, line in lines if line.endswith(" ...")]
    phases = {}
    for k, (t0, name) in enumerate(starts):
        t1 = starts[k + 1][0] if k + 1 < len(starts) else float("inf")
        peak = max((r for t, r in samples if t0 <= t < t1), default=0)
        phases[name] = {"seconds": timings[name], "MB_per_s": round(ckpt_bytes / MB / timings[name], 1),
                        "peak_rss_MB": round(peak / MB, 1)}
        print(f"{name:>9}: {timings[name]:6.1f} s, {ckpt_bytes / MB / timings[name]:7.1f} MB/s, peak RSS "
              f"{peak / MB:,.0f} MB", flush=True)

    # ru_maxrss (kilobytes on Linux) is the largest child's lifetime peak; the samples can only see less, or miss
    # the exact moment, so the larger of the two is reported.
    rusage = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    peak = max(rusage * 1024 if rusage > before else 0, max(r for _, r in samples))
    target = 1.25 * ckpt_bytes + 300 * MB
    print(f"peak RSS of the whole command {peak / MB:,.0f} MB = {peak / ckpt_bytes:.2f} x the checkpoint "
          f"(target {target / MB:,.0f} MB = 1.25 x + 300 MB: {'met' if peak <= target else 'NOT met'}); "
          f"{samples[0][1] / MB if samples else 0:,.0f} MB at the first sample", flush=True)
    return {"checkpoint_MB": round(ckpt_bytes / MB, 1), "shards": len(files), "layers": config.num_hidden_layers,
            "command": " ".join(argv[1:]), "phases": phases, "peak_rss_MB": round(peak / MB, 1),
            "peak_over_checkpoint": round(peak / ckpt_bytes, 3), "target_MB": round(target / MB, 1),
            "target_met": peak <= target}


def main(argv=None) -> int:
    from kept_jax.memory import parse_size

    p = argparse.ArgumentParser(prog="python -m benchmarks.convert_io", description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="2GB", help="checkpoint size in bf16, e.g. 2GB or 500MB")
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--workdir", help="where to write the checkpoints (default: a temporary directory, removed after)")
    p.add_argument("--no-save", action="store_true", help="do not write the JSON result")
    args = p.parse_args(argv)
    size = parse_size(args.size, "--size")
    if args.shards < 1:
        raise KeptError("--shards must be at least 1")
    if args.workdir and os.path.exists(args.workdir):
        raise KeptError(f"--workdir {args.workdir} exists; give a new directory (the benchmark writes two checkpoints)")
    workdir = args.workdir or tempfile.mkdtemp(prefix="kept_jax_convert_io_")
    try:
        if args.workdir:
            os.makedirs(workdir)
        result = {"benchmark": "convert_io", "environment": environment(), "args": vars(args),
                  **run(size, args.shards, workdir)}
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    if not args.no_save:
        print(f"wrote {write_result(f'convert_io-{args.size}', result)}")
    return 0


if __name__ == "__main__":
    sys.exit(cli_entry(main)())
