"""Logit parity with Transformers: Llama against LlamaForCausalLM, Orion against Llama modules with LayerNorms."""

import numpy as np
import pytest
import torch

from bridge import load_checkpoint
from kept_jax.models import build_model
from tests import fixtures as fx

FP32_MAX_ABS = 1e-4
SEQ = 24
TOKENS = np.random.default_rng(0).integers(0, 512, size=(2, SEQ))

# Each option value appears at least once: MHA/GQA/MQA, biases, tied/untied, every rope type, explicit head_dim.
LLAMA_CASES = {
    "mha-default": dict(num_key_value_heads=4),
    "gqa-biases-untied": dict(num_key_value_heads=2, attention_bias=True, mlp_bias=True),
    "gqa-tied-linear": dict(tie_word_embeddings=True, rope_scaling={"rope_type": "linear", "factor": 2.0}),
    # seq 24 > max_position_embeddings 16, so the dynamic base really rescales.
    "mha-biases-tied-dynamic": dict(
        num_key_value_heads=4, attention_bias=True, mlp_bias=True, tie_word_embeddings=True,
        max_position_embeddings=16, rope_scaling={"rope_type": "dynamic", "factor": 3.0},
    ),
    # original_max 64 puts the 8 frequencies in all three llama3 bands.
    "gqa-attnbias-llama3": dict(
        attention_bias=True,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 64},
    ),
    "mqa-mlpbias-tied-headdim24": dict(num_key_value_heads=1, head_dim=24, mlp_bias=True, tie_word_embeddings=True),
}
ORION_CASES = {
    "orion-mha": dict(),
    "orion-gqa-linear": dict(num_key_value_heads=2, rope_scaling={"rope_type": "linear", "factor": 4.0}),
    "orion-longchat-theta": dict(rope_theta=5e7, max_position_embeddings=200000),
}


def _hf(arch, overrides):
    hf = fx.base_config(f"tiny-{arch}")
    hf.update(overrides)
    return hf


def _build(arch, overrides, tmp_path, seed=0):
    hf = _hf(arch, overrides)
    if arch == "llama":
        model = fx.make_llama(hf, seed)
        path = fx.save_llama(model, str(tmp_path / "ckpt"))
    else:
        model = fx.make_orion_reference(hf, seed)
        path = fx.save_orion(model, str(tmp_path / "ckpt"))
    return model, path


def _jax_logits(path, **runtime):
    config, params, _ = load_checkpoint(path, **runtime)
    return np.asarray(build_model(config).apply({"params": params}, TOKENS), dtype=np.float32)


def _assert_fp32_parity(ours, ref):
    assert ref.std() > 1.0, "fixture logits are nearly flat; parity would prove little"
    np.testing.assert_array_less(np.abs(ours - ref).max(), FP32_MAX_ABS)
    np.testing.assert_array_equal(ours.argmax(-1), ref.argmax(-1))


@pytest.mark.parametrize("case", list(LLAMA_CASES) + list(ORION_CASES))
def test_fp32_parity(case, tmp_path):
    arch, overrides = ("llama", LLAMA_CASES[case]) if case in LLAMA_CASES else ("orion", ORION_CASES[case])
    model, path = _build(arch, overrides, tmp_path)
    _assert_fp32_parity(_jax_logits(path), fx.torch_logits(model, TOKENS).numpy())


def _kl(p_logits, q_logits):
    p = torch.log_softmax(torch.tensor(np.array(p_logits)), -1)
    q = torch.log_softmax(torch.tensor(np.array(q_logits)), -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


@pytest.mark.parametrize("arch,overrides", [("llama", LLAMA_CASES["gqa-biases-untied"]), ("orion", {})])
def test_bf16_as_accurate_as_transformers_bf16(arch, overrides, tmp_path):
    """bf16 bound: against the fp32 reference, kept_jax's bf16 logits are no worse than 1.5x Transformers' own
    bf16 logits (max-abs error and per-token KL), and both stay within 5% of the logit std."""
    model, path = _build(arch, overrides, tmp_path)
    ref32 = fx.torch_logits(model, TOKENS).numpy()
    ref16 = fx.torch_logits(model.to(torch.bfloat16), TOKENS).numpy()
    ours16 = _jax_logits(path, compute_dtype="bfloat16", param_dtype="bfloat16")
    err_hf, err_ours = np.abs(ref16 - ref32).max(), np.abs(ours16 - ref32).max()
    assert err_ours <= 1.5 * err_hf, (err_ours, err_hf)
    assert err_ours <= 0.05 * ref32.std(), (err_ours, ref32.std())
    assert _kl(ref32, ours16) <= 1.5 * _kl(ref32, ref16) + 1e-4
    assert (ours16.argmax(-1) == ref32.argmax(-1)).mean() >= 0.9
