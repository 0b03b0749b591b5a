"""Weight-only quantization (kept_jax/quantize.py): the scales are absmax per output channel (int8) or per group of
inputs (int4), written here from that definition in numpy; a quantized model computes what the same model with the
dequantized weights computes; bad schemes and group sizes are refused."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from kept_jax import quantize
from kept_jax.errors import KeptError
from kept_jax.models import build_model, config_from_hf, init_params
from tests import fixtures as fx

# Input sizes that 32, 64 and 128 divide: Llama 64 / 128, Llamba d_model 64, d_inner 128, MLP 128.
LLAMA = {**fx.base_config("tiny-llama"), "intermediate_size": 128, "tie_word_embeddings": False}
LLAMBA = {**fx.base_config("tiny-llamba"), "d_model": 64, "tie_embeddings": False,
          "mlp_cfg": {"intermediate_size": 128, "bias": False, "act_fn": "silu"}}
SCHEMES = [("int8", 64), ("int4", 32), ("int4", 64)]


def _model(hf: dict, seed: int = 0):
    config = config_from_hf(hf)
    rng = np.random.default_rng(seed)  # weights of unit-ish scale, so that quantization errors are visible
    params = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape) * (x.shape[-2] ** -0.5 if x.ndim >= 2
                                                                                  else 0.1) + (x.ndim < 2), x.dtype),
                          init_params(config, jax.random.key(seed)))
    return config, params


def reference(w: np.ndarray, scheme: str, group: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(dequantized kernel, scales, where w is within 1e-3 of a tie) of a kernel [..., in, out], from the
    definition."""
    bits = 8 if scheme == "int8" else 4
    g = w.shape[-2] if scheme == "int8" else group
    blocks = w.reshape(*w.shape[:-2], w.shape[-2] // g, g, w.shape[-1])
    scale = (np.abs(blocks).max(-2, keepdims=True) / np.float32(2 ** (bits - 1) - 0.5)).astype(np.float32)
    steps = blocks / scale
    q = np.clip(np.round(steps), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    tie = np.abs(np.mod(steps, 1) - 0.5) < 1e-3
    return (q * scale).astype(np.float32).reshape(w.shape), scale, tie.reshape(w.shape)


@pytest.mark.parametrize("scheme, group", SCHEMES)
@pytest.mark.parametrize("hf", [LLAMA, LLAMBA], ids=["llama", "llamba"])
def test_every_linear_kernel_is_quantized_by_its_definition(hf, scheme, group):
    config, params = _model(hf)
    quantized = quantize.quantize_params(config, params, scheme, group, head=True)
    flat, qflat = traverse_util.flatten_dict(params), traverse_util.flatten_dict(quantized, is_leaf=lambda _, x:
                                                                                 quantize.is_quantized(x))
    paths = quantize.linear_kernel_paths(config, head=True)
    assert {p for p, x in qflat.items() if quantize.is_quantized(x)} == set(paths)
    assert ("lm_head", "kernel") in paths and not any("conv1d" in p or "embed" in "/".join(p) for p in paths)
    for path in paths:
        w = np.asarray(flat[path])
        want, scales, tie = reference(w, scheme, group)
        got = np.asarray(quantize.dequantize(qflat[path]))
        # A weight half way between two levels (each group's largest is one: +-127.5 steps) may round either way.
        np.testing.assert_allclose(got[~tie], want[~tie], rtol=0, atol=1e-7, err_msg="/".join(path))
        # Round to nearest: no weight moves by more than half a step of its own scale.
        step = np.broadcast_to(scales, scales.shape[:-2] + (w.shape[-2] // scales.shape[-3], w.shape[-1]))
        assert np.all(np.abs(got - w) <= step.reshape(w.shape) / 2 * (1 + 1e-4))
    for path, x in flat.items():  # norms, embeddings, the convolution, D, biases: untouched
        if path not in paths:
            assert qflat[path] is x


@pytest.mark.parametrize("scheme, group", SCHEMES[:2])
@pytest.mark.parametrize("hf", [LLAMA, LLAMBA], ids=["llama", "llamba"])
def test_a_quantized_model_computes_what_its_dequantized_weights_compute(hf, scheme, group):
    config, params = _model(hf, seed=1)
    model = build_model(config)
    quantized = quantize.quantize_params(config, params, scheme, group)
    dequantized = jax.tree.map(quantize.dequantize, quantized, is_leaf=quantize.is_quantized)
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, 500, (2, 12)))
    logits = jax.jit(model.apply)({"params": quantized}, tokens)
    np.testing.assert_allclose(logits, model.apply({"params": dequantized}, tokens), rtol=1e-5, atol=1e-5)
    full = model.apply({"params": params}, tokens)
    error = float(jnp.max(jnp.abs(logits - full)) / jnp.max(jnp.abs(full)))
    # Quantized, and (random weights, no outliers handled) int8 close; int4's error is measured in benchmarks/.
    assert 0 < error < (0.05 if scheme == "int8" else 1.0)


def test_weight_bytes_count_int4_at_half_a_byte():
    config, params = _model(LLAMA)
    fp32 = quantize.weight_bytes(params)
    assert fp32 == sum(x.size * 4 for x in jax.tree.leaves(params))
    kernels = sum(traverse_util.flatten_dict(params)[p].size for p in quantize.linear_kernel_paths(config, False))
    for scheme, group, per_weight in (("int8", 64, 1.0), ("int4", 64, 0.5)):
        q = quantize.quantize_params(config, params, scheme, group)
        scales = sum(x.scale.size for x in jax.tree.leaves(q, is_leaf=quantize.is_quantized)
                     if quantize.is_quantized(x))
        assert quantize.weight_bytes(q) == fp32 - kernels * 4 + kernels * per_weight + scales * 4


def test_bad_schemes_and_group_sizes_are_refused():
    config, params = _model(LLAMA)
    with pytest.raises(KeptError, match="unknown quantization scheme 'int3'; choose one of int8, int4"):
        quantize.quantize_params(config, params, "int3")
    with pytest.raises(KeptError, match="int4 group size 48 is not one of 32, 64, 128"):
        quantize.quantize_params(config, params, "int4", 48)
    odd, odd_params = _model({**LLAMA, "intermediate_size": 96})
    with pytest.raises(KeptError, match="int4 group size 64 does not divide the input size 96 of "
                                        "model/layers/mlp/down_proj/kernel"):
        quantize.quantize_params(odd, odd_params, "int4", 64)
