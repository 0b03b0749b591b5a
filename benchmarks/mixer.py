"""Llamba's mixer in its three forms: time and compiled memory by sequence length, at the Llamba-1B layer shape.

    python -m benchmarks.mixer [--lengths 512,1024,2048,4096,8192] [--batch 1] [--reps 3] [--dtype float32]
                               [--memory-budget 12GiB] [--forms chunked,matrix,recurrent]
                               [--config configs/models/llamba-1b.json]

One Discrete-Mamba-2 mixer (in_proj, convolution, state-space mixing, gate, out_proj) of `--config` (by default
`configs/models/llamba-1b.json`: d_model 2048, 32 heads x 64, 32 B/C groups, d_state 64, chunk 128), on random
weights: the forward pass and the forward + backward pass (the gradient of a sum of the output with respect to the
weights and the input), each jitted, median of `--reps` runs after compilation and one warm-up. Memory is XLA's own
`memory_analysis()` of the compiled function (temporaries; arguments and outputs listed apart). A form whose
compiled temporaries exceed `--memory-budget` is compiled and reported but not run. Writes
`benchmarks/results/mixer-<device>-<date>.json`.
"""

from __future__ import annotations

import argparse
import json
import os

import jax
import jax.numpy as jnp

from benchmarks.common import environment, median_seconds, write_result
from kept_jax.memory import parse_size
from kept_jax.models import config_from_hf
from kept_jax.models.llamba import DiscreteMamba2
from kept_jax.models.ssd import FORMS as MIXER_FORMS

LLAMBA_1B = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "models",
                         "llamba-1b.json")
MIB = 2**20


def mixer_config(path: str, dtype: str, form: str):
    with open(path, encoding="utf-8") as f:
        return config_from_hf(json.load(f), compute_dtype=dtype, param_dtype=dtype, mixer_form=form)


def functions(config) -> tuple:
    """The jitted forward and forward + backward of one mixer."""
    module = DiscreteMamba2(config)

    def forward(params, u):
        return module.apply({"params": params}, u)

    def loss(params, u):
        return jnp.sum(forward(params, u).astype(jnp.float32))

    return jax.jit(forward), jax.jit(jax.grad(loss, argnums=(0, 1)))


def measure(config, batch: int, length: int, reps: int, budget: int) -> dict:
    module = DiscreteMamba2(config)
    u = jax.random.normal(jax.random.key(1), (batch, length, config.hidden_size), jnp.dtype(config.compute_dtype))
    params = jax.jit(module.init)(jax.random.key(0), u[:, :8])["params"]
    row = {"form": config.mixer_form, "length": length, "batch": batch}
    for name, fn in zip(("forward", "forward+backward"), functions(config)):
        compiled = fn.lower(params, u).compile()
        memory = compiled.memory_analysis()
        temp = memory.temp_size_in_bytes if memory else None
        row[f"{name} temp MiB"] = None if temp is None else round(temp / MIB, 1)
        if temp is not None and temp > budget:
            row[f"{name} ms"] = None
            row[f"{name} note"] = f"not run: {temp / 2**30:.1f} GiB of temporaries > budget"
            continue
        jax.block_until_ready(compiled(params, u))  # warm-up
        seconds, times = median_seconds(lambda: jax.block_until_ready(compiled(params, u)), reps)
        row[f"{name} ms"] = round(1e3 * seconds, 2)
        row[f"{name} times ms"] = [round(1e3 * t, 2) for t in times]
    return row


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", default="512,1024,2048,4096,8192")
    parser.add_argument("--forms", default=",".join(MIXER_FORMS))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--memory-budget", default="12GiB", help="compiled temporaries above this are not run")
    parser.add_argument("--config", default=LLAMBA_1B, help="a Llamba config.json whose mixer is measured")
    parser.add_argument("--no-save", action="store_true", help="print only; write no result file")
    args = parser.parse_args(argv)
    lengths = [int(n) for n in args.lengths.split(",")]
    forms = args.forms.split(",")
    budget = parse_size(args.memory_budget, "--memory-budget")
    config = mixer_config(args.config, args.dtype, "chunked")
    print(f"mixer of {os.path.basename(args.config)}: d_model {config.hidden_size}, {config.n_v_heads} heads x "
          f"{config.head_dim}, {config.n_qk_heads} groups, d_state {config.d_state}, chunk {config.chunk_size}; "
          f"batch {args.batch}, {args.dtype}, {jax.devices()[0].device_kind}", flush=True)
    print(f"{'form':<10} {'length':>7} {'fwd ms':>10} {'fwd+bwd ms':>11} {'fwd temp MiB':>13} {'fwd+bwd temp MiB':>17}")
    rows = []
    for length in lengths:
        for form in forms:
            row = measure(config.replace(mixer_form=form), args.batch, length, args.reps, budget)
            rows.append(row)

            def show(key):
                value = row.get(key)
                return "-" if value is None else f"{value:,.1f}"

            print(f"{form:<10} {length:>7} {show('forward ms'):>10} {show('forward+backward ms'):>11} "
                  f"{show('forward temp MiB'):>13} {show('forward+backward temp MiB'):>17}", flush=True)
    if args.no_save:
        return
    result = {"benchmark": "mixer", "environment": environment(), "config": args.config, "dtype": args.dtype,
              "batch": args.batch, "reps": args.reps, "memory_budget_bytes": budget,
              "mixing_flops_per_token_per_layer": {n: config.mixing_flops_per_token(n) / config.num_hidden_layers
                                                   for n in lengths},
              "rows": rows}
    print(f"wrote {write_result('mixer', result)}")


if __name__ == "__main__":
    main()
