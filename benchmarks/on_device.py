"""Projection for the published Llamba sizes on a device: weight and state memory at 4 bits and 32K context, beside
the Llama each is distilled from, from the configs alone (nothing is run).

    python -m benchmarks.on_device [--context 32768] [--bits 4] [--group-size 64] [--no-save]

Llamba weights: the exact tensor bytes of `convert --to mlx` (bridge/mlx_export.planned_bytes), head in bf16 and
quantized. Llama weights at the same bits: every linear kernel (an untied head among them, so compare with the head-
quantized Llamba figure) at `bits` plus a bf16 scale and bias per group (MLX's affine layout), the rest bf16. State
at `context`, batch 1: Llamba's recurrent state (fp32 state-space state, bf16 convolution window; independent of the
context) against Llama's bf16 KV cache. Beside them, the figures Cartesia published for Llamba-8B at 4 bits
(cartesia-mlx, M3 Pro, 32K context) and Llama-3.1-8B on the same machine.
"""

from __future__ import annotations

import argparse
import json
import os

from benchmarks.common import environment, write_result

MODELS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "models")
SIZES = {"1b": ("llama-3.2-1b-instruct.json", "llamba-1b.json"), "3b": ("llama-3.2-3b-instruct.json", "llamba-3b.json"),
         "8b": ("llama-3.1-8b-instruct.json", "llamba-8b.json")}
# Cartesia's announcement of Llamba (and the issue that quotes it): M3 Pro, 32K context.
PUBLISHED = {"8b": {"llamba 4-bit": {"memory_GB": 5, "tokens_per_s": 35}, "llama-3.1 (mlx)": {"memory_GB": 15,
                                                                                               "tokens_per_s": 5}}}


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.on_device", description=__doc__.split("\n\n")[0])
    p.add_argument("--context", type=int, default=32768)
    p.add_argument("--bits", type=int, default=4, choices=(4, 8))
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--no-save", action="store_true")
    return p.parse_args(argv)


def _config(name: str):
    from kept_jax.config import read_config_json
    from kept_jax.models import config_from_hf

    return config_from_hf(read_config_json(os.path.join(MODELS, name)))


def state_bytes(config, context: int) -> int:
    """Batch 1 at `context`: Llamba's state (its own dtypes), Llama's KV cache in bf16."""
    if config.architecture == "llamba":
        per_layer = (4 * config.n_v_heads * config.head_dim * config.d_state
                     + 2 * (config.d_conv - 1) * config.conv_channels)
        return config.num_hidden_layers * per_layer
    return 2 * 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * context


def quantized_bytes(config, bits: int, group_size: int) -> int:
    """Linear kernels (the untied head among them) at `bits` plus a bf16 scale and bias per group, the rest bf16."""
    linear = config.matmul_params() - (config.hidden_size * config.vocab_size if config.tie_word_embeddings else 0)
    return linear * bits // 8 + 4 * linear // group_size + 2 * (config.num_params() - linear)


def run(args) -> dict:
    from bridge.mlx_export import check_expressible, planned_bytes

    gb = 1e9
    rows = []
    for size, (llama_name, llamba_name) in SIZES.items():
        llama, llamba = _config(llama_name), _config(llamba_name)
        check_expressible(llamba)
        row = {"size": size, "context": args.context, "bits": args.bits, "group_size": args.group_size,
               "llamba_weights_GB": planned_bytes(llamba, args.bits, args.group_size, False) / gb,
               "llamba_weights_head_quantized_GB": planned_bytes(llamba, args.bits, args.group_size, True) / gb,
               "llamba_state_GB": state_bytes(llamba, args.context) / gb,
               "llama_weights_bf16_GB": 2 * llama.num_params() / gb,
               "llama_weights_GB": quantized_bytes(llama, args.bits, args.group_size) / gb,
               "llama_kv_bf16_GB": state_bytes(llama, args.context) / gb,
               "published": PUBLISHED.get(size)}
        row["llamba_total_GB"] = row["llamba_weights_GB"] + row["llamba_state_GB"]
        row["llama_total_GB"] = row["llama_weights_GB"] + row["llama_kv_bf16_GB"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {"benchmark": "on_device", "environment": environment(), "settings": vars(args), "rows": rows}
    if not args.no_save:
        print(f"wrote {write_result('on_device', result)}")
    return result


if __name__ == "__main__":
    run(parse_args())
