"""Decode speed and memory against context length and batch size: a Llama, a Llamba and Mamba-2/attention hybrids
of the same width and depth, side by side in one run, and Transformers' own `generate` on the same Llama shape as the
baseline.

    python -m benchmarks.generate [--shapes 1b|smollm2-135m] [--layers 2] [--contexts 1024,2048,4096,8192,16384,32768]
                                  [--batches 1,4,16,64,256] [--batch-context 1024] [--steps 32] [--reps 3]
                                  [--dtype float32] [--hf-max-context 8192] [--fit-memory 80GiB]
                                  [--fit-contexts 8192,32768] [--fit-dtype bfloat16] [--no-save]
                                  [--precisions fp32,bf16,int8,int4] [--group-size 64]
                                  [--hybrids every:4,none] [--models llama,llamba,hybrid]
                                  [--limits 128,8192] [--tag T]

Shapes (random weights): `1b`, `configs/models/llama-3.2-1b-instruct.json` and `configs/models/llamba-1b.json`
(d_model 2048, 32 heads x 64, MLP 8192, vocabulary 128,256, tied), cut to `--layers` layers (default 4; the full 16
on a GPU); `smollm2-135m`, the real SmolLM2-135M-Instruct's shape and the Llamba `convert --to llamba` makes of it
(`configs/models/smollm2-135m-instruct.json`, `llamba-smollm2-135m.json`: d_model 576, 9 heads x 64, MLP 1536,
vocabulary 49,152, tied), at full depth (30 layers) by default. Hybrids (`--hybrids`, attention-layer specs as
`convert --to hybrid --attention-layers` takes them; `none` is a pure Mamba-2 model) have the shape `convert --to
hybrid` gives the Llama (Mamba-2 with expand 2, heads of head_dim, d_state = head_dim, one B/C group), each named
`hybrid <spec>`.

Batch 1 is also timed streamed, as `python -m kept_jax.generate` streams one row: the same compiled loop called for
one step at a time, the ids fetched to the host and the text so far decoded after each token (a stand-in decoder
that writes the ids as text, so that no tokenizer file is needed); its tokens/s is the wall time a user waits.

kept_jax (both models): the compiled decode loop that `python -m kept_jax.generate` runs (`Generator.advance`, a
`lax.while_loop` of one-token steps, the state donated), timed for `--steps` tokens per row from a state that
already holds `context` tokens (a KV cache of context + steps positions, or the recurrent state, filled with random
values: decode cost does not depend on them, and a 32K prefill per point would cost more than the measurement);
median of `--reps`. Memory: XLA's `memory_analysis()` of that compiled loop (arguments + outputs + temporaries -
aliased), i.e. parameters + state + workspace. Transformers: `model.generate` (greedy, SDPA attention, its dynamic
cache) after a real prefill of `context` tokens; decode tokens/s from the time between the first and the last
generated token (a logits processor records each step), up to `--hf-max-context` (a CPU prefill past it takes
minutes); its memory is parameters + the final KV cache.

Precision (`--precisions`, default fp32 alone): each kept_jax point is measured for each, side by side in one run.
bf16 casts the parameters and computes in bf16; int8 and int4 are `generate --quantize` (kept_jax/quantize.py: the
linear kernels quantized, dequantized one layer at a time next to their matmul; the rest at --dtype). Each point
records the parameters' bytes (`weight_MiB`). Quality against fp32 is benchmarks/quality.py.

Decoding under a limit (`--limits`): batch 1, a 32-token prompt, `--steps` tokens decoded by the prefill and the
loop `generate` compiles for each `--max-new-tokens` limit, with the KV cache growing from 256 positions (what
`generate` does) beside one of prompt + limit positions from the start (what it did before 2026-12-06): the cost of a
step follows the tokens so far only when the first keeps level as the limit grows.

Largest batch: the same decode loop compiled (not run) for the full-depth model in `--fit-dtype`: its compiled
memory is affine in the batch, so two compilations give the slope, the largest batch within `--fit-memory` follows,
and a third compilation at that batch confirms it. Writes `benchmarks/results/generate-<device>-<date>.json` and
a plot beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import environment, write_result
from kept_jax.config import ModelConfig
from kept_jax.decoding import FIRST_CACHE_LENGTH, DecodeState, Generator, cache_axis
from kept_jax.memory import GIB, compiled_peak_bytes, parse_size
from kept_jax.models import build_model, config_from_hf
from kept_jax.quantize import DEFAULT_GROUP_SIZE, SCHEMES, quantize_params, weight_bytes

MODELS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "models")
PRECISIONS = ("fp32", "bf16", *SCHEMES)
LIMIT_PROMPT = 32  # the prompt of the --limits measurement
SHAPES = {"1b": {"llama": "llama-3.2-1b-instruct.json", "llamba": "llamba-1b.json", "layers": 4},
          "smollm2-135m": {"llama": "smollm2-135m-instruct.json", "llamba": "llamba-smollm2-135m.json", "layers": None}}


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.generate", description=__doc__.split("\n\n")[0])
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    p.add_argument("--shapes", default="1b", choices=tuple(SHAPES))
    p.add_argument("--layers", type=int, help="cut the models to this many layers (default: 4 for 1b, all for "
                                             "smollm2-135m)")
    p.add_argument("--contexts", type=ints, default=[1024, 2048, 4096, 8192, 16384, 32768])
    p.add_argument("--batches", type=ints, default=[1, 4, 16, 64, 256])
    p.add_argument("--batch-context", type=int, default=4096, help="context of the batch sweep")
    p.add_argument("--steps", type=int, default=32, help="decode steps timed per point (fewer for large batches)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--hf-max-context", type=int, default=8192, help="Transformers baseline up to this context")
    p.add_argument("--hf-max-batch", type=int, default=4, help="and up to this batch (its prefill is real)")
    p.add_argument("--memory-limit", default="16GiB", help="points whose compiled loop and state exceed it are "
                                                          "compiled and reported, not run")
    p.add_argument("--fit-memory", default="80GiB", help="memory for the largest-batch figure ('' to skip)")
    p.add_argument("--fit-contexts", type=ints, default=[8192, 32768])
    p.add_argument("--fit-dtype", default="float32", choices=("float32", "bfloat16"),
                   help="the precision of the largest-batch figure (bfloat16 halves the KV cache)")
    p.add_argument("--precisions", type=lambda s: s.split(","), default=["fp32"],
                   help=f"comma-separated, of {', '.join(PRECISIONS)}")
    p.add_argument("--group-size", type=int, default=DEFAULT_GROUP_SIZE, help="int4's group size")
    p.add_argument("--models", type=lambda s: s.split(","), default=["llama", "llamba", "hybrid"],
                   help="which of llama, llamba, hybrid to measure")
    p.add_argument("--hybrids", type=lambda s: s.split(","), default=["every:4"],
                   help="the hybrids' attention layers, one spec each (every:4, 0,8,16, none, ...)")
    p.add_argument("--limits", type=ints, default=[128, 8192],
                   help="--max-new-tokens limits decoded at beside each other (batch 1, a 32-token prompt; '' to skip)")
    p.add_argument("--tag", help="appended to the result's file name, to keep runs of one day apart")
    p.add_argument("--no-save", action="store_true")
    args = p.parse_args(argv)
    unknown = [x for x in args.precisions if x not in PRECISIONS]
    if unknown:
        p.error(f"unknown precision {unknown[0]!r}; choose from {', '.join(PRECISIONS)}")
    return args


def at_precision(config: ModelConfig, params, precision: str, group_size: int):
    """The model and its parameters at `precision`: bf16 casts them and computes in bf16; int8 and int4 quantize
    the linear kernels as `generate --quantize` does; fp32 leaves them as they are."""
    if precision == "bf16":
        return (config.replace(compute_dtype="bfloat16", param_dtype="bfloat16"),
                jax.tree.map(lambda x: x.astype(jnp.bfloat16), params))
    if precision in SCHEMES:
        return config, quantize_params(config, params, precision, group_size)
    return config, params


def model_config(shapes: str, name: str, layers: int | None, dtype: str) -> ModelConfig:
    """The shape of model `name`: llama, llamba, or `hybrid <spec>` (the Llama converted with those attention
    layers), cut to `layers` layers."""
    runtime = dict(compute_dtype=dtype, param_dtype=dtype, scan_layers=False)
    if name.startswith("hybrid"):
        from kept_jax.mapping.hybrid_init import parse_attention_layers
        from kept_jax.mapping.students import student_config

        llama = model_config(shapes, "llama", layers, dtype)
        kept = parse_attention_layers(name.split(" ", 1)[1], llama.num_hidden_layers)
        return student_config("hybrid", llama, "mamba2", None, kept).replace(**runtime)
    with open(os.path.join(MODELS, SHAPES[shapes][name]), encoding="utf-8") as f:
        hf = json.load(f)
    config = config_from_hf(hf, **runtime)
    if name == "llama":  # room for the longest context measured; the rope is the same function of position
        config = config.replace(max_position_embeddings=max(config.max_position_embeddings, 2**17))
    return config if layers is None else config.replace(num_hidden_layers=layers)


def random_params(config: ModelConfig):
    model = build_model(config)
    import flax

    return flax.core.meta.unbox(jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])


def decode_state(config: ModelConfig, batch: int, context: int, steps: int, abstract: bool = False) -> DecodeState:
    """A state `context` tokens into every row, with room for `steps` more (random cache or state values)."""
    def build():
        cache = config.empty_cache(batch, context + steps)
        keys = jax.random.split(jax.random.key(1), len(jax.tree.leaves(cache)))
        leaves = [jax.random.normal(k, x.shape, x.dtype) * 0.5 for k, x in zip(keys, jax.tree.leaves(cache))]
        cache = jax.tree.unflatten(jax.tree.structure(cache), leaves)
        tokens = jnp.zeros((batch, steps + 1), jnp.int32)
        return DecodeState(cache, tokens, jnp.full((batch,), context, jnp.int32), jnp.zeros((batch,), bool),
                           jnp.int32(1), jax.random.key(2))
    return jax.eval_shape(build) if abstract else jax.jit(build)()


def compiled_loop(generator: Generator, params, state):
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), (params, state))
    return jax.jit(generator.advance, donate_argnums=1).lower(*abstract, jnp.int32(0)).compile()


def state_bytes(config: ModelConfig, batch: int, length: int) -> int:
    cache = jax.eval_shape(lambda: config.empty_cache(batch, length))
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache))


def measure_jax(name, config, params, batch, context, steps, reps, limit, compiled) -> dict:
    """The compiled loop's memory; then, when it fits in `limit` bytes, its median time over `reps` runs, each from
    a fresh state (the loop consumes its state)."""
    peak, state_size = compiled_peak_bytes(compiled), state_bytes(config, batch, context + steps)
    row = {"model": name, "impl": "kept_jax", "context": context, "batch": batch, "steps": steps,
           "peak_GiB": peak / GIB, "state_GiB": state_size / GIB}
    if peak + state_size > limit:
        return {**row, "fits": False}  # compiled, not run: it and a fresh state exceed --memory-limit
    times = []
    for _ in range(reps + 1):  # the first is a warm-up
        state = jax.block_until_ready(decode_state(config, batch, context, steps))
        began = time.perf_counter()
        out = jax.block_until_ready(compiled(params, state, np.int32(steps)))
        times.append(time.perf_counter() - began)
        assert int(out.count) == steps + 1
        del state, out
    seconds = float(np.median(times[1:]))
    return {**row, "fits": True, "tokens_per_s": batch * steps / seconds, "ms_per_step": 1000 * seconds / steps,
            "times_s": times[1:]}


def measure_limits(name, config, params, limits, steps, reps) -> list[dict]:
    """Batch 1, a prompt of LIMIT_PROMPT tokens, `steps` tokens decoded (the prefill, then the loop as generate runs
    it) under each --max-new-tokens limit: the KV cache growing from FIRST_CACHE_LENGTH, what generate does, beside
    one of prompt + limit positions from the start, what it did before 2026-12-06. Median of `reps`."""
    prompt, lengths = np.arange(1, LIMIT_PROMPT + 1, dtype=np.int32)[None], np.asarray([LIMIT_PROMPT], np.int32)
    rows = []
    for limit in limits:
        for first in (FIRST_CACHE_LENGTH, None):
            generator = Generator(config, first_cache_length=first)
            start, advance = generator.compile(params, 1, LIMIT_PROMPT, limit)
            times = []
            for _ in range(reps + 1):  # the first is a warm-up
                state = jax.block_until_ready(start(params, prompt, lengths, jax.random.key(0)))
                began = time.perf_counter()
                out = jax.block_until_ready(advance(params, state, np.int32(steps)))
                times.append(time.perf_counter() - began)
                assert int(out.count) == steps + 1
            rows.append({"model": name, "impl": "kept_jax", "limit": limit, "prompt": LIMIT_PROMPT, "steps": steps,
                         "cache": "growing" if first else "at the limit",
                         "cache_length": generator.cache_lengths(LIMIT_PROMPT, limit)[0],
                         "tokens_per_s": steps / float(np.median(times[1:])), "times_s": times[1:]})
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "times_s"}), flush=True)
    return rows


class IdsAsText:
    """The stand-in detokenizer of the streamed measurement: the ids written out as text."""

    @staticmethod
    def decode(ids):
        return " ".join(map(str, ids))


def measure_streamed(name, config, params, context, steps, reps, compiled) -> dict:
    """Batch 1 as the command line streams it: `steps` calls of the one-step loop, each followed by the host fetch
    and the decode of the text so far (`Streamer.on_step`, its output discarded); wall time, median of `reps`."""
    import contextlib
    import io

    from kept_jax.generate import Streamer

    times = []
    for _ in range(reps + 1):
        state = jax.block_until_ready(decode_state(config, 1, context, steps))
        stream = Streamer(IdsAsText(), ())
        with contextlib.redirect_stdout(io.StringIO()):
            began = time.perf_counter()
            for _ in range(steps):
                state = compiled(params, state, np.int32(1))
                stream.on_step(np.asarray(state.tokens), int(state.count))
            times.append(time.perf_counter() - began)
        del state
    seconds = float(np.median(times[1:]))
    return {"model": name, "impl": "kept_jax streamed", "context": context, "batch": 1, "steps": steps,
            "tokens_per_s": steps / seconds, "ms_per_step": 1000 * seconds / steps, "times_s": times[1:]}


def measure_transformers(config, batch, context, steps) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, LogitsProcessor, LogitsProcessorList

    hf = dict(config.to_hf_dict())
    for key in ("architectures", "model_type", "rope_scaling", "rope_theta", "dtype", "torch_dtype"):
        hf.pop(key, None)
    torch.manual_seed(0)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[config.compute_dtype]
    model = LlamaForCausalLM(LlamaConfig(**hf, attn_implementation="sdpa")).to(dtype).eval()

    class Stamp(LogitsProcessor):
        def __init__(self):
            self.times = []

        def __call__(self, input_ids, scores):
            self.times.append(time.perf_counter())
            return scores

    stamp = Stamp()
    prompt = torch.randint(0, config.vocab_size, (batch, context))
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=steps + 1, min_new_tokens=steps + 1, do_sample=False,
                             logits_processor=LogitsProcessorList([stamp]), return_dict_in_generate=True,
                             pad_token_id=0)
    seconds = stamp.times[-1] - stamp.times[0]
    layers = out.past_key_values.layers
    cache = sum(t.numel() * t.element_size() for layer in layers for t in (layer.keys, layer.values))
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"model": "llama", "impl": "transformers", "context": context, "batch": batch, "steps": steps,
            "tokens_per_s": batch * steps / seconds, "ms_per_step": 1000 * seconds / steps,
            "peak_GiB": (cache + params) / GIB, "state_GiB": cache / GIB}


def largest_batch(shapes: str, name: str, context: int, dtype: str, budget: int) -> dict:
    """Compile (not run) the full-depth decode loop: memory is affine in the batch; two points give the line."""
    config = model_config(shapes, name, None, dtype)
    params = jax.eval_shape(lambda: random_params(config))
    generator = Generator(config)

    def bytes_at(batch):
        state = decode_state(config, batch, context, 1, abstract=True)
        return compiled_peak_bytes(compiled_loop(generator, params, state))

    one, two = bytes_at(8), bytes_at(16)
    per_row = (two - one) / 8
    fixed = one - 8 * per_row
    batch = max(int((budget - fixed) // per_row), 0)
    confirmed = bytes_at(batch) if batch else None
    while batch and confirmed > budget:  # the line is a model: step down until the compiled figure fits
        batch = int(batch * 0.95)
        confirmed = bytes_at(batch) if batch else None
    return {"model": name, "context": context, "dtype": dtype, "layers": config.num_hidden_layers,
            "budget_GiB": budget / GIB, "fixed_GiB": fixed / GIB, "per_row_MiB": per_row / 2**20,
            "largest_batch": batch, "compiled_GiB_at_largest": None if confirmed is None else confirmed / GIB}


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    sweeps = (("context", 1, "tokens_per_s", "decode tokens/s (batch 1)"),
              ("context", 1, "peak_GiB", "memory, GiB (batch 1)"),
              ("batch", result["settings"]["batch_context"], "tokens_per_s", "decode tokens/s vs batch"))
    for ax, (axis, fixed, metric, title) in zip(axes, sweeps):
        other = "batch" if axis == "context" else "context"
        for label, rows in _series(result["points"], axis, other, fixed, metric).items():
            ax.plot([r[axis] for r in rows], [r[metric] for r in rows], marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(axis if axis == "batch" else "context (tokens)")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    env = result["environment"]
    fig.suptitle(f"Decode, {result['settings']['shapes']} shapes x {result['settings']['layers']} layers, "
                 f"{result['settings']['dtype']}, "
                 f"{env['device']} ({env['cpu_count']} cores), {env['date']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _label(row: dict) -> str:
    """"llama (kept_jax)", with the precision when it is not fp32 ("llamba (kept_jax, int4)")."""
    precision = row.get("precision", "fp32")
    return f"{row['model']} ({row['impl']}{'' if precision == 'fp32' else ', ' + precision})"


def _series(points, axis, other, fixed, metric) -> dict:
    series = {}
    for r in sorted((r for r in points if r.get("sweep") == axis), key=lambda r: r[axis]):
        if r[other] == fixed and metric in r:
            series.setdefault(_label(r), []).append(r)
    return series


def run(args) -> dict:
    points = []
    limit = parse_size(args.memory_limit, "--memory-limit")
    layers = args.layers or SHAPES[args.shapes]["layers"]
    names = [n for n in ("llama", "llamba") if n in args.models]
    names += [f"hybrid {spec}" for spec in args.hybrids] if "hybrid" in args.models else []
    for name in names:
        base = model_config(args.shapes, name, layers, args.dtype)
        base_params = random_params(base)
        for precision in args.precisions:
            config, params = at_precision(base, base_params, precision, args.group_size)
            params = Generator.prepare(params)
            tag = {"precision": precision, "weight_MiB": weight_bytes(params) / 2**20}
            for sweep, sizes in (("context", args.contexts), ("batch", args.batches)):
                for size in sizes:
                    batch, context = (1, size) if sweep == "context" else (size, args.batch_context)
                    steps = max(4, min(args.steps, 512 // batch))
                    compiled = compiled_loop(Generator(config), params,
                                             decode_state(config, batch, context, steps, abstract=True))
                    rows = [measure_jax(name, config, params, batch, context, steps, args.reps, limit, compiled)]
                    if sweep == "context" and rows[0]["fits"] and precision == args.precisions[0]:
                        rows.append(measure_streamed(name, config, params, context, steps, args.reps, compiled))
                    for row in rows:
                        points.append({**row, **tag, "sweep": sweep})
                        print(json.dumps({k: v for k, v in points[-1].items() if k != "times_s"}), flush=True)
            if args.limits and cache_axis(config) is not None:  # a recurrent state has no length to grow
                points += [{**row, **tag, "sweep": "limit"}
                           for row in measure_limits(name, config, params, args.limits, args.steps, args.reps)]
            del params
        del base_params
    config = model_config(args.shapes, "llama", layers, args.dtype)
    for context in [c for c in args.contexts if c <= args.hf_max_context]:
        row = measure_transformers(config, 1, context, args.steps)
        points.append({**row, "sweep": "context"})
        print(json.dumps(row), flush=True)
    for batch in [b for b in args.batches if b <= args.hf_max_batch]:
        steps = max(4, min(args.steps, 512 // batch))
        row = measure_transformers(config, batch, args.batch_context, steps)
        points.append({**row, "sweep": "batch"})
        print(json.dumps(row), flush=True)
    fits = []
    if args.fit_memory:
        budget = parse_size(args.fit_memory, "--fit-memory")
        for context in args.fit_contexts:
            for name in names:
                fits.append(largest_batch(args.shapes, name, context, args.fit_dtype, budget))
                print(json.dumps(fits[-1]), flush=True)
    result = {"benchmark": "generate", "environment": environment(), "settings": {
        "shapes": args.shapes, "layers": config.num_hidden_layers, "dtype": args.dtype, "steps": args.steps,
        "reps": args.reps,
        "batch_context": args.batch_context, "hf_max_context": args.hf_max_context,
        "hf_max_batch": args.hf_max_batch, "memory_limit": args.memory_limit, "precisions": args.precisions,
        "group_size": args.group_size, "models": names},
        "points": points, "largest_batch": fits}
    result["summary"] = summarize(points)
    if not args.no_save:
        stem = "generate" if args.shapes == "1b" else f"generate-{args.shapes}"
        path = write_result(stem + (f"-{args.tag}" if args.tag else ""), result)
        plot(result, path.removesuffix(".json") + ".png")
        print(f"wrote {path} and its plot", flush=True)
    print(json.dumps(result["summary"], indent=1))
    return result


def summarize(points) -> dict:
    """Batch-1 decode tokens/s by context per model (streamed too), each other model's speedup over kept_jax's Llama,
    each model's change from the shortest to the longest context, and tokens/s under each --max-new-tokens limit
    with the cache growing and at the limit."""
    by = {}
    for r in points:
        if r["sweep"] == "context" and "tokens_per_s" in r:
            by.setdefault(_label(r), {})[r["context"]] = r["tokens_per_s"]
    llama = by.get("llama (kept_jax)", {})
    out = {"tokens_per_s": by, "over_llama": {
        label: {c: series[c] / llama[c] for c in sorted(llama) if c in series}
        for label, series in by.items() if label.endswith("(kept_jax)") and label != "llama (kept_jax)"}}
    for label, series in by.items():
        contexts = sorted(series)
        out.setdefault("longest_over_shortest", {})[label] = series[contexts[-1]] / series[contexts[0]]
    for r in points:
        if r["sweep"] == "limit":
            out.setdefault("limits", {}).setdefault(_label(r), {})[f"{r['limit']}, {r['cache']}"] = r["tokens_per_s"]
    return out


if __name__ == "__main__":
    run(parse_args())
