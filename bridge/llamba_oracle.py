"""An independent Llamba: the model in float64 NumPy, one token at a time, written from the math (docs/llamba.md)
and sharing no code with `kept_jax.models`. Transformers has no Llamba class and the reference implementation needs
GPU kernels, so this is what kept_jax's Llamba is checked against: by the tests, and by the training job on its
export (`check_export`).
"""

from __future__ import annotations

import json
import os

import numpy as np

BLOCK_EPS = 1e-5  # the two block norms' eps, fixed in the reference implementation


def oracle_logits(hf: dict, tensors: dict[str, np.ndarray], tokens: np.ndarray):
    """Llamba in float64, one token at a time, from the math (docs/llamba.md). (tests/test_llamba.py breaks each
    term in a copy of this source to show that the comparison notices it.)"""
    w = {k: v.astype(np.float64) for k, v in tensors.items()}
    ssm = hf["ssm_cfg"]
    d, layers = hf["d_model"], hf["n_layer"]
    h, g, n, k = ssm["n_v_heads"], ssm["n_qk_heads"], ssm["d_state"], ssm["d_conv"]
    d_inner = ssm["expand"] * d
    p_dim, channels = d_inner // h, d_inner + 2 * g * n

    def rmsnorm(x, weight, eps):
        return weight * x / np.sqrt(np.mean(x * x) + eps)

    def silu(x):
        return x / (1.0 + np.exp(-x))

    head = w["backbone.embedding.weight"] if hf["tie_embeddings"] else w["lm_head.weight"]
    out = np.zeros((*tokens.shape, head.shape[0]))
    for row, sequence in enumerate(tokens):
        window = [np.zeros((k - 1, channels)) for _ in range(layers)]  # the convolution's previous inputs
        state = [np.zeros((h, p_dim, n)) for _ in range(layers)]
        for pos, token in enumerate(sequence):
            x_res = w["backbone.embedding.weight"][token]
            for i in range(layers):
                p = f"backbone.layers.{i}."
                u = rmsnorm(x_res, w[p + "input_layernorm.weight"], BLOCK_EPS)
                proj = w[p + "mixer.in_proj.weight"] @ u
                xbc, z, ell = proj[:channels], proj[channels:channels + d_inner], proj[channels + d_inner:]
                taps = np.concatenate([window[i], xbc[None]])  # [K, C], the current token last
                window[i] = taps[1:]
                conv = np.einsum("kc,ck->c", taps, w[p + "mixer.conv1d.weight"][:, 0, :])
                if ssm["conv_bias"]:
                    conv = conv + w[p + "mixer.conv1d.bias"]
                if ssm["activation"] == "silu":
                    conv = silu(conv)
                x = conv[:d_inner].reshape(h, p_dim)
                b = conv[d_inner:d_inner + g * n].reshape(g, n)
                c = conv[d_inner + g * n:].reshape(g, n)
                y = np.zeros((h, p_dim))
                for head_index in range(h):
                    group = head_index // (h // g)
                    decay = 1.0 / (1.0 + np.exp(ell[head_index]))  # sigmoid(-l)
                    x_in = x[head_index]  # unscaled: no step size on the input (Mamba-2 has one)
                    state[i][head_index] = decay * state[i][head_index] + np.outer(x_in, b[group])
                    y[head_index] = state[i][head_index] @ c[group]
                    y[head_index] += w[p + "mixer.D"][head_index] * x[head_index]
                z_bias = w[p + "mixer.z_bias"]
                x_res = x_res + w[p + "mixer.out_proj.weight"] @ (y.reshape(-1) * silu(z + z_bias))
                u = rmsnorm(x_res, w[p + "post_attention_layernorm.weight"], BLOCK_EPS)
                gate, up = (w[p + f"mlp.{m}_proj.weight"] @ u + w.get(p + f"mlp.{m}_proj.bias", 0.0)
                            for m in ("gate", "up"))
                x_res = x_res + w[p + "mlp.down_proj.weight"] @ (silu(gate) * up) + w.get(p + "mlp.down_proj.bias", 0.0)
            out[row, pos] = head @ rmsnorm(x_res, w["backbone.final_layernorm.weight"], hf["norm_epsilon"])
    return out


def check_export(export_dir: str, tokens: np.ndarray) -> dict:
    """Re-imports `export_dir` with kept_jax and compares its fp32 logits on `tokens` [b, T] with the oracle's on
    the same (exported) tensors: the largest error relative to the logits' scale, and the share of positions
    whose argmax agrees."""
    import jax.numpy as jnp

    from bridge.checkpoint import load_checkpoint
    from bridge.hf_import import CheckpointReader
    from kept_jax.models import build_model

    with open(os.path.join(export_dir, "config.json"), encoding="utf-8") as f:
        hf = json.load(f)
    config, params, _ = load_checkpoint(export_dir, compute_dtype="float32", param_dtype="float32")
    logits = np.asarray(build_model(config).apply({"params": params}, jnp.asarray(tokens)), np.float64)
    reader = CheckpointReader(export_dir)
    reference = oracle_logits(hf, {name: reader.read(name) for name in reader.names()}, np.asarray(tokens))
    return {"max_relative_error": float(np.abs(logits - reference).max() / np.abs(reference).max()),
            "argmax_agreement": float((logits.argmax(-1) == reference.argmax(-1)).mean())}
