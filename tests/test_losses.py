"""Chunked distillation losses: values and gradients equal the naive full-logits loss, which equals an independent
float64 NumPy computation; and the chunked loss's temporary memory does not grow with tokens x vocab."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kept_jax.xkd.losses import LossConfig, chunked_distill_loss, naive_distill_loss

N, D, V = 300, 32, 257  # N not a multiple of the chunk: padding is exercised


def _inputs(seed=0, n=N, v=V):
    rng = np.random.default_rng(seed)
    return dict(
        student_hidden=jnp.asarray(rng.normal(size=(n, D)), jnp.float32),
        student_head=jnp.asarray(rng.normal(size=(D, v)) / np.sqrt(D) * 3, jnp.float32),
        teacher_hidden=jnp.asarray(rng.normal(size=(n, D)), jnp.float32),
        teacher_head=jnp.asarray(rng.normal(size=(D, v)) / np.sqrt(D) * 3, jnp.float32),
        labels=jnp.asarray(rng.integers(0, v, size=n), jnp.int32),
        mask=jnp.asarray(rng.random(n) > 0.1, jnp.float32),
    )


def _numpy_reference(x, cfg):
    """Straight from the definitions, in float64."""
    zs = np.asarray(x["student_hidden"], np.float64) @ np.asarray(x["student_head"], np.float64)
    zt = np.asarray(x["teacher_hidden"], np.float64) @ np.asarray(x["teacher_head"], np.float64)
    m, y, t = np.asarray(x["mask"], np.float64), np.asarray(x["labels"]), cfg.temperature

    def logsm(z):
        z = z - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))

    lp, lq = logsm(zt / t), logsm(zs / t)
    p, q = np.exp(lp), np.exp(lq)
    mix = np.log((p + q) / 2)
    loss = (cfg.forward_kl * t * t * (p * (lp - lq)).sum(-1) + cfg.reverse_kl * t * t * (q * (lq - lp)).sum(-1)
            + cfg.jsd * t * t * 0.5 * ((p * (lp - mix)).sum(-1) + (q * (lq - mix)).sum(-1))
            - cfg.ce * logsm(zs)[np.arange(len(y)), y])
    lp1, lq1 = logsm(zt), logsm(zs)
    return {
        "loss": (loss * m).sum(),
        "kl": ((np.exp(lp1) * (lp1 - lq1)).sum(-1) * m).sum(),
        "agree": ((zs.argmax(-1) == zt.argmax(-1)) * m).sum(),
        "student_nll": (-lq1[np.arange(len(y)), y] * m).sum(),
        "teacher_nll": (-lp1[np.arange(len(y)), y] * m).sum(),
        "tokens": m.sum(),
    }


CONFIGS = {
    "forward-kl": LossConfig(),
    "forward-kl-T2": LossConfig(temperature=2.0),
    "reverse-kl": LossConfig(forward_kl=0.0, reverse_kl=1.0),
    "jsd": LossConfig(forward_kl=0.0, jsd=1.0),
    "mixed-with-ce": LossConfig(forward_kl=0.5, reverse_kl=0.25, jsd=0.25, ce=0.3, temperature=1.5),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_values_match_naive_and_numpy(name):
    cfg = dataclasses.replace(CONFIGS[name], chunk_size=64)
    x = _inputs()
    chunked = jax.jit(lambda x: chunked_distill_loss(**x, cfg=cfg))(x)
    naive = naive_distill_loss(**x, cfg=cfg)
    reference = _numpy_reference(x, cfg)
    for key in reference:
        assert float(chunked[key]) == pytest.approx(float(naive[key]), rel=1e-5, abs=1e-5), key
        assert float(chunked[key]) == pytest.approx(reference[key], rel=1e-4, abs=1e-4), key
    assert float(chunked["loss"]) > 1.0  # the fixture's distributions really differ


@pytest.mark.parametrize("name", CONFIGS)
def test_gradients_match_naive(name):
    cfg = dataclasses.replace(CONFIGS[name], chunk_size=64)
    x = _inputs(1)
    args = ("student_hidden", "student_head", "teacher_hidden", "teacher_head")

    def grads(fn):
        def loss(sh, sw, th, tw):
            return fn(sh, sw, th, tw, x["labels"], x["mask"], cfg)["loss"]
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(*(x[a] for a in args))

    g_chunked, g_naive = grads(chunked_distill_loss), grads(naive_distill_loss)
    for a, b, name in zip(g_chunked, g_naive, args):
        scale = float(jnp.abs(b).max())
        if name.startswith("teacher"):
            assert scale == 0.0 and float(jnp.abs(a).max()) == 0.0  # the teacher gets no gradient
        else:
            assert scale > 0
            np.testing.assert_allclose(a, b, atol=1e-5 * scale, rtol=0)


def _temp_bytes(fn, n, v):
    x = _inputs(n=n, v=v)  # every input is an argument: closed-over arrays would become folded constants

    def loss(sh, sw, th, tw, y, m):
        return fn(sh, sw, th, tw, y, m, LossConfig(chunk_size=256))["loss"]

    args = [x[k] for k in ("student_hidden", "student_head", "teacher_hidden", "teacher_head", "labels", "mask")]
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(*args).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_chunked_temporary_memory_does_not_grow_with_tokens_times_vocab():
    vocab, sizes = 4096, (2048, 8192)
    naive = {n: _temp_bytes(naive_distill_loss, n, vocab) for n in sizes}
    chunked = {n: _temp_bytes(chunked_distill_loss, n, vocab) for n in sizes}
    chunk_logits = 256 * vocab * 4
    for n in sizes:
        assert naive[n] >= n * vocab * 4  # the naive loss holds at least one [tokens, vocab] fp32 array
        assert chunked[n] <= 4 * chunk_logits  # a few [chunk, vocab] arrays, whatever the number of tokens
    assert chunked[8192] < naive[8192] / 8
    # 4x the tokens: the chunked loss grows at most by a small fraction of the extra tokens x vocab logits.
    assert chunked[8192] - chunked[2048] < 0.1 * (8192 - 2048) * vocab * 4
