"""The table between HF state-dict names and kept_jax parameter paths; import and export both read it."""

from __future__ import annotations

import dataclasses
import re

from kept_jax.config import ModelConfig

# Buffers HF checkpoints may carry that are not parameters; skipped on import and listed in the report.
HARMLESS_BUFFERS = (
    re.compile(r"(^|\.)rotary_emb\.inv_freq$"),
    re.compile(r"(^|\.)rotary_emb\.(cos|sin)_cached$"),
)


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One HF tensor: its name, its HF shape, where it lives in the params tree and whether it is transposed.

    `path` is the scanned path (layers stacked on a leading axis); `layer` is the layer index or None.
    """

    hf_name: str
    hf_shape: tuple[int, ...]
    path: tuple[str, ...]
    layer: int | None
    transpose: bool

    def params_path(self, scan_layers: bool) -> tuple[str, ...]:
        if self.layer is None or scan_layers:
            return self.path
        return self.path[:2] + (str(self.layer),) + self.path[2:]


def _linear(prefix, path, layer, d_in, d_out, bias):
    yield TensorSpec(f"{prefix}.weight", (d_out, d_in), path + ("kernel",), layer, True)
    if bias:
        yield TensorSpec(f"{prefix}.bias", (d_out,), path + ("bias",), layer, False)


def _norm(prefix, path, layer, d, with_bias):
    yield TensorSpec(f"{prefix}.weight", (d,), path + ("weight",), layer, False)
    if with_bias:
        yield TensorSpec(f"{prefix}.bias", (d,), path + ("bias",), layer, False)


def tensor_table(config: ModelConfig) -> list[TensorSpec]:
    """Every HF tensor the config implies, in HF order."""
    d, f = config.hidden_size, config.intermediate_size
    q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    norm_bias = config.norm == "layernorm"
    specs = [TensorSpec("model.embed_tokens.weight", (config.vocab_size, d), ("model", "embed_tokens", "embedding"), None, False)]
    for i in range(config.num_hidden_layers):
        hf, path = f"model.layers.{i}", ("model", "layers")
        specs += _norm(f"{hf}.input_layernorm", path + ("input_layernorm",), i, d, norm_bias)
        for name, d_in, d_out in (("q_proj", d, q), ("k_proj", d, kv), ("v_proj", d, kv), ("o_proj", q, d)):
            specs += _linear(f"{hf}.self_attn.{name}", path + ("self_attn", name), i, d_in, d_out, config.attention_bias)
        specs += _norm(f"{hf}.post_attention_layernorm", path + ("post_attention_layernorm",), i, d, norm_bias)
        for name, d_in, d_out in (("gate_proj", d, f), ("up_proj", d, f), ("down_proj", f, d)):
            specs += _linear(f"{hf}.mlp.{name}", path + ("mlp", name), i, d_in, d_out, config.mlp_bias)
    specs += _norm("model.norm", ("model", "norm"), None, d, norm_bias)
    if not config.tie_word_embeddings:
        specs += _linear("lm_head", ("lm_head",), None, d, config.vocab_size, False)
    return specs


def is_harmless_buffer(name: str) -> bool:
    return any(p.search(name) for p in HARMLESS_BUFFERS)
