"""The decoder-only causal LM shared by Orion and Llama; the architecture picks only the norm.

Parameter paths follow HF module names: `model/embed_tokens`, `model/layers/<...>`, `model/norm`, `lm_head`.
With `scan_layers` the layers are one `nn.scan`ned block whose parameters carry a leading layer axis
(`model/layers/self_attn/q_proj/kernel` is [L, D, H*hd]); without it they are `model/layers/0`, `model/layers/1`, ...
`kept_jax.models.params.stack_layers`/`unstack_layers` convert between the two.
"""

from __future__ import annotations

from typing import Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from kept_jax.config import ModelConfig
from kept_jax.models.layers import MLP, NORMS, Attention, Embed, Linear, rope_cos_sin, rope_inv_freq

Array = jax.Array

REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "save-dots": jax.checkpoint_policies.checkpoint_dots,
    "save-dots-no-batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _norm(cfg: ModelConfig, name: str) -> nn.Module:
    return NORMS[cfg.norm](cfg.rms_norm_eps, jnp.dtype(cfg.compute_dtype), jnp.dtype(cfg.param_dtype), name=name)


class DecoderLayer(nn.Module):
    """x + attn(norm(x)), then + mlp(norm(.)). Returns (carry, None) so that it can be scanned."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x: Array, cos: Array, sin: Array) -> tuple[Array, None]:
        cfg = self.config
        # Norm inputs, recorded only when "intermediates" is mutable (calibration statistics for OPM).
        self.sow("intermediates", "input_layernorm_in", x)
        x = x + Attention(cfg, name="self_attn")(_norm(cfg, "input_layernorm")(x), cos, sin)
        self.sow("intermediates", "post_attention_layernorm_in", x)
        x = x + MLP(cfg, name="mlp")(_norm(cfg, "post_attention_layernorm")(x))
        return x, None


def _layer_class(cfg: ModelConfig, scanned: bool):
    if cfg.remat_policy == "none":
        return DecoderLayer
    # prevent_cse is unnecessary inside scan and costs performance there.
    return nn.remat(DecoderLayer, policy=REMAT_POLICIES[cfg.remat_policy], prevent_cse=not scanned)


class UnscannedLayers(nn.Module):
    """The layers as a Python loop, named `0`, `1`, ... like HF's `model.layers.<i>`."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x: Array, cos: Array, sin: Array) -> Array:
        layer = _layer_class(self.config, scanned=False)
        for i in range(self.config.num_hidden_layers):
            x, _ = layer(self.config, name=str(i))(x, cos, sin)
        return x


class Decoder(nn.Module):
    """HF's `model`: embeddings, the layer stack and the final norm. Returns final hidden states."""

    config: ModelConfig

    def setup(self):
        cfg = self.config
        self.embed_tokens = Embed(
            cfg.vocab_size, cfg.hidden_size, jnp.dtype(cfg.compute_dtype), jnp.dtype(cfg.param_dtype)
        )
        if cfg.scan_layers:
            self.layers = nn.scan(
                _layer_class(cfg, scanned=True),
                variable_axes={"params": 0, "intermediates": 0, "lora": 0},
                split_rngs={"params": True},
                in_axes=(nn.broadcast, nn.broadcast),
                length=cfg.num_hidden_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )(cfg)
        else:
            self.layers = UnscannedLayers(cfg)
        self.norm = _norm(cfg, None)

    def __call__(self, tokens: Array, positions: Array | None = None) -> Array:
        cfg = self.config
        seq = tokens.shape[-1]
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), tokens.shape)
        # `dynamic` rope rescales by the (static) sequence length, like HF for positions 0..seq-1.
        inv_freq = rope_inv_freq(cfg.rope, cfg.head_dim, cfg.max_position_embeddings, seq)
        cos, sin = rope_cos_sin(positions, inv_freq)
        x = self.embed_tokens(tokens)
        x = self.layers(x, cos, sin)
        if cfg.scan_layers:
            x = x[0]
        self.sow("intermediates", "norm_in", x)
        return self.norm(x)


class CausalLM(nn.Module):
    """`model.apply({"params": params}, tokens, output=...)`; tokens are int32 [batch, seq].

    output: "logits" (fp32 [batch, seq, vocab]), "hidden" (final hidden states after the last norm, before the
    head, in the compute dtype) or "both" (a (logits, hidden) pair).
    """

    config: ModelConfig

    def setup(self):
        cfg = self.config
        self.model = Decoder(cfg)
        if not cfg.tie_word_embeddings:
            self.lm_head = Linear(
                cfg.vocab_size,
                False,
                ("embed", "vocab"),
                jnp.dtype(cfg.compute_dtype),
                jnp.dtype(cfg.param_dtype),
                out_dtype=jnp.float32,
            )

    def __call__(
        self,
        tokens: Array,
        positions: Array | None = None,
        output: Literal["logits", "hidden", "both"] = "logits",
    ):
        if output not in ("logits", "hidden", "both"):
            raise ValueError(f"output must be 'logits', 'hidden' or 'both', got {output!r}")
        hidden = self.model(tokens, positions)
        if output == "hidden":
            return hidden
        logits = self.logits(hidden)
        return logits if output == "logits" else (logits, hidden)

    def norm_inputs(self, tokens: Array) -> dict[str, Array]:
        """The input of every norm site, keyed by the HF norm name (`model.layers.0.input_layernorm`, ...,
        `model.norm`), each [batch, seq, hidden]. Use with `mutable="intermediates"`."""
        self.model(tokens)
        sown = self.model.variables["intermediates"]  # type: ignore[index]
        out = {"model.norm": sown["norm_in"][0]}
        layers = sown["layers"]
        for i in range(self.config.num_hidden_layers):
            for site in ("input_layernorm", "post_attention_layernorm"):
                key = f"{site}_in"
                value = layers[key][0][i] if self.config.scan_layers else layers[str(i)][key][0]
                out[f"model.layers.{i}.{site}"] = value
        return out

    def logits(self, hidden: Array) -> Array:
        if self.config.tie_word_embeddings:
            return self.model.embed_tokens.attend(hidden)
        return self.lm_head(hidden)
