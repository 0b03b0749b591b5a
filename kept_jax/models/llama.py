"""The Llama family: Llama (RMSNorm) and Orion (the same decoder with a LayerNorm, weight and bias, at every norm site).

Config (from/to HF `config.json`), HF tensor-name table, blocks, parameter and FLOP formulas, logical axes. Parameter
paths follow HF module names: `model/embed_tokens`, `model/layers/<...>`, `model/norm`, `lm_head`. With `scan_layers`
the layers are one `nn.scan`ned block whose parameters carry a leading layer axis
(`model/layers/self_attn/q_proj/kernel` is [L, D, H*hd]); without it they are `model/layers/0`, `model/layers/1`, ...
`kept_jax.models.params.stack_layers`/`unstack_layers` convert between the two.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from kept_jax.config import ModelConfig, check_choice, check_hf_keys, check_positive_ints, hf_common_fields
from kept_jax.errors import KeptError
from kept_jax.models.layers import (ATTENTION_IMPLS, MLP, NORMS, Attention, Embed, KVCache, Linear, RopeConfig,
                                    layer_stack, model_output, rope_from_hf, rope_tables)
from kept_jax.models.names import TensorSpec, linear_specs, norm_specs

Array = jax.Array

# The two members of the family: the norm at every norm site and the HF class name written on export.
VARIANTS: dict[str, dict[str, str]] = {
    "llama": {"norm": "rmsnorm", "hf_architecture": "LlamaForCausalLM"},
    "orion": {"norm": "layernorm", "hf_architecture": "OrionForCausalLM"},
}
# Keys that change the math; kept_jax supports them only at the listed values (the last three are other Llama-like
# families' keys, refused when a config.json labelled llama carries them).
FIXED_HF_KEYS: dict[str, tuple[Any, ...]] = {
    "hidden_act": ("silu",),
    "quantization_config": (None,),
    "partial_rotary_factor": (1.0, None),
    "sliding_window": (None,),
    "use_sliding_window": (False, None),
}
# Keys Transformers' Llama reads that leave the function the same: initialization, caching, dropout (kept_jax trains
# without it), and the old tensor-parallel slicing of the same matmuls. Every key of `transformers.LlamaConfig` is
# here, in FIXED_HF_KEYS or in READ_HF_KEYS (tests/test_config.py checks it against the installed Transformers).
NO_EFFECT_HF_KEYS = frozenset("initializer_range use_cache attention_dropout pretraining_tp".split())
# Keys this module reads into fields.
READ_HF_KEYS = frozenset(
    """
    vocab_size hidden_size intermediate_size num_hidden_layers num_attention_heads num_key_value_heads
    head_dim max_position_embeddings rms_norm_eps rope_theta rope_scaling rope_parameters
    original_max_position_embeddings attention_bias mlp_bias tie_word_embeddings torch_dtype dtype
    bos_token_id eos_token_id pad_token_id
    """.split()
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class LlamaConfig(ModelConfig):
    """A Llama or Orion `config.json`, field for field (`architecture` is its model_type), plus runtime choices."""

    model_types: ClassVar[tuple[str, ...]] = ("llama", "orion")

    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int = 4096
    rope: RopeConfig = RopeConfig()
    attention_bias: bool = False
    # Runtime.
    attention_impl: str = "xla"

    embedding_path: ClassVar[tuple[str, ...]] = ("model", "embed_tokens", "embedding")
    hf_embedding_name: ClassVar[str] = "model.embed_tokens.weight"
    logical_axis_rules: ClassVar[dict[str, Any]] = {"q_heads": "tensor", "kv_heads": "tensor"}

    def __post_init__(self):
        if self.architecture not in VARIANTS:
            raise KeptError(
                f"unsupported architecture {self.architecture!r}; kept_jax supports {', '.join(VARIANTS)}"
            )
        super().__post_init__()
        check_positive_ints({k: getattr(self, k) for k in ("num_attention_heads", "num_key_value_heads", "head_dim",
                                                           "max_position_embeddings")})
        if self.num_attention_heads % self.num_key_value_heads:
            raise KeptError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        check_choice("attention_impl", self.attention_impl, ATTENTION_IMPLS)

    @property
    def norm(self) -> str:
        return VARIANTS[self.architecture]["norm"]

    @property
    def model_class(self) -> type[nn.Module]:
        return LlamaForCausalLM

    @property
    def block_class(self) -> type[nn.Module]:
        return DecoderLayer

    @property
    def layer_kinds(self) -> tuple[str, ...]:
        return ("attention",) * self.num_hidden_layers

    @property
    def attention_scale(self) -> float:
        """What the attention logits q.k are multiplied by: 1 / sqrt(head_dim)."""
        return self.head_dim ** -0.5

    def block_args(self, tokens: Array) -> tuple[Array, Array]:
        return rope_tables(self, tokens)

    def empty_cache(self, batch: int, length: int) -> tuple[KVCache, ...]:
        """Each layer's KV cache for `length` positions, zeros, in the compute dtype: [b, length, kv_heads, hd]."""
        shape = (batch, length, self.num_key_value_heads, self.head_dim)
        dtype = jnp.dtype(self.compute_dtype)
        return tuple(KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(self.num_hidden_layers))

    def layout_flags(self) -> dict[str, Any]:
        return {"attention_bias": self.attention_bias, **super().layout_flags()}

    def describe(self) -> str:
        return (f"{super().describe()}; attention: {self.num_attention_heads} heads x {self.head_dim} "
                f"({self.num_key_value_heads} KV)")

    # ---- Parameter and FLOP formulas ----------------------------------------------------------

    def num_params(self) -> int:
        d, f, v, l = self.hidden_size, self.intermediate_size, self.vocab_size, self.num_hidden_layers
        q, kv = self.num_attention_heads * self.head_dim, self.num_key_value_heads * self.head_dim
        norm = d * (2 if self.norm == "layernorm" else 1)
        attn = d * (q + 2 * kv) + q * d + (q + 2 * kv + d if self.attention_bias else 0)
        mlp = 3 * d * f + (2 * f + d if self.mlp_bias else 0)
        head = 0 if self.tie_word_embeddings else d * v
        return v * d + l * (attn + mlp + 2 * norm) + norm + head

    def layer_matmul_params(self) -> tuple[int, ...]:
        d, h = self.hidden_size, self.num_attention_heads * self.head_dim
        kv = self.num_key_value_heads * self.head_dim
        return (d * (h + 2 * kv) + h * d + 3 * d * self.intermediate_size,) * self.num_hidden_layers

    def layer_mixing_flops(self, seq_len: int) -> tuple[float, ...]:
        """QK^T and PV at full T x T: 4 T A per layer, with A = heads x head_dim."""
        return (4 * seq_len * self.num_attention_heads * self.head_dim,) * self.num_hidden_layers

    # ---- Hugging Face config.json and tensor names ---------------------------------------------

    @classmethod
    def _from_hf(cls, hf: dict[str, Any], **runtime: Any) -> "LlamaConfig":
        """Reads an HF `config.json` dict; rejects anything that would change the math unnoticed."""
        model_type = hf["model_type"]
        check_hf_keys(hf, READ_HF_KEYS | set(FIXED_HF_KEYS) | NO_EFFECT_HF_KEYS)
        if hf.get("quantization_config") is not None:
            method = (hf["quantization_config"] or {}).get("quant_method", "unknown method")
            raise KeptError(f"config.json has a quantization_config ({method}): the weights are stored quantized and "
                            "kept_jax reads float weights; give a float checkpoint, or the GGUF file itself")
        for key, allowed in FIXED_HF_KEYS.items():
            if key in hf and hf[key] not in allowed:
                raise KeptError(
                    f"config.json sets {key}={hf[key]!r}; kept_jax supports only {' or '.join(map(repr, allowed))}"
                )
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            if key not in hf:
                raise KeptError(f"config.json is missing the required field {key!r}")

        heads = hf["num_attention_heads"]
        head_dim = hf.get("head_dim")
        if head_dim is None:
            if hf["hidden_size"] % heads:
                raise KeptError(
                    f"hidden_size ({hf['hidden_size']}) is not divisible by num_attention_heads ({heads}); "
                    "set head_dim explicitly in config.json"
                )
            head_dim = hf["hidden_size"] // heads
        return cls(
            architecture=model_type,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=hf.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            max_position_embeddings=hf.get("max_position_embeddings", 4096),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-5 if model_type == "orion" else 1e-6)),
            rope=rope_from_hf(hf),
            attention_bias=bool(hf.get("attention_bias", False)),
            mlp_bias=bool(hf.get("mlp_bias", False)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            **hf_common_fields(hf),
            **runtime,
        )

    def to_hf_dict(self) -> dict[str, Any]:
        """The HF `config.json` dict, with rope settings in both the v5 and the older form."""
        hf: dict[str, Any] = {
            "architectures": [VARIANTS[self.architecture]["hf_architecture"]],
            "model_type": self.architecture,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_parameters": self.rope.to_hf(),
            "rope_theta": self.rope.theta,
            "rope_scaling": None if self.rope.type == "default" else self.rope.to_hf(),
            "attention_bias": self.attention_bias,
            "mlp_bias": self.mlp_bias,
            **self.hf_common_json(),
        }
        if self.rope.type == "default":
            del hf["rope_scaling"]
        return hf

    def tensor_table(self) -> list[TensorSpec]:
        d, f = self.hidden_size, self.intermediate_size
        q, kv = self.num_attention_heads * self.head_dim, self.num_key_value_heads * self.head_dim
        norm_bias = self.norm == "layernorm"
        specs = [TensorSpec(self.hf_embedding_name, (self.vocab_size, d), self.embedding_path, None, False)]
        for i in range(self.num_hidden_layers):
            hf, path = f"model.layers.{i}", ("model", "layers")
            specs += norm_specs(f"{hf}.input_layernorm", path + ("input_layernorm",), i, d, norm_bias)
            for name, d_in, d_out in (("q_proj", d, q), ("k_proj", d, kv), ("v_proj", d, kv), ("o_proj", q, d)):
                specs += linear_specs(f"{hf}.self_attn.{name}", path + ("self_attn", name), i, d_in, d_out,
                                      self.attention_bias)
            specs += norm_specs(f"{hf}.post_attention_layernorm", path + ("post_attention_layernorm",), i, d, norm_bias)
            for name, d_in, d_out in (("gate_proj", d, f), ("up_proj", d, f), ("down_proj", f, d)):
                specs += linear_specs(f"{hf}.mlp.{name}", path + ("mlp", name), i, d_in, d_out, self.mlp_bias)
        specs += norm_specs("model.norm", ("model", "norm"), None, d, norm_bias)
        if not self.tie_word_embeddings:
            specs += linear_specs("lm_head", ("lm_head",), None, d, self.vocab_size, False)
        return specs


