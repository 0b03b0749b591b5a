"""Scanned vs unrolled layers and remat policies: compile time by depth, step time, compiled temp memory.

    python -m benchmarks.layers [--depths 2,8,32] [--seq 256] [--batch 4]

Uses a ~random Llama of hidden 256 (a shape benchmark: the values do not matter). Writes
benchmarks/results/layers-<host>-<date>.json. Times are medians of 5 runs after a warm-up, on this process's device.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

from benchmarks.common import environment, write_result
from kept_jax.config import REMAT_POLICIES
from kept_jax.models import LlamaConfig, build_model, init_params


def _config(layers: int, **runtime) -> LlamaConfig:
    return LlamaConfig(
        architecture="llama", vocab_size=4096, hidden_size=256, intermediate_size=704, num_hidden_layers=layers,
        num_attention_heads=8, num_key_value_heads=8, head_dim=32, **runtime,
    )


def _loss_and_grad(config):
    model = build_model(config)

    def loss(params, tokens):
        logits = model.apply({"params": params}, tokens)
        logp = jax.nn.log_softmax(logits[:, :-1])
        return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], -1))

    return jax.jit(jax.value_and_grad(loss))


def measure(config, batch: int, seq: int) -> dict:
    params = init_params(config, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (batch, seq), 0, config.vocab_size)
    step = _loss_and_grad(config)
    t0 = time.perf_counter()
    compiled = step.lower(params, tokens).compile()
    compile_s = time.perf_counter() - t0
    jax.block_until_ready(compiled(params, tokens))
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(params, tokens))
        times.append(time.perf_counter() - t0)
    memory = compiled.memory_analysis()
    return {
        "layers": config.num_hidden_layers,
        "scan_layers": config.scan_layers,
        "remat_policy": config.remat_policy,
        "compile_s": round(compile_s, 3),
        "step_ms": round(1e3 * statistics.median(times), 2),
        "temp_MiB": round(memory.temp_size_in_bytes / 2**20, 1) if memory else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--depths", default="2,8,32")
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args()
    depths = [int(d) for d in args.depths.split(",")]
    rows = []
    for depth in depths:
        for scan in (True, False):
            rows.append(measure(_config(depth, scan_layers=scan), args.batch, args.seq))
            print(rows[-1], flush=True)
    for policy in REMAT_POLICIES:
        rows.append(measure(_config(depths[-1], remat_policy=policy), args.batch, args.seq))
        print(rows[-1], flush=True)
    result = {"benchmark": "layers", "environment": environment(), "batch": args.batch, "seq": args.seq, "rows": rows}
    print(f"wrote {write_result('layers', result)}")


if __name__ == "__main__":
    main()
