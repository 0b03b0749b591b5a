"""Mamba-2/attention hybrids in Transformers' GraniteMoeHybrid layout (dense). docs/hybrid.md.

Transformers (`GraniteMoeHybridForCausalLM`, model_type `granitemoehybrid`), vLLM, llama.cpp (`granitehybrid`),
SGLang and MLX-LM load this layout. Each layer is attention or Mamba-2 (`layer_types`), then a SwiGLU MLP:

    h = embed(tokens) * embedding_multiplier
    h += residual_multiplier * mixer(RMSNorm(h))        mixer: attention or Mamba-2
    h += residual_multiplier * shared_mlp(RMSNorm(h))   [gate | up] = input_linear(x); output_linear(silu(gate) * up)
    logits = head(RMSNorm(h)) / logits_scaling

Attention is Llama's (GQA; RoPE when position_embedding_type is "rope"), its logits scaled by attention_multiplier
(1 / sqrt(head_dim) for a Llama). A dense model (`num_local_experts: 0`) is a Llama exactly when every layer is
attention and the multipliers are those of a Llama. The Mamba-2 mixer (H = mamba_n_heads heads of dim P, G =
mamba_n_groups groups sharing B and C, N = mamba_d_state; d_inner = H P = mamba_expand x hidden):

    [z (d_inner) | xBC (d_inner + 2 G N) | dt (H)] = in_proj(u)
    xBC = silu(causal depthwise conv (kernel mamba_d_conv, bias)(xBC));  x [H, P], B [G, N], C [G, N] = split(xBC)
    dt = clip(softplus(dt + dt_bias), time_step_limit);  A = -exp(A_log)
    S_t = exp(dt_t A) S_{t-1} + dt_t x_t B_t^T;  y_t = S_t C_t + D x_t
    out = out_proj(norm.weight * RMSNorm_groups(y * silu(z)))    RMS over each of the G groups of d_inner / G

The state-space part is `kept_jax.models.ssd` with x' = dt x and log-decays dt A: chunked (training, prefill), the
materialized matrix (MOHAWK's stage 1) and the recurrence (generation) agree; states are fp32. Parameter paths
follow Transformers' names: `model/embed_tokens`, `model/layers/<i>/{input_layernorm, self_attn | mamba,
post_attention_layernorm, shared_mlp}`, `model/norm`, `lm_head`. Layers of both kinds are a Python loop
(`model/layers/<i>/...`); when every layer is of one kind they may be scanned like any architecture's.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

import kept_jax.models.ssd as ssd
from kept_jax.config import ModelConfig, check_choice, check_hf_keys, check_positive_ints, hf_common_fields
from kept_jax.errors import KeptError
from kept_jax.models.layers import (ATTENTION_IMPLS, NORMS, Attention, CausalConv1d, Embed, FusedMLP, KVCache, Linear,
                                    MixerState, RopeConfig, layer_stack, logical_init, model_output, rope_from_hf,
                                    rope_tables)
from kept_jax.models.names import TensorSpec, linear_specs, norm_specs

Array = jax.Array

ATTENTION, MAMBA = "attention", "mamba"
# config.json's layer_types values: MLX-LM reads only mamba/attention, Transformers both spellings (and writes the
# other one); kept_jax writes mamba/attention.
LAYER_TYPES = {"attention": ATTENTION, "full_attention": ATTENTION, "mamba": MAMBA, "linear_attention": MAMBA}
NO_LIMIT = (0.0, math.inf)
# Keys Transformers' GraniteMoeHybridConfig reads. Every one is read into a field, fixed at the values below, or of
# no effect on a dense model's function (tests/test_hybrid.py checks the list against the installed Transformers).
READ_HF_KEYS = frozenset("""
    vocab_size hidden_size num_hidden_layers num_attention_heads num_key_value_heads head_dim max_position_embeddings
    rms_norm_eps rope_parameters rope_theta rope_scaling attention_bias embedding_multiplier logits_scaling
    residual_multiplier attention_multiplier shared_intermediate_size position_embedding_type layer_types
    layers_block_type mamba_n_heads mamba_n_groups mamba_d_state mamba_d_head mamba_d_conv mamba_expand
    mamba_chunk_size mamba_conv_bias mamba_proj_bias time_step_limit tie_word_embeddings dtype torch_dtype
    bos_token_id eos_token_id pad_token_id
    """.split())
FIXED_HF_KEYS: dict[str, tuple[Any, ...]] = {"hidden_act": ("silu",), "num_local_experts": (0,),
                                             "quantization_config": (None,)}
# The experts' settings (unused without experts; `intermediate_size` is the experts' MLP, and kept_jax writes it
# equal to the shared MLP's, which MLX-LM reads for a dense model), initialization, caching, dropout, routing loss.
NO_EFFECT_HF_KEYS = frozenset("""
    intermediate_size num_experts_per_tok output_router_logits router_aux_loss_coef initializer_range use_cache
    attention_dropout
    """.split())
POSITION_EMBEDDINGS = ("rope", "nope")  # position_embedding_type: Transformers rotates only for "rope"


@dataclasses.dataclass(frozen=True, kw_only=True)
class HybridConfig(ModelConfig):
    """A dense GraniteMoeHybrid `config.json`: `shared_intermediate_size` is `intermediate_size` (the shared MLP),
    `layer_types` is per layer "attention" or "mamba", the `mamba_*` fields are the Mamba-2 mixers'."""

    architecture: str = "granitemoehybrid"
    layer_types: tuple[str, ...]
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int = 4096
    rope: RopeConfig | None = RopeConfig()  # None: no positional embedding (position_embedding_type "nope")
    attention_bias: bool = False
    attention_multiplier: float  # what q.k is multiplied by: 1 / sqrt(head_dim) for a Llama
    embedding_multiplier: float = 1.0
    residual_multiplier: float = 1.0
    logits_scaling: float = 1.0  # logits are divided by it
    mamba_n_heads: int
    mamba_d_head: int
    mamba_n_groups: int = 1
    mamba_d_state: int
    mamba_d_conv: int = 4
    mamba_expand: int = 2
    mamba_chunk_size: int = 256
    mamba_conv_bias: bool = True
    mamba_proj_bias: bool = False
    time_step_limit: tuple[float, float] = NO_LIMIT
    # Runtime.
    attention_impl: str = "xla"
    mixer_form: str = "chunked"  # how the Mamba-2 layers' state-space mixing runs (ssd.FORMS)

    embedding_path: ClassVar[tuple[str, ...]] = ("model", "embed_tokens", "embedding")
    hf_embedding_name: ClassVar[str] = "model.embed_tokens.weight"
    model_types: ClassVar[tuple[str, ...]] = ("granitemoehybrid",)
    logical_axis_rules: ClassVar[dict[str, Any]] = {"q_heads": "tensor", "kv_heads": "tensor", "ssm_in": None,
                                                    "ssm_conv": None, "ssm_inner": "tensor", "ssm_heads": None}

    def __post_init__(self):
        if self.architecture != "granitemoehybrid":
            raise KeptError(f"HybridConfig is for model_type 'granitemoehybrid', not {self.architecture!r}")
        super().__post_init__()
        check_positive_ints({k: getattr(self, k) for k in (
            "num_attention_heads", "num_key_value_heads", "max_position_embeddings", "mamba_n_heads", "mamba_d_head",
            "mamba_n_groups", "mamba_d_state", "mamba_d_conv", "mamba_expand", "mamba_chunk_size")})
        if len(self.layer_types) != self.num_hidden_layers or set(self.layer_types) - {ATTENTION, MAMBA}:
            raise KeptError(f"layer_types must name 'attention' or 'mamba' for each of the {self.num_hidden_layers} "
                            f"layers, got {list(self.layer_types)!r}")
        if self.hidden_size % self.num_attention_heads:
            raise KeptError(f"hidden_size ({self.hidden_size}) must be a multiple of num_attention_heads "
                            f"({self.num_attention_heads}): GraniteMoeHybrid's heads are hidden_size / heads wide")
        if self.num_attention_heads % self.num_key_value_heads:
            raise KeptError(f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                            f"num_key_value_heads ({self.num_key_value_heads})")
        if self.mamba_n_heads * self.mamba_d_head != self.d_inner:
            raise KeptError(f"mamba_n_heads x mamba_d_head = {self.mamba_n_heads * self.mamba_d_head} must equal "
                            f"mamba_expand x hidden_size = {self.d_inner}")
        if self.mamba_n_heads % self.mamba_n_groups:
            raise KeptError(f"mamba_n_heads ({self.mamba_n_heads}) must be a multiple of mamba_n_groups "
                            f"({self.mamba_n_groups}): each group of B and C is shared by heads / groups heads")
        low, high = self.time_step_limit
        if not (0 <= low < high):
            raise KeptError("time_step_limit must be [low, high] with 0 <= low < high, "
                            f"got {list(self.time_step_limit)}")
        for name in ("attention_multiplier", "embedding_multiplier", "residual_multiplier", "logits_scaling"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) > 0):
                raise KeptError(f"{name} must be a positive number, got {getattr(self, name)!r}")
        check_choice("attention_impl", self.attention_impl, ATTENTION_IMPLS)
        check_choice("mixer_form", self.mixer_form, ssd.FORMS)
        if self.scan_layers and len(set(self.layer_types)) > 1:
            object.__setattr__(self, "scan_layers", False)  # layers of two kinds run as a loop (layers.layer_stack)

    # ---- Derived sizes ------------------------------------------------------------------------

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def attention_scale(self) -> float:
        return self.attention_multiplier

    @property
    def d_inner(self) -> int:
        return self.mamba_expand * self.hidden_size

    @property
    def conv_channels(self) -> int:
        """x, B and C, which the convolution reads."""
        return self.d_inner + 2 * self.mamba_n_groups * self.mamba_d_state

    @property
    def in_proj_size(self) -> int:
        return self.d_inner + self.conv_channels + self.mamba_n_heads

    @property
    def mixer_heads(self) -> int:
        return self.mamba_n_heads

    @property
    def ssm_chunk(self) -> int:
        return self.mamba_chunk_size

    @property
    def bc_width(self) -> int:
        """B's (and C's) channels: groups x d_state."""
        return self.mamba_n_groups * self.mamba_d_state

    @property
    def attention_layers(self) -> tuple[int, ...]:
        return tuple(i for i, t in enumerate(self.layer_types) if t == ATTENTION)

    @property
    def mamba_layers(self) -> tuple[int, ...]:
        return tuple(i for i, t in enumerate(self.layer_types) if t == MAMBA)

    @property
    def logit_divisor(self) -> float:
        return self.logits_scaling

    @property
    def norm(self) -> str:
        return "rmsnorm"

    # ---- What the rest of kept_jax asks of an architecture -------------------------------------

    @property
    def model_class(self) -> type[nn.Module]:
        return HybridForCausalLM

    @property
    def block_classes(self) -> tuple[type[nn.Module], ...]:
        return tuple(AttentionLayer if t == ATTENTION else MambaLayer for t in self.layer_types)

    @property
    def block_class(self) -> type[nn.Module]:
        kinds = set(self.block_classes)
        if len(kinds) != 1:
            raise ValueError("a hybrid's layers are of two kinds: use block_classes")
        return kinds.pop()

    @property
    def layer_kinds(self) -> tuple[str, ...]:
        return tuple("attention" if t == ATTENTION else "mamba2" for t in self.layer_types)

    def block_args(self, tokens: Array) -> tuple:
        return rope_tables(self, tokens) if self.rope is not None else (None, None)

    def empty_cache(self, batch: int, length: int) -> tuple:
        """Each layer's generation state: an attention layer's KV cache for `length` positions (compute dtype), a
        Mamba-2 layer's conv window [b, K-1, C] and state [b, H, P, N] (fp32), whose size does not depend on
        `length`."""
        dtype = jnp.dtype(self.compute_dtype)
        kv = (batch, length, self.num_key_value_heads, self.head_dim)
        conv = (batch, self.mamba_d_conv - 1, self.conv_channels)
        state = (batch, self.mamba_n_heads, self.mamba_d_head, self.mamba_d_state)
        mixer = MixerState(jnp.zeros(conv, jnp.float32), jnp.zeros(state, jnp.float32))
        return tuple(KVCache(jnp.zeros(kv, dtype), jnp.zeros(kv, dtype)) if t == ATTENTION else mixer
                     for t in self.layer_types)

    def layout_flags(self) -> dict[str, Any]:
        return {"tie_word_embeddings": self.tie_word_embeddings, "attention_bias": self.attention_bias,
                "mamba_conv_bias": self.mamba_conv_bias, "mamba_proj_bias": self.mamba_proj_bias,
                "layer_types": "".join("A" if t == ATTENTION else "M" for t in self.layer_types)}

    def describe(self) -> str:
        attention = self.attention_layers
        where = ("none" if not attention else "all" if len(attention) == self.num_hidden_layers
                 else ", ".join(map(str, attention)))
        return (f"{super().describe()}; attention layers: {where} ({self.num_attention_heads} heads x "
                f"{self.head_dim}, {self.num_key_value_heads} KV); Mamba-2: {self.mamba_n_heads} heads x "
                f"{self.mamba_d_head}, {self.mamba_n_groups} B/C group{'s' if self.mamba_n_groups > 1 else ''}, "
                f"d_state {self.mamba_d_state}, conv {self.mamba_d_conv}, chunk {self.mamba_chunk_size}")

    # ---- Parameter and FLOP formulas ----------------------------------------------------------

    def _attention_params(self, matmul_only: bool) -> int:
        d, q, kv = self.hidden_size, self.num_attention_heads * self.head_dim, self.num_key_value_heads * self.head_dim
        bias = 0 if matmul_only or not self.attention_bias else q + 2 * kv + d
        return d * (q + 2 * kv) + q * d + bias

    def _mamba_params(self, matmul_only: bool) -> int:
        d, p_in, inner = self.hidden_size, self.in_proj_size, self.d_inner
        if matmul_only:
            return d * p_in + inner * d
        return (d * p_in + inner * d + (p_in + d if self.mamba_proj_bias else 0)
                + self.conv_channels * (self.mamba_d_conv + self.mamba_conv_bias) + 3 * self.mamba_n_heads + inner)

    def num_params(self) -> int:
        d, f, v = self.hidden_size, self.intermediate_size, self.vocab_size
        per_layer = 3 * d * f + 2 * d
        mixers = (len(self.attention_layers) * self._attention_params(False)
                  + len(self.mamba_layers) * self._mamba_params(False))
        head = 0 if self.tie_word_embeddings else d * v
        return v * d + self.num_hidden_layers * per_layer + mixers + d + head

    def layer_matmul_params(self) -> tuple[int, ...]:
        mlp = 3 * self.hidden_size * self.intermediate_size
        return tuple(mlp + (self._attention_params(True) if t == ATTENTION else self._mamba_params(True))
                     for t in self.layer_types)

    def layer_mixing_flops(self, seq_len: int) -> tuple[float, ...]:
        """Attention layers: QK^T and PV at full T x T, 4 T A (A = heads x head_dim). Mamba-2 layers: the chunked
        form's (`ssd.chunked_flops_per_token`) and the convolution's 2 d_conv C."""
        attention = 4 * seq_len * self.num_attention_heads * self.head_dim
        mamba = (ssd.chunked_flops_per_token(self.mamba_n_heads, self.mamba_n_groups, self.mamba_d_head,
                                             self.mamba_d_state, self.mamba_chunk_size, seq_len)
                 + 2 * self.mamba_d_conv * self.conv_channels)
        return tuple(attention if t == ATTENTION else mamba for t in self.layer_types)

    # ---- Hugging Face config.json and tensor names ---------------------------------------------

    @classmethod
    def _from_hf(cls, hf: dict[str, Any], **runtime: Any) -> "HybridConfig":
        check_hf_keys(hf, READ_HF_KEYS | set(FIXED_HF_KEYS) | NO_EFFECT_HF_KEYS)
        experts = hf.get("num_local_experts", 8)  # Transformers' default is 8 experts
        if experts != 0:
            absent = " (absent: 8)" if "num_local_experts" not in hf else ""
            raise KeptError(f"config.json has num_local_experts={experts!r}{absent}"
                            ": kept_jax reads dense GraniteMoeHybrid models (num_local_experts: 0), not a "
                            "mixture-of-experts one")
        for key, allowed in FIXED_HF_KEYS.items():
            if hf.get(key, allowed[0]) not in allowed:
                raise KeptError(f"config.json sets {key}={hf[key]!r}; kept_jax supports only "
                                f"{' or '.join(map(repr, allowed))}")
        for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "shared_intermediate_size",
                    "mamba_n_heads", "mamba_d_state"):
            if key not in hf:
                raise KeptError(f"config.json is missing the required field {key!r}")
        layers = hf["num_hidden_layers"]
        check_positive_ints({k: hf[k] for k in ("num_hidden_layers", "hidden_size", "num_attention_heads",
                                                "mamba_n_heads")})
        types = hf.get("layer_types", hf.get("layers_block_type")) or ["mamba"] * layers
        if not isinstance(types, list) or any(t not in LAYER_TYPES for t in types):
            raise KeptError(f"config.json layer_types must be a list of {', '.join(map(repr, LAYER_TYPES))}, got "
                            f"{types!r}")
        position = hf.get("position_embedding_type") or "nope"
        check_choice("position_embedding_type", position, POSITION_EMBEDDINGS)
        heads = hf["num_attention_heads"]
        head_dim = hf.get("head_dim")
        if head_dim is not None and head_dim != hf["hidden_size"] // heads:
            raise KeptError(f"config.json sets head_dim={head_dim}, but MLX-LM and llama.cpp take hidden_size / "
                            f"num_attention_heads = {hf['hidden_size'] // heads}; kept_jax reads only hybrids whose "
                            "attention heads are hidden_size / heads wide")
        expand = hf.get("mamba_expand", 2)
        d_head = hf.get("mamba_d_head", "auto")
        if d_head == "auto":
            d_head = expand * hf["hidden_size"] // hf["mamba_n_heads"]
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["shared_intermediate_size"],
            num_hidden_layers=layers,
            layer_types=tuple(LAYER_TYPES[t] for t in types),
            num_attention_heads=heads,
            num_key_value_heads=hf.get("num_key_value_heads") or heads,
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope=rope_from_hf(hf) if position == "rope" else None,
            attention_bias=bool(hf.get("attention_bias", False)),
            attention_multiplier=float(hf.get("attention_multiplier", 1.0)),
            embedding_multiplier=float(hf.get("embedding_multiplier", 1.0)),
            residual_multiplier=float(hf.get("residual_multiplier", 1.0)),
            logits_scaling=float(hf.get("logits_scaling", 1.0)),
            mamba_n_heads=hf["mamba_n_heads"],
            mamba_d_head=d_head,
            mamba_n_groups=hf.get("mamba_n_groups", 1),
            mamba_d_state=hf["mamba_d_state"],
            mamba_d_conv=hf.get("mamba_d_conv", 4),
            mamba_expand=expand,
            mamba_chunk_size=hf.get("mamba_chunk_size", 256),
            mamba_conv_bias=bool(hf.get("mamba_conv_bias", True)),
            mamba_proj_bias=bool(hf.get("mamba_proj_bias", False)),
            time_step_limit=_time_step_limit(hf.get("time_step_limit")),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            **hf_common_fields(hf),
            **runtime,
        )

    def to_hf_dict(self) -> dict[str, Any]:
        """Every key the clients read, explicitly: MLX-LM requires several that Transformers defaults
        (`intermediate_size`, the multipliers), reads the dense MLP's size from `intermediate_size`, assumes
        `time_step_limit` (0.001, 100) when it is absent, and knows the layer types only as mamba/attention. An
        unbounded time step is written as JSON's `Infinity` (as published Mamba-2 checkpoints carry it), which
        Python's json, and so every client here, reads; Transformers' own `{"__float__": "Infinity"}` is not read
        by MLX-LM."""
        rope = self.rope or RopeConfig()
        hf: dict[str, Any] = {
            "architectures": ["GraniteMoeHybridForCausalLM"],
            "model_type": "granitemoehybrid",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "shared_intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "layer_types": list(self.layer_types),
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "position_embedding_type": "rope" if self.rope is not None else "nope",
            "rope_parameters": rope.to_hf(),
            "rope_theta": rope.theta,
            "rope_scaling": None if rope.type == "default" else rope.to_hf(),
            "attention_bias": self.attention_bias,
            "attention_multiplier": self.attention_multiplier,
            "embedding_multiplier": self.embedding_multiplier,
            "residual_multiplier": self.residual_multiplier,
            "logits_scaling": self.logits_scaling,
            "num_local_experts": 0,
            "mamba_n_heads": self.mamba_n_heads,
            "mamba_d_head": self.mamba_d_head,
            "mamba_n_groups": self.mamba_n_groups,
            "mamba_d_state": self.mamba_d_state,
            "mamba_d_conv": self.mamba_d_conv,
            "mamba_expand": self.mamba_expand,
            "mamba_chunk_size": self.mamba_chunk_size,
            "mamba_conv_bias": self.mamba_conv_bias,
            "mamba_proj_bias": self.mamba_proj_bias,
            "time_step_limit": list(self.time_step_limit),
            **self.hf_common_json(),
        }
        if rope.type == "default":
            del hf["rope_scaling"]
        return hf

    def tensor_table(self) -> list[TensorSpec]:
        d, f = self.hidden_size, self.intermediate_size
        q, kv = self.num_attention_heads * self.head_dim, self.num_key_value_heads * self.head_dim
        h, inner = self.mamba_n_heads, self.d_inner
        specs = [TensorSpec(self.hf_embedding_name, (self.vocab_size, d), self.embedding_path, None, False)]
        for i, kind in enumerate(self.layer_types):
            hf, path = f"model.layers.{i}", ("model", "layers")
            specs += norm_specs(f"{hf}.input_layernorm", path + ("input_layernorm",), i, d, False)
            if kind == ATTENTION:
                for name, d_in, d_out in (("q_proj", d, q), ("k_proj", d, kv), ("v_proj", d, kv), ("o_proj", q, d)):
                    specs += linear_specs(f"{hf}.self_attn.{name}", path + ("self_attn", name), i, d_in, d_out,
                                          self.attention_bias)
            else:
                mamba, m_path = f"{hf}.mamba", path + ("mamba",)
                specs += linear_specs(f"{mamba}.in_proj", m_path + ("in_proj",), i, d, self.in_proj_size,
                                      self.mamba_proj_bias)
                # A depthwise Conv1d weight [C, 1, K]; here [K, 1, C] (axes reversed), tap K-1 on the current token.
                specs.append(TensorSpec(f"{mamba}.conv1d.weight", (self.conv_channels, 1, self.mamba_d_conv),
                                        m_path + ("conv1d", "kernel"), i, True))
                if self.mamba_conv_bias:
                    specs.append(TensorSpec(f"{mamba}.conv1d.bias", (self.conv_channels,),
                                            m_path + ("conv1d", "bias"), i, False))
                for name in ("dt_bias", "A_log", "D"):
                    specs.append(TensorSpec(f"{mamba}.{name}", (h,), m_path + (name,), i, False))
                specs += norm_specs(f"{mamba}.norm", m_path + ("norm",), i, inner, False)
                specs += linear_specs(f"{mamba}.out_proj", m_path + ("out_proj",), i, inner, d, self.mamba_proj_bias)
            specs += norm_specs(f"{hf}.post_attention_layernorm", path + ("post_attention_layernorm",), i, d, False)
            specs += linear_specs(f"{hf}.shared_mlp.input_linear", path + ("shared_mlp", "input_linear"), i, d,
                                  2 * f, False)
            specs += linear_specs(f"{hf}.shared_mlp.output_linear", path + ("shared_mlp", "output_linear"), i, f, d,
                                  False)
        specs += norm_specs("model.norm", ("model", "norm"), None, d, False)
        if not self.tie_word_embeddings:
            specs += linear_specs("lm_head", ("lm_head",), None, d, self.vocab_size, False)
        return specs