# ---- The model ------------------------------------------------------------------------------------


def _norm(cfg: LlamaConfig, name: str) -> nn.Module:
    return NORMS[cfg.norm](cfg.rms_norm_eps, jnp.dtype(cfg.param_dtype), name=name)


class DecoderLayer(nn.Module):
    """x + attn(norm(x)), then + mlp(norm(.)). Returns (carry, None) so that it can be scanned."""

    config: LlamaConfig

    def setup(self):
        cfg = self.config
        self.input_layernorm = _norm(cfg, None)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = _norm(cfg, None)
        self.mlp = MLP(cfg)

    def __call__(self, x: Array, cos: Array, sin: Array) -> tuple[Array, None]:
        # Norm inputs, recorded only when "intermediates" is mutable (calibration statistics for OPM).
        self.sow("intermediates", "input_layernorm_in", x)
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        self.sow("intermediates", "post_attention_layernorm_in", x)
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, None

    def extend(self, x: Array, cache: KVCache, positions: Array, lengths: Array) -> tuple[Array, KVCache]:
        """Generation: the layer on `x` [b, T, d] at `positions` [b, T], reading and writing its KV `cache` (see
        `Attention.extend`). `lengths` is unused: a right-padded prompt's padding sits after its real tokens, which
        causal attention never lets them see, and decoding overwrites its cache entries before they are visible."""
        cos, sin = rope_tables(self.config, positions, positions, cache.k.shape[1])
        out, cache = self.self_attn.extend(self.input_layernorm(x), cos, sin, cache, positions)
        x = x + out
        return x + self.mlp(self.post_attention_layernorm(x)), cache

    def attention_probabilities(self, x: Array, cos: Array, sin: Array) -> Array:
        """[b, heads, T, T]: the attention probabilities of this layer for its input x."""
        return self.self_attn.probabilities(self.input_layernorm(x), cos, sin)


