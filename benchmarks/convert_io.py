"""Conversion speed and memory on a synthetic sharded Orion checkpoint: import -> convert (absorb) -> export.

    python -m benchmarks.convert_io [--size 2GB] [--shards 4] [--workdir DIR]

Writes a random Orion-layout checkpoint of about `--size` in bf16 (several safetensors shards, an index, config.json
and the embedded teacher's tokenizer) under a temporary directory, then runs kept_jax's own conversion functions
phase by phase in this process:

  import    bridge.hf_import.load_hf_checkpoint (validated params, bf16)
  calibrate the teacher's norm-input statistics on 4k tokens (compute, not I/O; reported apart)
  convert   build_mapping("absorb") + run_mapping: every target tensor from the source files (float64 math), bf16
  export    bridge.hf_export.write_weights into a sharded Hugging Face Llama directory

and reports each phase's MB/s (checkpoint bytes / seconds) and the process's resident memory: at the start, each
phase's peak (sampled every 5 ms) and the process's lifetime peak (`resource.getrusage`, or the largest sample when higher), against the target
1.25 x checkpoint + 300 MB. The layout keeps Orion-14B's proportions (hidden 2048, ffn 2.75 x, 128-wide heads) with
a 32k vocabulary so that no single tensor is a larger share of the checkpoint than Orion-14B's head is. The
conversion's KL evaluation (`python -m kept_jax.convert`) is not part of the phases: it holds both models.
"""

from __future__ import annotations

import argparse
import gc
import os
import resource
import shutil
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


def synthetic_config(size_bytes: int) -> LlamaConfig:
    """An Orion layout with as many layers as make about `size_bytes` of bf16 weights."""
    def layout(layers: int) -> LlamaConfig:
        return LlamaConfig(architecture="orion", vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                           num_hidden_layers=layers, num_attention_heads=16, num_key_value_heads=16, head_dim=128,
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


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """The largest resident set seen while the block runs, sampled every 5 ms on a thread."""

    def __enter__(self):
        self.peak, self._stop = rss(), threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        self.start = time.perf_counter()
        return self

    def _sample(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, rss())

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss())


def run(size_bytes: int, shards: int, workdir: str) -> dict:
    from bridge.hf_export import write_config, write_weights
    from bridge.hf_import import load_hf_checkpoint
    from kept_jax import corpus
    from kept_jax.convert import run_mapping, source_tensor_reader, token_rows
    from kept_jax.evaluate import batches_of
    from kept_jax.mapping import build_mapping, calibrate, outer_sites, target_config
    from kept_jax.models import build_model
    from kept_jax.tokenizer import load_tokenizer

    import jax

    jax.numpy.zeros(1).block_until_ready()  # the runtime's own memory belongs to the baseline, not to import
    config = synthetic_config(size_bytes)
    source, out = os.path.join(workdir, "orion"), os.path.join(workdir, "llama")
    start = time.perf_counter()
    ckpt_bytes = write_checkpoint(source, config, shards)
    files = sorted(n for n in os.listdir(source) if n.endswith(".safetensors"))
    print(f"synthetic Orion: {config.num_hidden_layers} layers x hidden {config.hidden_size}, vocab "
          f"{config.vocab_size}; {ckpt_bytes / MB:,.0f} MB bf16 in {len(files)} shards "
          f"(written in {time.perf_counter() - start:.0f} s)", flush=True)
    gc.collect()
    phases, baseline = {}, rss()

    def report(name, probe, extra=""):
        phases[name] = {"seconds": round(probe.seconds, 2), "MB_per_s": round(ckpt_bytes / MB / probe.seconds, 1),
                        "peak_rss_MB": round(probe.peak / MB, 1)}
        print(f"{name:>9}: {probe.seconds:6.1f} s, {ckpt_bytes / MB / probe.seconds:7.1f} MB/s, peak RSS "
              f"{probe.peak / MB:,.0f} MB{extra}", flush=True)

    with PeakRSS() as probe:
        teacher_config, teacher_params, _ = load_hf_checkpoint(source, compute_dtype="bfloat16", param_dtype="bfloat16")
    report("import", probe)

    with PeakRSS() as probe:
        tokenizer = load_tokenizer(source, "orion")
        rows = token_rows(corpus.HELDOUT, tokenizer, teacher_config.eos_token_id, CALIB_SEQ, 0, CALIB_TOKENS)
        stats = calibrate(build_model(teacher_config), teacher_params, batches_of(rows, 8),
                          outer_sites=outer_sites("absorb", teacher_config))
    report("calibrate", probe, f" ({rows.size:,} tokens; MB/s is not meaningful here)")
    del teacher_params  # the mapping reads the source tensors from disk
    gc.collect()

    with PeakRSS() as probe:
        mapping = build_mapping("absorb", teacher_config, stats)
        tensors, _ = run_mapping(mapping, source_tensor_reader(source), "bfloat16")
    report("convert", probe)

    with PeakRSS() as probe:
        student_config = target_config(teacher_config, "absorb")
        os.makedirs(out)
        write_config(out, student_config.replace(dtype="bfloat16"))
        write_weights(out, [(s.hf_name, s.hf_shape) for s in student_config.tensor_table()], "bfloat16",
                      tensors.__getitem__, -(-ckpt_bytes // shards) + 1)
    report("export", probe)

    # The kernel's high-water mark (kilobytes on Linux) is updated lazily; the samples can see a higher peak.
    lifetime_peak = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                        max(p["peak_rss_MB"] for p in phases.values()) * MB)
    target = 1.25 * ckpt_bytes + 300 * MB
    print(f"peak RSS {lifetime_peak / MB:,.0f} MB = {lifetime_peak / ckpt_bytes:.2f} x the checkpoint "
          f"(target {target / MB:,.0f} MB = 1.25 x + 300 MB: {'met' if lifetime_peak <= target else 'NOT met'}); "
          f"{baseline / MB:,.0f} MB before import", flush=True)
    return {"checkpoint_MB": round(ckpt_bytes / MB, 1), "shards": len(files), "layers": config.num_hidden_layers,
            "phases": phases, "baseline_rss_MB": round(baseline / MB, 1), "peak_rss_MB": round(lifetime_peak / MB, 1),
            "peak_over_checkpoint": round(lifetime_peak / ckpt_bytes, 3), "target_MB": round(target / MB, 1),
            "target_met": lifetime_peak <= target}


def main(argv=None) -> int:
    from kept_jax.dry_run import parse_memory

    p = argparse.ArgumentParser(prog="python -m benchmarks.convert_io", description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="2GB", help="checkpoint size in bf16, e.g. 2GB or 500MB")
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--workdir", help="where to write the checkpoints (default: a temporary directory, removed after)")
    p.add_argument("--no-save", action="store_true", help="do not write the JSON result")
    args = p.parse_args(argv)
    size = parse_memory(args.size)
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
