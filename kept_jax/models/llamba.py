"""Llamba (Cartesia 2025): a Llama decoder whose attention sublayers are Discrete-Mamba-2 mixers. docs/llamba.md.

    h += mixer(RMSNorm_1e-5(h));  h += LlamaMLP(RMSNorm_1e-5(h));  ...;  logits = head(RMSNorm_norm_epsilon(h))

No RoPE: position comes from the causal convolution and the decays. The mixer, per layer (H = n_v_heads heads of dim
P = d_inner / H, G = n_qk_heads groups sharing B and C, N = d_state):

    [xBC | z | l] = in_proj(u)                          xBC: d_inner + 2 G N channels, z: d_inner, l: H
    xBC = causal depthwise conv (kernel d_conv, bias), then the activation (identity in every published checkpoint)
    x [H, P], B [G, N], C [G, N] = split(xBC)            head-major
    a_t = sigmoid(-l_t) = exp(-softplus(l_t));  S_t = a_t S_{t-1} + x_t B_t^T;  y_t = S_t C_t + D_h x_t
    out = out_proj(y * silu(z + z_bias))

The state-space part runs in one of three forms that agree (`kept_jax/models/ssd.py`): chunked (training), the
materialized L x L matrix (MOHAWK's stage 1), and the recurrence (generation). Parameter paths follow the published
checkpoints' names: `backbone/embedding`, `backbone/layers/{input_layernorm, mixer, post_attention_layernorm, mlp}`,
`backbone/final_layernorm`, `lm_head`; the vocabulary is padded up to a multiple of `pad_vocab_size_multiple`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

import kept_jax.models.ssd as ssd
from kept_jax.config import ModelConfig, check_choice, check_hf_keys, check_positive_ints, hf_common_fields
from kept_jax.errors import KeptError
from kept_jax.models.layers import (MLP, CausalConv1d, Embed, Linear, MixerState, RMSNorm, layer_stack, logical_init,
                                    model_output)
from kept_jax.models.names import TensorSpec, linear_specs, norm_specs

Array = jax.Array

BLOCK_NORM_EPS = 1e-5  # the two block norms', whatever norm_epsilon says (it is the final norm's)
SSM_ACTIVATIONS = ("identity", "silu")
# config.json keys, at the top level and in the two sub-configs, with the reference implementation's defaults.
TOP_KEYS = frozenset("""
    vocab_size d_model n_layer tie_embeddings pad_vocab_size_multiple lm_head_bias norm_epsilon resid_dropout mlp_cfg
    ssm_cfg dtype torch_dtype bos_token_id eos_token_id pad_token_id tie_word_embeddings
    """.split())
MLP_DEFAULTS = {"intermediate_size": 14336, "bias": False, "act_fn": "silu"}
SSM_DEFAULTS = {"d_state": 64, "n_v_heads": 32, "n_qk_heads": 32, "expand": 1, "chunk_size": 128,
                "activation": "identity", "bias": False, "d_conv": 4, "conv_bias": True}


@dataclasses.dataclass(frozen=True, kw_only=True)
class LlambaConfig(ModelConfig):
    """A Llamba `config.json`: `d_model` is `hidden_size`, `n_layer` is `num_hidden_layers`, `tie_embeddings` is
    `tie_word_embeddings`, `norm_epsilon` is `rms_norm_eps`, `mlp_cfg.intermediate_size` and `.bias` are
    `intermediate_size` and `mlp_bias`; `ssm_cfg` is spelled out below."""

    architecture: str = "llamba"
    d_state: int = 64
    n_v_heads: int = 32
    n_qk_heads: int = 32
    expand: int = 1
    chunk_size: int = 128
    d_conv: int = 4
    conv_bias: bool = True
    ssm_activation: str = "identity"
    pad_vocab_size_multiple: int = 8
    resid_dropout: float = 0.0  # read and written back; kept_jax trains without dropout, as the reference block does
    # Runtime: which form of the state-space mixing the forward pass uses.
    mixer_form: str = "chunked"

    embedding_path: ClassVar[tuple[str, ...]] = ("backbone", "embedding", "embedding")
    hf_embedding_name: ClassVar[str] = "backbone.embedding.weight"
    hf_tie_key: ClassVar[str] = "tie_embeddings"
    model_types: ClassVar[tuple[str, ...]] = ("llamba",)
    layout_keys: ClassVar[frozenset[str]] = frozenset({"d_model", "ssm_cfg"})
    hf_single_file: ClassVar[bool] = True  # huggingface_hub's PyTorchModelHubMixin loads model.safetensors alone
    # in_proj's outputs (x, B, C, z, l side by side) stay whole; the inner dimension splits like attention's heads.
    logical_axis_rules: ClassVar[dict[str, Any]] = {"ssm_in": None, "ssm_conv": None, "ssm_inner": "tensor",
                                                    "ssm_heads": None}

    def __post_init__(self):
        if self.architecture != "llamba":
            raise KeptError(f"LlambaConfig is for model_type 'llamba', not {self.architecture!r}")
        super().__post_init__()
        check_positive_ints({k: getattr(self, k) for k in ("d_state", "n_v_heads", "n_qk_heads", "expand", "chunk_size",
                                                           "d_conv", "pad_vocab_size_multiple")})
        if self.n_v_heads % self.n_qk_heads:
            raise KeptError(f"ssm_cfg.n_v_heads ({self.n_v_heads}) must be a multiple of ssm_cfg.n_qk_heads "
                            f"({self.n_qk_heads}): each group of B and C is shared by n_v_heads / n_qk_heads heads")
        if self.d_inner % self.n_v_heads:
            raise KeptError(f"expand x d_model = {self.d_inner} must be a multiple of ssm_cfg.n_v_heads "
                            f"({self.n_v_heads}): the heads split the inner dimension evenly")
        check_choice("ssm_cfg.activation", self.ssm_activation, SSM_ACTIVATIONS)
        check_choice("mixer_form", self.mixer_form, ssd.FORMS)

    # ---- Derived sizes ------------------------------------------------------------------------

    @property
    def d_inner(self) -> int:
        return self.expand * self.hidden_size

    @property
    def head_dim(self) -> int:
        return self.d_inner // self.n_v_heads

    @property
    def conv_channels(self) -> int:
        """x, B and C, which the convolution reads."""
        return self.d_inner + 2 * self.n_qk_heads * self.d_state

    @property
    def mixer_heads(self) -> int:
        return self.n_v_heads

    @property
    def ssm_chunk(self) -> int:
        return self.chunk_size

    @property
    def bc_width(self) -> int:
        """B's (and C's) channels: groups x d_state."""
        return self.n_qk_heads * self.d_state

    @property
    def in_proj_size(self) -> int:
        return self.conv_channels + self.d_inner + self.n_v_heads

    @property
    def max_position_embeddings(self) -> None:
        """No maximum: position comes from the convolution and the decays, not from a table of positions."""
        return None

    def empty_cache(self, batch: int, length: int) -> tuple[MixerState, ...]:
        """Each layer's generation state at the start of a sequence: conv window [b, K-1, C] and state-space state
        [b, H, P, N], both fp32 (activations are). Its size does not depend on `length`."""
        conv = jnp.zeros((batch, self.d_conv - 1, self.conv_channels), jnp.float32)
        ssm = jnp.zeros((batch, self.n_v_heads, self.head_dim, self.d_state), jnp.float32)
        return tuple(MixerState(conv, ssm) for _ in range(self.num_hidden_layers))

    @property
    def padded_vocab_size(self) -> int:
        m = self.pad_vocab_size_multiple
        return -(-self.vocab_size // m) * m

    @property
    def model_class(self) -> type[nn.Module]:
        return LlambaForCausalLM

    @property
    def block_class(self) -> type[nn.Module]:
        return LlambaBlock

    @property
    def layer_kinds(self) -> tuple[str, ...]:
        return ("discrete-mamba2",) * self.num_hidden_layers

    def layout_flags(self) -> dict[str, Any]:
        return {self.hf_tie_key: self.tie_word_embeddings, "mlp_cfg.bias": self.mlp_bias,
                "ssm_cfg.conv_bias": self.conv_bias}

    def describe(self) -> str:
        return (f"{super().describe()}; mixer: {self.n_v_heads} heads x {self.head_dim}, {self.n_qk_heads} B/C "
                f"groups, d_state {self.d_state}, conv {self.d_conv}, chunk {self.chunk_size}")

    # ---- Parameter and FLOP formulas ----------------------------------------------------------

    def num_params(self) -> int:
        d, f, v = self.hidden_size, self.intermediate_size, self.padded_vocab_size
        mixer = (d * self.in_proj_size + self.d_inner  # in_proj, z_bias
                 + self.conv_channels * (self.d_conv + self.conv_bias) + self.n_v_heads  # conv1d, D
                 + self.d_inner * d)  # out_proj
        mlp = 3 * d * f + (2 * f + d if self.mlp_bias else 0)
        head = 0 if self.tie_word_embeddings else d * v
        return v * d + self.num_hidden_layers * (mixer + mlp + 2 * d) + d + head

    def layer_matmul_params(self) -> tuple[int, ...]:
        d = self.hidden_size
        return (d * self.in_proj_size + self.d_inner * d + 3 * d * self.intermediate_size,) * self.num_hidden_layers

    def layer_mixing_flops(self, seq_len: int) -> tuple[float, ...]:
        """Per layer, the chunked form's (`ssd.chunked_flops_per_token`) and the convolution's 2 d_conv (d_inner +
        2 G N). Elementwise work (decays, gate) is not counted."""
        per_layer = (ssd.chunked_flops_per_token(self.n_v_heads, self.n_qk_heads, self.head_dim, self.d_state,
                                                 self.chunk_size, seq_len)
                     + 2 * self.d_conv * self.conv_channels)
        return (per_layer,) * self.num_hidden_layers

    # ---- Hugging Face config.json and tensor names ---------------------------------------------

    @classmethod
    def _from_hf(cls, hf: dict[str, Any], **runtime: Any) -> "LlambaConfig":
        check_hf_keys(hf, TOP_KEYS)
        for key in ("vocab_size", "d_model"):
            if key not in hf:
                raise KeptError(f"config.json is missing the required field {key!r}")
        mlp = _sub_config(hf, "mlp_cfg", MLP_DEFAULTS)
        ssm = _sub_config(hf, "ssm_cfg", SSM_DEFAULTS)
        # Named as config.json names them, before the fields' own checks (which use kept_jax's names).
        check_positive_ints({"vocab_size": hf["vocab_size"], "d_model": hf["d_model"], "n_layer": hf.get("n_layer", 32),
                             "mlp_cfg.intermediate_size": mlp["intermediate_size"],
                             **{f"ssm_cfg.{k}": ssm[k] for k in ("d_state", "n_v_heads", "n_qk_heads", "expand",
                                                                 "chunk_size", "d_conv")}})
        for name, value, supported in (("lm_head_bias", hf.get("lm_head_bias", False), False),
                                       ("ssm_cfg.bias", ssm["bias"], False), ("mlp_cfg.act_fn", mlp["act_fn"], "silu")):
            if value != supported:
                raise KeptError(f"config.json sets {name}={value!r}; kept_jax supports only {supported!r}, which "
                                "every published Llamba checkpoint uses")
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["d_model"],
            intermediate_size=mlp["intermediate_size"],
            num_hidden_layers=hf.get("n_layer", 32),
            rms_norm_eps=float(hf.get("norm_epsilon", 1e-5)),
            mlp_bias=bool(mlp["bias"]),
            tie_word_embeddings=bool(hf.get("tie_embeddings", False)),
            d_state=ssm["d_state"],
            n_v_heads=ssm["n_v_heads"],
            n_qk_heads=ssm["n_qk_heads"],
            expand=ssm["expand"],
            chunk_size=ssm["chunk_size"],
            d_conv=ssm["d_conv"],
            conv_bias=bool(ssm["conv_bias"]),
            ssm_activation=ssm["activation"],
            pad_vocab_size_multiple=hf.get("pad_vocab_size_multiple", 8),
            resid_dropout=float(hf.get("resid_dropout", 0.0)),
            **hf_common_fields(hf),
            **runtime,
        )

    def to_hf_dict(self) -> dict[str, Any]:
        """The published layout (docs/llamba.md) and the token ids, nothing else. No dtype: the official
        `LlambaLMHeadModel.from_pretrained` (cartesia_pytorch, through huggingface_hub's PyTorchModelHubMixin) passes
        config.json's keys on to its constructor, whose own `config`, `initializer_cfg`, `device` and `dtype`
        parameters they would replace (the weights' dtype is in the safetensors file). No model_type: Transformers,
        which has no Llamba, warns about a model_type it does not know whenever AutoTokenizer opens the directory;
        kept_jax knows the layout by its keys (`layout_keys`)."""
        return {
            "vocab_size": self.vocab_size,
            "d_model": self.hidden_size,
            "n_layer": self.num_hidden_layers,
            "tie_embeddings": self.tie_word_embeddings,
            "pad_vocab_size_multiple": self.pad_vocab_size_multiple,
            "lm_head_bias": False,
            "norm_epsilon": self.rms_norm_eps,
            "resid_dropout": self.resid_dropout,
            "mlp_cfg": {"intermediate_size": self.intermediate_size, "bias": self.mlp_bias, "act_fn": "silu"},
            "ssm_cfg": {"d_state": self.d_state, "n_v_heads": self.n_v_heads, "n_qk_heads": self.n_qk_heads,
                        "expand": self.expand, "chunk_size": self.chunk_size, "activation": self.ssm_activation,
                        "bias": False, "d_conv": self.d_conv, "conv_bias": self.conv_bias},
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
        }

    def tensor_table(self) -> list[TensorSpec]:
        d, f, v = self.hidden_size, self.intermediate_size, self.padded_vocab_size
        specs = [TensorSpec(self.hf_embedding_name, (v, d), self.embedding_path, None, False)]
        for i in range(self.num_hidden_layers):
            hf, path = f"backbone.layers.{i}", ("backbone", "layers")
            mixer, mixer_path = f"{hf}.mixer", path + ("mixer",)
            specs += norm_specs(f"{hf}.input_layernorm", path + ("input_layernorm",), i, d, False)
            specs += linear_specs(f"{mixer}.in_proj", mixer_path + ("in_proj",), i, d, self.in_proj_size, False)
            specs.append(TensorSpec(f"{mixer}.z_bias", (self.d_inner,), mixer_path + ("z_bias",), i, False))
            # A depthwise Conv1d weight [C, 1, K]; here [K, 1, C] (axes reversed), tap K-1 on the current token.
            specs.append(TensorSpec(f"{mixer}.conv1d.weight", (self.conv_channels, 1, self.d_conv),
                                    mixer_path + ("conv1d", "kernel"), i, True))
            if self.conv_bias:
                specs.append(TensorSpec(f"{mixer}.conv1d.bias", (self.conv_channels,), mixer_path + ("conv1d", "bias"),
                                        i, False))
            specs.append(TensorSpec(f"{mixer}.D", (self.n_v_heads,), mixer_path + ("D",), i, False))
            specs += linear_specs(f"{mixer}.out_proj", mixer_path + ("out_proj",), i, self.d_inner, d, False)
            specs += norm_specs(f"{hf}.post_attention_layernorm", path + ("post_attention_layernorm",), i, d, False)
            for name, d_in, d_out in (("gate_proj", d, f), ("up_proj", d, f), ("down_proj", f, d)):
                specs += linear_specs(f"{hf}.mlp.{name}", path + ("mlp", name), i, d_in, d_out, self.mlp_bias)
        specs += norm_specs("backbone.final_layernorm", ("backbone", "final_layernorm"), None, d, False)
        if not self.tie_word_embeddings:
            specs += linear_specs("lm_head", ("lm_head",), None, d, v, False)
        return specs


def _sub_config(hf: dict[str, Any], key: str, defaults: dict[str, Any]) -> dict[str, Any]:
    """`mlp_cfg` or `ssm_cfg` with the reference's defaults for what it leaves out; unknown keys are refused."""
    sub = hf.get(key)
    if sub is None:
        return dict(defaults)
    if not isinstance(sub, dict):
        raise KeptError(f"config.json {key} must be an object, got {sub!r}")
    check_hf_keys(sub, defaults, where=f"config.json {key}")
    return {**defaults, **sub}


# ---- The model ------------------------------------------------------------------------------------


class DiscreteMamba2(nn.Module):
    """The mixer. `__call__(u)` is the training forward in `config.mixer_form`; `extend(u, state)` continues a
    sequence from a `MixerState` (the prefill, and with one token the generation step); `mixing_matrix(u)` is the
    per-head L x L matrix the mixer applies to x (D on its diagonal)."""

    config: LlambaConfig

    def setup(self):
        cfg = self.config
        dtype, param_dtype = jnp.dtype(cfg.compute_dtype), jnp.dtype(cfg.param_dtype)
        self.in_proj = Linear(cfg.in_proj_size, False, ("embed", "ssm_in"), dtype, param_dtype,
                              lora_scale=cfg.lora_scale)
        self.z_bias = self.param("z_bias", logical_init(nn.initializers.zeros, ("ssm_inner",)), (cfg.d_inner,),
                                 param_dtype)
        self.conv1d = CausalConv1d(cfg.conv_channels, cfg.d_conv, cfg.conv_bias, param_dtype)
        self.D = self.param("D", logical_init(nn.initializers.ones, ("ssm_heads",)), (cfg.n_v_heads,), param_dtype)
        self.out_proj = Linear(cfg.hidden_size, False, ("ssm_inner", "embed"), dtype, param_dtype,
                               lora_scale=cfg.lora_scale)

    def _inputs(self, u: Array, conv_history: Array | None, lengths: Array | None = None):
        """in_proj and the convolution: x [b, T, H, P], B and C [b, T, G, N], z [b, T, d_inner], the log-decays
        [b, T, H] (fp32), and the convolution's new history (at `lengths`, see `ssd.causal_conv`)."""
        cfg = self.config
        b, t, _ = u.shape
        xbc, z, ell = jnp.split(self.in_proj(u), [cfg.conv_channels, cfg.conv_channels + cfg.d_inner], axis=-1)
        xbc, conv_history = self.conv1d(xbc, conv_history, lengths)
        if cfg.ssm_activation == "silu":
            xbc = jax.nn.silu(xbc)
        gn = cfg.n_qk_heads * cfg.d_state
        x, B, C = jnp.split(xbc, [cfg.d_inner, cfg.d_inner + gn], axis=-1)
        x = x.reshape(b, t, cfg.n_v_heads, cfg.head_dim)
        B, C = (v.reshape(b, t, cfg.n_qk_heads, cfg.d_state) for v in (B, C))
        log_a = -jax.nn.softplus(ell.astype(jnp.float32))  # log sigmoid(-l), finite for any l
        return x, B, C, z, log_a, conv_history

    def _output(self, y: Array, x: Array, z: Array) -> Array:
        """y + D x, gated by silu(z + z_bias), then out_proj."""
        y = y + self.D.astype(jnp.float32)[:, None] * x.astype(jnp.float32)
        return self.out_proj(y.reshape(*z.shape) * jax.nn.silu(z + self.z_bias.astype(jnp.float32)))

    def __call__(self, u: Array) -> Array:
        cfg = self.config
        x, B, C, z, log_a, _ = self._inputs(u, None)
        return self._output(ssd.mix(cfg.mixer_form, x, B, C, log_a, cfg.chunk_size, cfg.compute_dtype), x, z)

    def extend(self, u: Array, state: MixerState | None = None,
               lengths: Array | None = None) -> tuple[Array, MixerState]:
        """The output for `u` [b, T, d] following `state` (None: the sequence starts here), and the state after it.
        Several tokens run in the chunked form, one token as a step of the recurrence.

        `lengths` [b]: row i's real tokens are its first lengths[i] (a right-padded batch of prompts); the returned
        state is the state after them, and the outputs at the padding are not meaningful."""
        x, B, C, z, log_a, conv = self._inputs(u, None if state is None else state.conv, lengths)
        ssm = None if state is None else state.ssm
        if u.shape[1] == 1:
            y, ssm = ssd.ssd_recurrent(x, B, C, log_a, initial_state=ssm)
        else:
            x_in, log_a_in = x, log_a
            if lengths is not None:  # padding leaves the state as it is: no input, decay 1
                real = jnp.arange(u.shape[1])[None, :] < lengths[:, None]
                x_in = jnp.where(real[..., None, None], x, 0)
                log_a_in = jnp.where(real[..., None], log_a, 0.0)
            y, ssm = ssd.ssd_chunked(x_in, B, C, log_a_in, self.config.chunk_size, ssm, self.config.compute_dtype)
        return self._output(y, x, z), MixerState(conv, ssm)

    def mixing_matrix(self, u: Array) -> Array:
        """M [b, H, T, T] (fp32): y_t = sum_s M[t, s] x_s per head before the gate, D on the diagonal."""
        x, B, C, _, log_a, _ = self._inputs(u, None)
        m = ssd.mixing_matrix(B, C, log_a, self.config.n_v_heads, self.config.compute_dtype)
        return m + self.D.astype(jnp.float32)[:, None, None] * jnp.eye(u.shape[1], dtype=jnp.float32)


class LlambaBlock(nn.Module):
    """h + mixer(norm(h)), then + mlp(norm(.)). Returns (h, None) so that it can be scanned."""

    config: LlambaConfig

    def setup(self):
        cfg = self.config
        param_dtype = jnp.dtype(cfg.param_dtype)
        self.input_layernorm = RMSNorm(BLOCK_NORM_EPS, param_dtype)
        self.mixer = DiscreteMamba2(cfg)
        self.post_attention_layernorm = RMSNorm(BLOCK_NORM_EPS, param_dtype)
        self.mlp = MLP(cfg)

    def __call__(self, x: Array) -> tuple[Array, None]:
        x = x + self.mixer(self.input_layernorm(x)).astype(x.dtype)
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, None

    def extend(self, x: Array, state: MixerState, positions: Array, lengths: Array) -> tuple[Array, MixerState]:
        """Generation: the block on `x` [b, T, d] following the mixer's `state`; see `DiscreteMamba2.extend`.
        `positions` is unused: the state carries the position."""
        out, state = self.mixer.extend(self.input_layernorm(x), state, lengths)
        x = x + out.astype(x.dtype)
        return x + self.mlp(self.post_attention_layernorm(x)), state

    def mixing_matrix(self, x: Array) -> Array:
        """[b, H, T, T]: the mixer's matrix for this block's input x (MOHAWK's stage 1)."""
        return self.mixer.mixing_matrix(self.input_layernorm(x))


class LlambaBackbone(nn.Module):
    """The published checkpoints' `backbone`: embedding, the layer stack, the final norm. Returns hidden states."""

    config: LlambaConfig

    def setup(self):
        cfg = self.config
        dtype, param_dtype = jnp.dtype(cfg.compute_dtype), jnp.dtype(cfg.param_dtype)
        self.embedding = Embed(cfg.padded_vocab_size, cfg.hidden_size, dtype, param_dtype)
        self.layers = layer_stack(cfg)
        self.final_layernorm = RMSNorm(cfg.rms_norm_eps, param_dtype)

    def __call__(self, tokens: Array) -> Array:
        x, _ = self.layers(self.embedding(tokens))
        return self.final_layernorm(x)


class LlambaForCausalLM(nn.Module):
    """`model.apply({"params": params}, tokens, output=...)`; tokens are int32 [batch, seq].

    output: "logits" (fp32 [batch, seq, padded vocab]), "hidden" (final hidden states after the last norm, before
    the head, in the compute dtype) or "both" (a (logits, hidden) pair).
    """

    config: LlambaConfig

    def setup(self):
        cfg = self.config
        self.backbone = LlambaBackbone(cfg)
        if not cfg.tie_word_embeddings:
            self.lm_head = Linear(cfg.padded_vocab_size, False, ("embed", "vocab"), jnp.dtype(cfg.compute_dtype),
                                  jnp.dtype(cfg.param_dtype))

    def __call__(self, tokens: Array, output: Literal["logits", "hidden", "both"] = "logits"):
        return model_output(output, self.backbone(tokens), self.logits)

    def logits(self, hidden: Array) -> Array:
        if self.config.tie_word_embeddings:
            return self.backbone.embedding.attend(hidden)
        return self.lm_head(hidden)

    def embed(self, tokens: Array) -> Array:
        """What enters the first layer (generation runs the layers itself, with their states)."""
        return self.backbone.embedding(tokens)

    def head(self, x: Array) -> Array:
        """fp32 logits from what leaves the last layer: the final norm, then the head."""
        return self.logits(self.backbone.final_layernorm(x))
