"""The shared building blocks of every architecture: embedding, linear, norms, RoPE, attention, SwiGLU MLP, and
the stack of layers (scanned or unrolled, with a remat policy).

Numerics follow Hugging Face (docs/design.md, Models): norms in fp32, RoPE angles in fp32, softmax in fp32. The
precision policy: every matrix product takes its operands in the compute dtype and accumulates in fp32
(kept_jax.models.products); activations between products stay fp32 (bf16 elementwise work is slower than fp32 on a
CPU, and fp32 activations are more accurate than Transformers' bf16 ones).
Parameters carry logical axis names so that sharding rules can place them on a device mesh.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import kept_jax.models.products as products
from kept_jax.config import ModelConfig
from kept_jax.errors import KeptError
from kept_jax.models.attention import causal_attention
from kept_jax.models.ssd import causal_conv
from kept_jax.quantize import dequantize

Array = jax.Array


def logical_init(init_fn, axes: Sequence[str | None]):
    """An initializer whose parameter carries logical axis names (for the sharding rules)."""
    return nn.with_logical_partitioning(init_fn, tuple(axes))


class Linear(nn.Module):
    """y = x @ kernel (+ bias). `kernel` is [in, out] (HF's `weight` transposed)."""

    features: int
    use_bias: bool
    axes: tuple[str | None, str | None]
    dtype: jnp.dtype = jnp.float32  # of the product's operands; the result is fp32
    param_dtype: jnp.dtype = jnp.float32
    lora_scale: float = 1.0

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kernel = self.param(
            "kernel",
            logical_init(nn.initializers.normal(stddev=0.02), self.axes),
            (x.shape[-1], self.features),
            self.param_dtype,
        )
        # [..., in] -> [tokens, in]: a plain 2-D matmul, whose weight gradient XLA:CPU computes without the
        # transposes a [batch, seq, in] contraction costs (benchmarks/xkd_step.py; a bitcast on every backend).
        lead = x.shape[:-1]
        x = x.reshape(-1, x.shape[-1])
        kernel = dequantize(kernel)  # a kept_jax.quantize kernel: floats for this layer only, inside the layer scan
        y = products.linear(x, kernel, self.dtype)  # fp32
        if self.has_variable("lora", "a"):  # LoRA adapter: y += scale * (x a) b, with a [in, r] and b [r, out]
            a, b = self.get_variable("lora", "a"), self.get_variable("lora", "b")
            y = y + self.lora_scale * products.linear(products.linear(x, a, self.dtype), b, self.dtype)
        if self.use_bias:
            bias = self.param("bias", logical_init(nn.initializers.zeros, self.axes[1:]), (self.features,),
                              self.param_dtype)
            y = y + bias.astype(jnp.float32)
        return y.reshape(*lead, self.features)


class Embed(nn.Module):
    """Token embedding; `attend` is the tied output head."""

    num_embeddings: int
    features: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def setup(self):
        self.embedding = self.param(
            "embedding",
            logical_init(nn.initializers.normal(stddev=0.02), ("vocab", "embed")),
            (self.num_embeddings, self.features),
            self.param_dtype,
        )

    def __call__(self, tokens: Array) -> Array:
        return jnp.take(self.embedding, tokens, axis=0).astype(jnp.float32)

    def attend(self, hidden: Array) -> Array:
        """fp32 logits of a head tied to this embedding."""
        return products.attend(hidden, self.embedding, self.dtype)


class RMSNorm(nn.Module):
    """HF `LlamaRMSNorm`: normalize in fp32, then multiply by the weight (fp32 out, as HF's in an fp32 model)."""

    eps: float
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        weight = self.param("weight", logical_init(nn.initializers.ones, ("norm",)), (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return weight.astype(jnp.float32) * normed


class LayerNorm(nn.Module):
    """`torch.nn.LayerNorm`: biased variance, eps inside the sqrt, the affine applied in fp32."""

    eps: float
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        weight = self.param("weight", logical_init(nn.initializers.ones, ("norm",)), (x.shape[-1],), self.param_dtype)
        bias = self.param("bias", logical_init(nn.initializers.zeros, ("norm",)), (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        centered = x32 - mean
        var = jnp.mean(centered * centered, axis=-1, keepdims=True)
        normed = centered * jax.lax.rsqrt(var + self.eps)
        return normed * weight.astype(jnp.float32) + bias.astype(jnp.float32)


NORMS = {"rmsnorm": RMSNorm, "layernorm": LayerNorm}


# ---- RoPE ---------------------------------------------------------------------------------------


ROPE_TYPES = ("default", "linear", "dynamic", "llama3")
ATTENTION_IMPLS = ("xla", "cudnn")  # kept_jax's blocked attention, or the fused cuDNN kernel (NVIDIA GPUs)


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters, as HF's `rope_parameters` describes them."""

    type: str = "default"
    theta: float = 10000.0
    factor: float = 1.0
    # llama3 only.
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None
    original_max_position_embeddings: int | None = None

    def __post_init__(self):
        if self.type not in ROPE_TYPES:
            raise KeptError(
                f"unsupported rope type {self.type!r}; kept_jax supports {', '.join(ROPE_TYPES)}"
            )
        if not (self.theta > 0 and math.isfinite(self.theta)):
            raise KeptError(f"rope_theta must be a positive number, got {self.theta!r}")
        if self.type != "default" and not self.factor > 0:
            raise KeptError(f"rope type {self.type!r} needs a positive 'factor', got {self.factor!r}")
        if self.type == "llama3":
            missing = [
                k
                for k in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
                if getattr(self, k) is None
            ]
            if missing:
                raise KeptError(f"rope type 'llama3' needs {', '.join(missing)} in rope_parameters")
            if self.high_freq_factor == self.low_freq_factor:
                raise KeptError("rope type 'llama3' needs high_freq_factor != low_freq_factor")

    def to_hf(self) -> dict[str, Any]:
        """The v5 `rope_parameters` dict."""
        out: dict[str, Any] = {"rope_type": self.type, "rope_theta": self.theta}
        if self.type != "default":
            out["factor"] = self.factor
        if self.type == "llama3":
            out["low_freq_factor"] = self.low_freq_factor
            out["high_freq_factor"] = self.high_freq_factor
            out["original_max_position_embeddings"] = self.original_max_position_embeddings
        return out


def rope_from_hf(hf: dict[str, Any]) -> RopeConfig:
    """Reads v5 `rope_parameters` and/or the older `rope_theta` + `rope_scaling`; both must agree."""
    v5 = hf.get("rope_parameters")
    old_scaling = hf.get("rope_scaling")
    old_theta = hf.get("rope_theta")
    if v5 is not None and not isinstance(v5, dict):
        raise KeptError(f"config.json rope_parameters must be an object, got {v5!r}")
    if old_scaling is not None and not isinstance(old_scaling, dict):
        raise KeptError(f"config.json rope_scaling must be an object or null, got {old_scaling!r}")
    if v5 and any(isinstance(v, dict) for v in v5.values()):
        raise KeptError("config.json has per-layer-type rope_parameters; kept_jax supports one rope for all layers")

    params: dict[str, Any] = {}
    if old_scaling:
        params.update(old_scaling)
    if old_theta is not None:
        params["rope_theta"] = old_theta
    if v5:
        for key, value in v5.items():
            if key in params and key not in ("type", "rope_type") and params[key] != value:
                raise KeptError(
                    f"config.json disagrees with itself: rope_parameters.{key}={value!r} but the older "
                    f"rope_theta/rope_scaling form says {params[key]!r}; make them agree"
                )
        params.update(v5)
    rope_type = params.get("rope_type") or params.get("type") or "default"
    old_type = (old_scaling or {}).get("rope_type") or (old_scaling or {}).get("type")
    if v5 and old_type and rope_type != old_type:
        raise KeptError(
            f"config.json disagrees with itself: rope_parameters says rope type {rope_type!r} but rope_scaling "
            f"says {old_type!r}; make them agree"
        )
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise KeptError("partial_rotary_factor != 1 is not supported by kept_jax")
    if params.get("attention_factor", 1.0) not in (1.0, None):
        raise KeptError(f"rope attention_factor != 1 is not supported for rope type {rope_type!r}")
    original = params.get("original_max_position_embeddings", hf.get("original_max_position_embeddings"))
    if rope_type == "llama3" and original is None:
        original = hf.get("max_position_embeddings")  # HF's own fallback
    return RopeConfig(
        type=rope_type,
        theta=float(params.get("rope_theta", 10000.0)),
        factor=float(params.get("factor", 1.0)),
        low_freq_factor=params.get("low_freq_factor"),
        high_freq_factor=params.get("high_freq_factor"),
        original_max_position_embeddings=original,
    )


def rope_inv_freq(rope: RopeConfig, head_dim: int, max_position_embeddings: int, seq_len: int) -> np.ndarray:
    """Inverse frequencies [head_dim/2] in fp32, as HF's rope init functions compute them.

    `seq_len` matters only for the `dynamic` type, which rescales the base past `max_position_embeddings`.
    """
    f32 = np.float32
    exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(f32) / f32(head_dim)
    base = rope.theta
    if rope.type == "dynamic":
        length = max(seq_len, max_position_embeddings)
        base = base * ((rope.factor * length / max_position_embeddings) - (rope.factor - 1)) ** (
            head_dim / (head_dim - 2)
        )
    inv_freq = f32(1.0) / (f32(base) ** exponents)
    if rope.type == "linear":
        inv_freq = inv_freq / f32(rope.factor)
    elif rope.type == "llama3":
        old_len = rope.original_max_position_embeddings
        low_wavelen = old_len / rope.low_freq_factor
        high_wavelen = old_len / rope.high_freq_factor
        wavelen = f32(2 * math.pi) / inv_freq
        scaled = np.where(wavelen > low_wavelen, inv_freq / f32(rope.factor), inv_freq)
        smooth = (old_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
        smoothed = (1 - smooth) * scaled / f32(rope.factor) + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        inv_freq = np.where(medium, smoothed, scaled)
    return inv_freq.astype(f32)


def rope_cos_sin(positions: Array, inv_freq: np.ndarray) -> tuple[Array, Array]:
    """cos and sin [batch, seq, head_dim] in fp32, rotate-half (HF/NeoX) layout."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)[None, None, :]
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
    """x: [batch, seq, heads, head_dim]; applied in x's dtype, as HF does."""
    cos = cos[:, :, None, :].astype(x.dtype)
    sin = sin[:, :, None, :].astype(x.dtype)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


def rope_tables(cfg: Any, tokens: Array, positions: Array | None = None,
                length: int | None = None) -> tuple[Array, Array]:
    """cos and sin for `tokens` [b, T] at `positions` (default 0..T-1), from `cfg.rope`, `cfg.head_dim` and
    `cfg.max_position_embeddings`. `dynamic` rope rescales by the (static) sequence `length` (default T), like HF for
    positions 0..T-1."""
    seq = tokens.shape[-1]
    inv_freq = rope_inv_freq(cfg.rope, cfg.head_dim, cfg.max_position_embeddings, length or seq)
    if positions is None:
        # Positions 0..T-1 (training, scoring): the tables are evaluated now and are constants of the program. Computed
        # in the program, XLA fuses cos and sin into every use and evaluates them again for each head of each layer,
        # forward and backward (a tenth of a bf16 training step on a CPU, 2026-12-06).
        with jax.ensure_compile_time_eval():
            cos, sin = rope_cos_sin(jnp.arange(seq, dtype=jnp.int32)[None], inv_freq)
        shape = (*tokens.shape, cos.shape[-1])
        return jnp.broadcast_to(cos, shape), jnp.broadcast_to(sin, shape)
    return rope_cos_sin(positions, inv_freq)


# ---- Attention and MLP --------------------------------------------------------------------------


def cached_attention(q: Array, k: Array, v: Array, positions: Array, scale: float | None = None) -> Array:
    """Attention of new queries over a whole preallocated cache: query i of row b sees the cache entries at indices
    <= positions[b, i] (fp32 logits and softmax; `scale` as in `causal_attention`).

    q: [batch, T, heads, head_dim]; k, v: [batch, S, kv_heads, head_dim] (S the cache size); positions: [batch, T].
    Entries past a row's position are masked whatever they hold, so a right-padded prefill's leftovers are harmless
    until decoding overwrites them.
    """
    batch, seq, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    q = q.reshape(batch, seq, kv_heads, heads // kv_heads, head_dim)
    scale = head_dim ** -0.5 if scale is None else scale
    # Generation is never differentiated, and reads the cache where it lies: jnp.einsum, operands in the cache's
    # dtype, fp32 accumulation (products.einsum would copy the whole cache into its product's layout every step).
    logits = jnp.einsum("bqkgd,bskd->bkgqs", q.astype(k.dtype), k, preferred_element_type=jnp.float32) * scale
    visible = jnp.arange(k.shape[1])[None, None, :] <= positions[:, :, None]  # [b, T, S]
    logits = jnp.where(visible[:, None, None], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgqs,bskd->bqkgd", probs, v, preferred_element_type=jnp.float32).astype(q.dtype)
    return out.reshape(batch, seq, heads, head_dim)


class KVCache(NamedTuple):
    """One attention layer's keys and values [batch, S, kv_heads, head_dim] for S positions, in the compute dtype."""

    k: Array
    v: Array



class Attention(nn.Module):
    """Causal multi-head attention with grouped KV heads (MHA, GQA and MQA are the same code). Without rotary
    tables (`cos` None) the queries and keys are not rotated (an architecture without positional embedding)."""

    config: Any  # an attention architecture's config (heads, head_dim, attention_scale, attention_bias, ...)

    def setup(self):
        cfg = self.config
        dtype, param_dtype = jnp.dtype(cfg.compute_dtype), jnp.dtype(cfg.param_dtype)
        q_dim, kv_dim = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim

        def proj(features, axes):
            return Linear(features, cfg.attention_bias, axes, dtype, param_dtype, lora_scale=cfg.lora_scale)

        self.q_proj = proj(q_dim, ("embed", "q_heads"))
        self.k_proj = proj(kv_dim, ("embed", "kv_heads"))
        self.v_proj = proj(kv_dim, ("embed", "kv_heads"))
        self.o_proj = proj(cfg.hidden_size, ("q_heads", "embed"))

    def _queries_keys(self, x: Array, cos: Array, sin: Array) -> tuple[Array, Array]:
        """q [b, T, heads, hd] and k [b, T, kv_heads, hd], rotated."""
        cfg = self.config
        batch, seq, _ = x.shape
        q = self.q_proj(x).reshape(batch, seq, cfg.num_attention_heads, cfg.head_dim)
        k = self.k_proj(x).reshape(batch, seq, cfg.num_key_value_heads, cfg.head_dim)
        if cos is None:
            return q, k
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin)

    def __call__(self, x: Array, cos: Array, sin: Array) -> Array:
        cfg = self.config
        batch, seq, _ = x.shape
        q, k = self._queries_keys(x, cos, sin)
        v = self.v_proj(x).reshape(batch, seq, cfg.num_key_value_heads, cfg.head_dim)
        out = self._causal(q, k, v)
        return self.o_proj(out.reshape(batch, seq, cfg.num_attention_heads * cfg.head_dim))

    def _causal(self, q: Array, k: Array, v: Array) -> Array:
        scale = self.config.attention_scale
        if self.config.attention_impl == "cudnn":  # the fused flash kernel on NVIDIA GPUs
            return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True, implementation="cudnn")
        return causal_attention(q, k, v, scale, self.config.compute_dtype)

    def extend(self, x: Array, cos: Array, sin: Array, cache: KVCache, positions: Array) -> tuple[Array, KVCache]:
        """Generation: writes the keys and values of `x` [b, T, d] into `cache` at `positions` [b, T], then attends.
        Several tokens are a prefill from position 0 (attention among themselves, as in training); one token
        attends over the cache up to its position."""
        cfg = self.config
        batch, seq, _ = x.shape
        q, k = self._queries_keys(x, cos, sin)
        v = self.v_proj(x).reshape(batch, seq, cfg.num_key_value_heads, cfg.head_dim)
        rows = jnp.arange(batch)[:, None]
        cache = KVCache(cache.k.at[rows, positions].set(k.astype(cache.k.dtype)),
                        cache.v.at[rows, positions].set(v.astype(cache.v.dtype)))
        if seq > 1:
            out = self._causal(q, k, v)
        else:
            out = cached_attention(q, cache.k, cache.v, positions, self.config.attention_scale)  # compute dtype
        return self.o_proj(out.reshape(batch, seq, cfg.num_attention_heads * cfg.head_dim)), cache

    def probabilities(self, x: Array, cos: Array, sin: Array) -> Array:
        """The causal attention probabilities [b, heads, T, T] (fp32), KV heads repeated over their query heads:
        what MOHAWK's stage 1 aligns the student's mixing matrices with."""
        q, k = self._queries_keys(x, cos, sin)
        k = jnp.repeat(k, q.shape[2] // k.shape[2], axis=2)
        logits = products.einsum("bqhd,bshd->bhqs", q, k, self.config.compute_dtype) * self.config.attention_scale
        seq = x.shape[1]
        visible = np.tril(np.ones((seq, seq), bool))
        return jax.nn.softmax(jnp.where(visible, logits, jnp.finfo(jnp.float32).min), axis=-1)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.config
        dtype, param_dtype = jnp.dtype(cfg.compute_dtype), jnp.dtype(cfg.param_dtype)
        def proj(features, axes, name):
            return Linear(features, cfg.mlp_bias, axes, dtype, param_dtype, lora_scale=cfg.lora_scale, name=name)

        gate = proj(cfg.intermediate_size, ("embed", "mlp"), "gate_proj")(x)
        up = proj(cfg.intermediate_size, ("embed", "mlp"), "up_proj")(x)
        return proj(cfg.hidden_size, ("mlp", "embed"), "down_proj")(jax.nn.silu(gate) * up)


class FusedMLP(nn.Module):
    """SwiGLU with gate and up in one matrix, as GraniteMoeHybrid's `shared_mlp` holds them:
    output_linear(silu(gate) * up) with [gate | up] = input_linear(x)."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.config
        dtype, param_dtype = jnp.dtype(cfg.compute_dtype), jnp.dtype(cfg.param_dtype)
        # One product of twice the width, split after: its output rounds slightly differently from a Llama's two
        # products on XLA:CPU (KL 0 on SmolLM2-135M, 7.6e-10 on a random test model), while two products would copy
        # the kernel's halves out on every call (hybrids decoded 1.4x slower, 2026-12-06).
        gate, up = jnp.split(Linear(2 * cfg.intermediate_size, False, ("embed", "mlp"), dtype, param_dtype,
                                    lora_scale=cfg.lora_scale, name="input_linear")(x), 2, axis=-1)
        return Linear(cfg.hidden_size, False, ("mlp", "embed"), dtype, param_dtype, lora_scale=cfg.lora_scale,
                      name="output_linear")(jax.nn.silu(gate) * up)


# ---- State-space mixers: their convolution and what they carry between tokens ------------------------


class MixerState(NamedTuple):
    """What a state-space mixer carries from one token to the next: the last d_conv - 1 inputs of its convolution
    [b, K-1, C] and the state-space state [b, H, P, N] (fp32)."""

    conv: Array
    ssm: Array


class CausalConv1d(nn.Module):
    """Depthwise causal convolution over the channels a mixer convolves; kernel [K, 1, C] (HF's [C, 1, K]
    reversed). `kept_jax.models.ssd.causal_conv` is the math."""

    channels: int
    kernel_size: int
    use_bias: bool
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, history: Array | None = None, lengths: Array | None = None) -> tuple[Array, Array]:
        kernel = self.param("kernel", logical_init(nn.initializers.normal(self.kernel_size ** -0.5),
                                                   (None, None, "ssm_conv")),
                            (self.kernel_size, 1, self.channels), self.param_dtype)
        bias = None
        if self.use_bias:
            bias = self.param("bias", logical_init(nn.initializers.zeros, ("ssm_conv",)), (self.channels,),
                              self.param_dtype)
        return causal_conv(x, kernel, bias, history, lengths)


# ---- The stack of layers ------------------------------------------------------------------------

REMAT = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "save-dots": jax.checkpoint_policies.checkpoint_dots,
    "save-dots-no-batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _block_class(block: type[nn.Module], config: ModelConfig, scanned: bool) -> type[nn.Module]:
    if config.remat_policy == "none":
        return block
    # prevent_cse is unnecessary inside scan and costs performance there.
    return nn.remat(block, policy=REMAT[config.remat_policy], prevent_cse=not scanned)


class UnscannedLayers(nn.Module):
    """The layers as a Python loop, named `0`, `1`, ... like HF's `layers.<i>`, each its own block
    (`config.block_classes`); returns (x, None) like the scan."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x: Array, *args: Array) -> tuple[Array, None]:
        for i, block in enumerate(self.config.block_classes):
            x, _ = _block_class(block, self.config, scanned=False)(self.config, name=str(i))(x, *args)
        return x, None


def model_output(output: str, hidden: Array, logits_of: Callable[[Array], Array]):
    """What a causal LM's `__call__(..., output=...)` returns: "logits" (fp32), "hidden" (the final hidden states after
    the last norm, before the head) or "both" (a (logits, hidden) pair)."""
    if output not in ("logits", "hidden", "both"):
        raise ValueError(f"output must be 'logits', 'hidden' or 'both', got {output!r}")
    if output == "hidden":
        return hidden
    logits = logits_of(hidden)
    return logits if output == "logits" else (logits, hidden)


def layer_stack(config: ModelConfig) -> nn.Module:
    """The layers of `config`, each `block(config)` for its block in `config.block_classes`, `(x, *args) -> (x,
    None)` with `args` the same for every layer. With `scan_layers` one `nn.scan`ned block whose parameters carry a
    leading `layers` axis, so that compile time does not grow with depth (the layers must then be alike; an
    architecture that mixes kinds of layer scans only when they are all one kind); without it a Python loop.
    Calling it returns (x, None).
    """
    if not config.scan_layers:
        return UnscannedLayers(config)
    blocks = set(config.block_classes)
    if len(blocks) != 1:
        raise ValueError(f"layers of {len(blocks)} kinds cannot be scanned; the config must set scan_layers=False")
    return nn.scan(
        _block_class(blocks.pop(), config, scanned=True),
        variable_axes={"params": 0, "intermediates": 0, "lora": 0},
        split_rngs={"params": True},
        in_axes=nn.broadcast,
        length=config.num_hidden_layers,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )(config)