class Decoder(nn.Module):
    """HF's `model`: embeddings, the layer stack and the final norm. Returns final hidden states."""

    config: LlamaConfig

    def setup(self):
        cfg = self.config
        self.embed_tokens = Embed(
            cfg.vocab_size, cfg.hidden_size, jnp.dtype(cfg.compute_dtype), jnp.dtype(cfg.param_dtype)
        )
        self.layers = layer_stack(cfg)
        self.norm = _norm(cfg, None)

    def __call__(self, tokens: Array, positions: Array | None = None) -> Array:
        cos, sin = rope_tables(self.config, tokens, positions)
        x = self.embed_tokens(tokens)
        x, _ = self.layers(x, cos, sin)
        self.sow("intermediates", "norm_in", x)
        return self.norm(x)


class LlamaForCausalLM(nn.Module):
    """`model.apply({"params": params}, tokens, output=...)`; tokens are int32 [batch, seq].

    output: "logits" (fp32 [batch, seq, vocab]), "hidden" (final hidden states after the last norm, before the
    head, in the compute dtype) or "both" (a (logits, hidden) pair).
    """

    config: LlamaConfig

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
            )

    def __call__(
        self,
        tokens: Array,
        positions: Array | None = None,
        output: Literal["logits", "hidden", "both"] = "logits",
    ):
        return model_output(output, self.model(tokens, positions), self.logits)

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

    def layer_inputs(self, tokens: Array) -> Array:
        """[L + 1, b, T, d]: the hidden state entering each layer, then the last layer's output before the final
        norm (MOHAWK's u_0 ... u_L). Use with `mutable="intermediates"`."""
        inputs = self.norm_inputs(tokens)
        layers = [inputs[f"model.layers.{i}.input_layernorm"] for i in range(self.config.num_hidden_layers)]
        return jnp.stack([*layers, inputs["model.norm"]])

    def logits(self, hidden: Array) -> Array:
        if self.config.tie_word_embeddings:
            return self.model.embed_tokens.attend(hidden)
        return self.lm_head(hidden)

    def embed(self, tokens: Array) -> Array:
        """What enters the first layer (generation runs the layers itself, with their caches)."""
        return self.model.embed_tokens(tokens)

    def head(self, x: Array) -> Array:
        """fp32 logits from what leaves the last layer: the final norm, then the head."""
        return self.logits(self.model.norm(x))
