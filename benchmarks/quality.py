"""What a lower precision costs in quality: each precision of a model against the same model in fp32, on held-out
text, and for a Llamba also its cartesia-mlx exports as that runtime computes them.

    python -m benchmarks.quality --model DIR_OR_GGUF [--model ...] [--precisions fp32,bf16,int8,int4]
                                 [--group-size 64] [--tokens 16384] [--seq-len 512] [--mlx-bits 4,8,16]
                                 [--tag T] [--no-save]

Per model and precision (benchmarks/generate.py's `at_precision`: bf16 casts and computes in bf16, int8/int4 are
`generate --quantize`): KL(fp32 || precision) per token, top-1 agreement with fp32, both perplexities
(kept_jax.metrics, the one definition of each), and the parameters' bytes. For a Llamba, `--mlx-bits`: `convert --to
mlx` at each bit width (groups of `--group-size`), loaded by cartesia-mlx and run there in fp32 (so that only the
stored weights differ), scored the same way against kept_jax's fp32 logits. cartesia-mlx on Linux needs its three
Metal kernels replaced: tests/cartesia_metal_substitute.py is used when `cartesia_metal` does not import.

The held-out text is the embedded corpus's held-out split (Python documentation). Writes
`benchmarks/results/quality-<model>[-g<group size>][-<tag>]-<device>-<date>.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import environment, write_result
from benchmarks.generate import PRECISIONS, at_precision
from kept_jax.quantize import DEFAULT_GROUP_SIZE, weight_bytes


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.quality", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", action="append", required=True, help="a checkpoint directory or GGUF file (repeatable)")
    p.add_argument("--precisions", type=lambda s: s.split(","), default=list(PRECISIONS))
    p.add_argument("--group-size", type=int, default=DEFAULT_GROUP_SIZE)
    p.add_argument("--tokens", type=int, default=16384, help="held-out tokens scored")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--mlx-bits", type=lambda s: [int(x) for x in s.split(",") if x], default=[4, 8, 16],
                   help="a Llamba's cartesia-mlx exports to score ('' for none)")
    p.add_argument("--tag", help="appended to the result's file name, to keep runs of one model apart")
    p.add_argument("--no-save", action="store_true")
    return p.parse_args(argv)


def held_out(path: str, config, tokens: int, seq_len: int) -> np.ndarray:
    from bridge.checkpoint import load_checkpoint_tokenizer
    from kept_jax import corpus
    from kept_jax.convert import held_rows

    tokenizer = load_checkpoint_tokenizer(path, config.architecture)
    return held_rows(corpus.HELDOUT, False, tokenizer, config, seq_len, 0, tokens, "--eval-ids")


def precision_rows(config, params, rows: np.ndarray, precisions, group_size: int, batch: int) -> list[dict]:
    from kept_jax.metrics import batches_of, compare
    from kept_jax.models import build_model

    teacher = build_model(config)
    out = []
    for precision in precisions:
        student_config, student_params = at_precision(config, params, precision, group_size)
        metrics = compare(teacher, params, build_model(student_config), student_params, batches_of(rows, batch))
        out.append({"impl": "kept_jax", "precision": precision, "weight_MiB": weight_bytes(student_params) / 2**20,
                    **_scores(metrics)})
        print(json.dumps(out[-1]), flush=True)
    return out


def _scores(metrics: dict) -> dict:
    return {k: metrics[k] for k in ("kl", "agreement", "teacher_ppl", "student_ppl", "tokens")}


def runtime():
    """cartesia_mlx, with pure-MLX stand-ins for its Metal kernels where they do not import (Linux)."""
    try:
        import cartesia_metal  # noqa: F401
    except ImportError:
        from tests import cartesia_metal_substitute

        cartesia_metal_substitute.install()
    import cartesia_mlx

    return cartesia_mlx


def mlx_rows(path: str, config, params, rows: np.ndarray, bits_list, group_size: int, batch: int) -> list[dict]:
    """Each `convert --to mlx` export scored by cartesia-mlx against kept_jax's fp32 logits."""
    import mlx.core as mx

    from kept_jax.convert import main as convert
    from kept_jax.metrics import score, summarize
    from kept_jax.models import build_model

    model = build_model(config)
    forward = jax.jit(lambda p, t: model.apply({"params": p}, t))
    out = []
    for bits in bits_list:
        with tempfile.TemporaryDirectory() as tmp:
            target = os.path.join(tmp, "mlx")
            flags = ["--group-size", str(group_size)] if bits != 16 else []
            assert convert(["--to", "mlx", "--bits", str(bits), *flags, "--source", path, "--out", target]) == 0
            weights = os.path.join(target, "model.safetensors")
            size = os.path.getsize(weights)
            student = runtime().from_pretrained(weights)
        student.set_dtype(mx.float32)
        totals: dict[str, float] = {}
        for i in range(0, len(rows), batch):
            tokens = rows[i:i + batch]
            hidden, _ = student.model(student.embedding.encode(mx.array(tokens)))
            theirs = np.array(student.head(hidden))[..., :config.vocab_size]
            ours = np.asarray(forward(params, jnp.asarray(tokens)))[..., :config.vocab_size]
            sums = score(jnp.asarray(ours), jnp.asarray(theirs), jnp.asarray(tokens))
            for key, value in jax.device_get(sums).items():
                totals[key] = totals.get(key, 0.0) + float(value)
        label = "bf16" if bits == 16 else f"{bits}-bit/{group_size}"
        out.append({"impl": "cartesia-mlx", "precision": label, "file_MiB": size / 2**20, **_scores(summarize(totals))})
        print(json.dumps(out[-1]), flush=True)
    return out


def run(args) -> dict:
    from bridge.checkpoint import load_checkpoint

    results = {}
    for path in args.model:
        config, params, _ = load_checkpoint(path, param_dtype="float32", compute_dtype="float32")
        rows = held_out(path, config, args.tokens, args.seq_len)
        points = precision_rows(config, params, rows, args.precisions, args.group_size, args.batch)
        if config.architecture == "llamba" and args.mlx_bits:
            points += mlx_rows(path, config, params, rows, args.mlx_bits, args.group_size, args.batch)
        name = os.path.basename(os.path.normpath(path)).removesuffix(".gguf")
        if name == "export":  # a training run's export: the run's name says more
            name = os.path.basename(os.path.dirname(os.path.normpath(path)))
        if args.group_size != DEFAULT_GROUP_SIZE:
            name += f"-g{args.group_size}"
        if args.tag:
            name += f"-{args.tag}"
        result = {"benchmark": "quality", "environment": environment(), "settings": {
            "model": path, "architecture": config.architecture, "tokens": int(rows.size), "seq_len": args.seq_len,
            "group_size": args.group_size, "heldout": "embedded corpus, held-out split"}, "points": points}
        if not args.no_save:
            print(f"wrote {write_result(f'quality-{name}', result)}", flush=True)
        results[path] = result
    return results


if __name__ == "__main__":
    run(parse_args())