def _time_step_limit(raw: Any) -> tuple[float, float]:
    """config.json's time_step_limit: absent (Transformers' default, no limit), [low, high] with numbers, JSON's
    Infinity, or Transformers' own `{"__float__": "Infinity"}`."""
    if raw is None:
        return NO_LIMIT

    def number(value: Any) -> float:
        if isinstance(value, dict) and set(value) == {"__float__"}:
            value = value["__float__"]
        try:
            return float(value)
        except (TypeError, ValueError):
            raise KeptError(f"config.json time_step_limit must be [low, high] numbers, got {raw!r}") from None

    if not isinstance(raw, (list, tuple)) or len(raw) != 2:
        raise KeptError(f"config.json time_step_limit must be [low, high], got {raw!r}")
    return number(raw[0]), number(raw[1])


# ---- The model ------------------------------------------------------------------------------------


class GatedRMSNorm(nn.Module):
    """Transformers' `GraniteMoeHybridRMSNormGated`: y * silu(z) in fp32, RMS-normalized within each of `groups`
    equal parts of the last axis, times the weight (fp32)."""

    groups: int
    eps: float
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, y: Array, z: Array) -> Array:
        width = y.shape[-1]
        weight = self.param("weight", logical_init(nn.initializers.ones, ("ssm_inner",)), (width,), self.param_dtype)
        gated = y.astype(jnp.float32) * jax.nn.silu(z.astype(jnp.float32))
        grouped = gated.reshape(*gated.shape[:-1], self.groups, width // self.groups)
        normed = grouped * jax.lax.rsqrt(jnp.mean(grouped * grouped, axis=-1, keepdims=True) + self.eps)
        return weight.astype(jnp.float32) * normed.reshape(gated.shape)


def _a_log_init(key, shape, dtype=jnp.float32):
    """Transformers' init: A = 1 ... H, stored as its log."""
    return jnp.log(jnp.arange(1, shape[0] + 1, dtype=jnp.float32)).astype(dtype)


class Mamba2(nn.Module):
    """The Mamba-2 mixer. `__call__(u)` is the training forward in `config.mixer_form`; `extend(u, state)` continues
    a sequence from a `MixerState` (the prefill; one token is a step of the recurrence); `mixing_matrix(u)` is the
    per-head L x L matrix y = M x that the scan computes (dt, decays and D included), before the gated norm."""

    config: HybridConfig

    def setup(self):
        cfg = self.config
        dtype, param_dtype = jnp.dtype(cfg.compute_dtype), jnp.dtype(cfg.param_dtype)
        self.in_proj = Linear(cfg.in_proj_size, cfg.mamba_proj_bias, ("embed", "ssm_in"), dtype, param_dtype,
                              lora_scale=cfg.lora_scale)
        self.conv1d = CausalConv1d(cfg.conv_channels, cfg.mamba_d_conv, cfg.mamba_conv_bias, param_dtype)
        self.dt_bias = self.param("dt_bias", logical_init(nn.initializers.ones, ("ssm_heads",)), (cfg.mamba_n_heads,),
                                  param_dtype)
        self.A_log = self.param("A_log", logical_init(_a_log_init, ("ssm_heads",)), (cfg.mamba_n_heads,), param_dtype)
        self.D = self.param("D", logical_init(nn.initializers.ones, ("ssm_heads",)), (cfg.mamba_n_heads,), param_dtype)
        self.norm = GatedRMSNorm(cfg.mamba_n_groups, cfg.rms_norm_eps, param_dtype)
        self.out_proj = Linear(cfg.hidden_size, cfg.mamba_proj_bias, ("ssm_inner", "embed"), dtype, param_dtype,
                               lora_scale=cfg.lora_scale)

    def _inputs(self, u: Array, conv_history: Array | None, lengths: Array | None = None):
        """in_proj, the convolution and the time steps: x [b, T, H, P] (fp32), B and C [b, T, G, N], z [b, T,
        d_inner], dt [b, T, H] (fp32, after softplus and the limit), the log-decays dt A [b, T, H], and the
        convolution's new history (at `lengths`, see `ssd.causal_conv`)."""
        cfg = self.config
        b, t, _ = u.shape
        z, xbc, dt = jnp.split(self.in_proj(u), [cfg.d_inner, cfg.d_inner + cfg.conv_channels], axis=-1)
        xbc, conv_history = self.conv1d(xbc, conv_history, lengths)
        xbc = jax.nn.silu(xbc)
        gn = cfg.mamba_n_groups * cfg.mamba_d_state
        x, B, C = jnp.split(xbc, [cfg.d_inner, cfg.d_inner + gn], axis=-1)
        x = x.astype(jnp.float32).reshape(b, t, cfg.mamba_n_heads, cfg.mamba_d_head)
        B, C = (v.reshape(b, t, cfg.mamba_n_groups, cfg.mamba_d_state) for v in (B, C))
        dt = jax.nn.softplus(dt.astype(jnp.float32) + self.dt_bias.astype(jnp.float32))
        dt = jnp.clip(dt, *cfg.time_step_limit)
        log_a = dt * -jnp.exp(self.A_log.astype(jnp.float32))
        return x, B, C, z, dt, log_a, conv_history

    def _output(self, y: Array, x: Array, z: Array) -> Array:
        """y + D x, the gated norm with z, then out_proj."""
        y = y + self.D.astype(jnp.float32)[:, None] * x
        return self.out_proj(self.norm(y.reshape(*z.shape), z))

    def __call__(self, u: Array) -> Array:
        cfg = self.config
        x, B, C, z, dt, log_a, _ = self._inputs(u, None)
        return self._output(ssd.mix(cfg.mixer_form, x * dt[..., None], B, C, log_a, cfg.mamba_chunk_size,
                                    cfg.compute_dtype), x, z)

    def extend(self, u: Array, state: MixerState | None = None,
               lengths: Array | None = None) -> tuple[Array, MixerState]:
        """The output for `u` [b, T, d] following `state` (None: the sequence starts here), and the state after it.
        Several tokens run in the chunked form, one token as a step of the recurrence. `lengths` [b]: row i's real
        tokens are its first lengths[i] (a right-padded batch); padding leaves the state as it is (time step 0)."""
        x, B, C, z, dt, log_a, conv = self._inputs(u, None if state is None else state.conv, lengths)
        ssm = None if state is None else state.ssm
        if lengths is not None and u.shape[1] > 1:
            real = jnp.arange(u.shape[1])[None, :] < lengths[:, None]
            dt, log_a = jnp.where(real[..., None], dt, 0.0), jnp.where(real[..., None], log_a, 0.0)
        x_dt = x * dt[..., None]
        if u.shape[1] == 1:
            y, ssm = ssd.ssd_recurrent(x_dt, B, C, log_a, initial_state=ssm)
        else:
            y, ssm = ssd.ssd_chunked(x_dt, B, C, log_a, self.config.mamba_chunk_size, ssm, self.config.compute_dtype)
        return self._output(y, x, z), MixerState(conv, ssm)

    def mixing_matrix(self, u: Array) -> Array:
        """M [b, H, T, T] (fp32): y_t = sum_s M[t, s] x_s per head, M[t, s] = (C_t . B_s) exp(sum_{s<r<=t} dt_r A)
        dt_s, D on the diagonal."""
        cfg = self.config
        x, B, C, _, dt, log_a, _ = self._inputs(u, None)
        m = ssd.mixing_matrix(B, C, log_a, cfg.mamba_n_heads, cfg.compute_dtype) * jnp.swapaxes(dt, 1, 2)[:, :, None, :]
        return m + self.D.astype(jnp.float32)[:, None, None] * jnp.eye(u.shape[1], dtype=jnp.float32)


class _Layer(nn.Module):
    """What both kinds of layer share: the two norms, the shared MLP and the residual multiplier."""

    config: HybridConfig

    def _norm(self) -> nn.Module:
        cfg = self.config
        return NORMS[cfg.norm](cfg.rms_norm_eps, jnp.dtype(cfg.param_dtype))

    def _mlp_part(self, x: Array) -> Array:
        return x + self.config.residual_multiplier * self.shared_mlp(self.post_attention_layernorm(x))

    def _mixer_part(self, x: Array, out: Array) -> Array:
        return x + self.config.residual_multiplier * out.astype(x.dtype)


class AttentionLayer(_Layer):
    """x + r attn(norm(x)), then + r mlp(norm(.)). Returns (x, None) so that it can be scanned."""

    def setup(self):
        self.input_layernorm = self._norm()
        self.self_attn = Attention(self.config)
        self.post_attention_layernorm = self._norm()
        self.shared_mlp = FusedMLP(self.config)

    def __call__(self, x: Array, cos: Array | None, sin: Array | None) -> tuple[Array, None]:
        self.sow("intermediates", "input_layernorm_in", x)
        return self._mlp_part(self._mixer_part(x, self.self_attn(self.input_layernorm(x), cos, sin))), None

    def extend(self, x: Array, cache: KVCache, positions: Array, lengths: Array) -> tuple[Array, KVCache]:
        """Generation: see `kept_jax.models.llama.DecoderLayer.extend`."""
        cos, sin = (rope_tables(self.config, positions, positions, cache.k.shape[1]) if self.config.rope is not None
                    else (None, None))
        out, cache = self.self_attn.extend(self.input_layernorm(x), cos, sin, cache, positions)
        return self._mlp_part(self._mixer_part(x, out)), cache

    def attention_probabilities(self, x: Array, cos: Array | None, sin: Array | None) -> Array:
        return self.self_attn.probabilities(self.input_layernorm(x), cos, sin)


class MambaLayer(_Layer):
    """x + r mamba(norm(x)), then + r mlp(norm(.)). Takes the rotary tables every layer gets, and ignores them: the
    state carries the position."""

    def setup(self):
        self.input_layernorm = self._norm()
        self.mamba = Mamba2(self.config)
        self.post_attention_layernorm = self._norm()
        self.shared_mlp = FusedMLP(self.config)

    def __call__(self, x: Array, cos: Array | None = None, sin: Array | None = None) -> tuple[Array, None]:
        self.sow("intermediates", "input_layernorm_in", x)
        return self._mlp_part(self._mixer_part(x, self.mamba(self.input_layernorm(x)))), None

    def extend(self, x: Array, state: MixerState, positions: Array, lengths: Array) -> tuple[Array, MixerState]:
        out, state = self.mamba.extend(self.input_layernorm(x), state, lengths)
        return self._mlp_part(self._mixer_part(x, out)), state

    def mixing_matrix(self, x: Array) -> Array:
        """[b, H, T, T]: the mixer's matrix for this layer's input x (MOHAWK's stage 1)."""
        return self.mamba.mixing_matrix(self.input_layernorm(x))


class HybridDecoder(nn.Module):
    """Transformers' `model`: embeddings (times embedding_multiplier), the layers and the final norm."""

    config: HybridConfig

    def setup(self):
        cfg = self.config
        dtype, param_dtype = jnp.dtype(cfg.compute_dtype), jnp.dtype(cfg.param_dtype)
        self.embed_tokens = Embed(cfg.vocab_size, cfg.hidden_size, dtype, param_dtype)
        self.layers = layer_stack(cfg)
        self.norm = NORMS[cfg.norm](cfg.rms_norm_eps, param_dtype)

    def embed(self, tokens: Array) -> Array:
        x = self.embed_tokens(tokens)
        multiplier = self.config.embedding_multiplier
        return x if multiplier == 1 else x * jnp.asarray(multiplier, x.dtype)

    def __call__(self, tokens: Array) -> Array:
        x, _ = self.layers(self.embed(tokens), *self.config.block_args(tokens))
        self.sow("intermediates", "norm_in", x)
        return self.norm(x)


class HybridForCausalLM(nn.Module):
    """`model.apply({"params": params}, tokens, output=...)`; tokens are int32 [batch, seq].

    output: "logits" (fp32 [batch, seq, vocab], divided by logits_scaling), "hidden" (final hidden states after the
    last norm, before the head, in the compute dtype) or "both" (a (logits, hidden) pair).
    """

    config: HybridConfig

    def setup(self):
        cfg = self.config
        self.model = HybridDecoder(cfg)
        if not cfg.tie_word_embeddings:
            self.lm_head = Linear(cfg.vocab_size, False, ("embed", "vocab"), jnp.dtype(cfg.compute_dtype),
                                  jnp.dtype(cfg.param_dtype))

    def __call__(self, tokens: Array, output: Literal["logits", "hidden", "both"] = "logits"):
        return model_output(output, self.model(tokens), self.logits)

    def logits(self, hidden: Array) -> Array:
        if self.config.tie_word_embeddings:
            logits = self.model.embed_tokens.attend(hidden)
        else:
            logits = self.lm_head(hidden)
        return logits if self.config.logits_scaling == 1 else logits / self.config.logits_scaling

    def embed(self, tokens: Array) -> Array:
        """What enters the first layer (generation runs the layers itself, with their states)."""
        return self.model.embed(tokens)

    def head(self, x: Array) -> Array:
        """fp32 logits from what leaves the last layer: the final norm, then the head."""
        return self.logits(self.model.norm(x))
