"""Distillation losses from final hidden states and head weights, in token chunks.

`[tokens, vocab]` fp32 logits never exist for either model: a `lax.scan` walks chunks of `chunk_size` tokens. Under
differentiation the same pass also computes, for each chunk while its logits are at hand, the loss's gradient for
the student's hidden states and head (a custom VJP, as Liger's fused linear cross-entropy does), so no chunk's
logits are computed twice. Peak temporary memory is O(chunk_size * vocab), not O(tokens * vocab)
(tests/test_losses.py measures it with `memory_analysis`).

Per token, with p = softmax(z_teacher / T) and q = softmax(z_student / T):
  forward KL  = T^2 * KL(p || q)      (the default; T^2 keeps gradient scale independent of T, as in Hinton et al.)
  reverse KL  = T^2 * KL(q || p)
  JSD         = T^2 * (KL(p || m) + KL(q || m)) / 2, m = (p + q) / 2
  CE          = -log softmax(z_student)[next token]   (at T = 1)
The loss is their weighted sum. Metrics are always at T = 1 and are `kept_jax.metrics`' (the one definition):
KL(teacher || student), top-1 agreement, both NLLs.
Everything is returned as sums over unmasked tokens, so that accumulation and cross-device reduction are exact.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

import kept_jax.models.products as products
from kept_jax.models.products import dtype_marks
from kept_jax.metrics import SUMS, TOKEN_METRICS, masked_sums, token_metrics

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class LossConfig:
    forward_kl: float = 1.0
    reverse_kl: float = 0.0
    jsd: float = 0.0
    ce: float = 0.0
    temperature: float = 1.0
    chunk_size: int = 512  # tokens per chunk


def _token_terms(z_s: Array, z_t: Array, labels: Array, cfg: LossConfig) -> dict[str, Array]:
    """Per-token loss and metrics for fp32 logits [n, vocab]; the teacher side carries no gradient."""
    z_t = jax.lax.stop_gradient(z_t)
    t = cfg.temperature
    lq, lp = jax.nn.log_softmax(z_s / t), jax.nn.log_softmax(z_t / t)
    p, q = jnp.exp(lp), jnp.exp(lq)
    loss = jnp.zeros(z_s.shape[:-1], jnp.float32)
    if cfg.forward_kl:
        loss += cfg.forward_kl * t * t * jnp.sum(p * (lp - lq), -1)
    if cfg.reverse_kl:
        loss += cfg.reverse_kl * t * t * jnp.sum(q * (lq - lp), -1)
    if cfg.jsd:
        lm = jnp.log(0.5 * (p + q))
        loss += cfg.jsd * t * t * 0.5 * jnp.sum(p * (lp - lm) + q * (lq - lm), -1)
    if cfg.ce:
        lq1 = lq if t == 1.0 else jax.nn.log_softmax(z_s)
        loss += cfg.ce * -jnp.take_along_axis(lq1, labels[:, None], -1)[:, 0]
    metrics = jax.lax.stop_gradient(token_metrics(z_t, z_s, labels))  # kept_jax.metrics: the one definition
    return {"loss": loss, **metrics}


def _sums(terms: dict[str, Array], mask: Array, positions: Array | None) -> dict[str, Array]:
    if positions is None:
        return {"loss": jnp.sum(terms["loss"] * mask), **{k: jnp.sum(terms[k] * mask) for k in TOKEN_METRICS},
                "tokens": jnp.sum(mask)}
    return {"loss": jnp.sum(terms["loss"] * mask), **masked_sums(terms, mask, positions)}


def _logits(hidden: Array, head: Array, dtype) -> Array:
    return products.linear(hidden, head, dtype)


def chunked_distill_loss(
    student_hidden: Array,
    student_head: Array,
    teacher_hidden: Array,
    teacher_head: Array,
    labels: Array,
    mask: Array,
    cfg: LossConfig = LossConfig(),
    positions: Array | None = None,
    dtype: str = "float32",
) -> dict[str, Array]:
    """Sums over unmasked tokens of the loss and metrics (see module doc), plus the token count; with `positions`
    (each token's index in its row) also KL and agreement by position bucket (`kept_jax.metrics`). The logits'
    products take operands in `dtype` (the models' compute dtype) and accumulate in fp32.

    hidden: [..., hidden_size] (flattened to tokens); head: [hidden_size, vocab]; labels, mask, positions: [...].
    Differentiate `out["loss"]` (a sum; divide by `out["tokens"]` for the mean): the student's gradients are
    computed in the same pass over the chunks as the loss (`_fused_fwd`), so no chunk's logits are computed twice.
    """
    d_s, d_t = student_hidden.shape[-1], teacher_hidden.shape[-1]
    h_s, h_t = student_hidden.reshape(-1, d_s), teacher_hidden.reshape(-1, d_t)
    labels, mask = labels.reshape(-1), mask.reshape(-1).astype(jnp.float32)
    pos = jnp.zeros_like(labels) if positions is None else positions.reshape(-1)
    n = h_s.shape[0]
    chunk = min(cfg.chunk_size, n)
    pad = -n % chunk
    if pad:
        h_s, h_t = jnp.pad(h_s, ((0, pad), (0, 0))), jnp.pad(h_t, ((0, pad), (0, 0)))
        labels, mask, pos = jnp.pad(labels, (0, pad)), jnp.pad(mask, (0, pad)), jnp.pad(pos, (0, pad))
    chunks = (n + pad) // chunk
    h_s, h_t, labels, mask, pos = (x.reshape(chunks, chunk, *x.shape[1:]) for x in (h_s, h_t, labels, mask, pos))
    return _fused_sums(cfg, jnp.dtype(dtype), positions is not None, h_s, student_head,
                       jax.lax.stop_gradient(h_t), jax.lax.stop_gradient(teacher_head), labels, mask, pos)


def _chunk_sums(cfg, dtype, by_position, hs, w_s, ht, w_t, y, m, p):
    terms = _token_terms(_logits(hs, w_s, dtype), _logits(ht, w_t, dtype), y, cfg)
    return _sums(terms, m, p if by_position else None)


def _zero_sums(by_position):
    keys = ("loss", *(SUMS if by_position else (*TOKEN_METRICS, "tokens")))
    return {k: jnp.zeros((), jnp.float32) for k in keys}


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _fused_sums(cfg, dtype, by_position, h_s, w_s, h_t, w_t, labels, mask, pos):
    """The sums over chunks [chunks, chunk, ...] (without differentiation: the forward alone)."""
    def body(carry, xs):
        hs, ht, y, m, p = xs
        sums = _chunk_sums(cfg, dtype, by_position, hs, w_s, ht, w_t, y, m, p)
        return {k: carry[k] + sums[k] for k in carry}, None

    sums, _ = jax.lax.scan(body, _zero_sums(by_position), (h_s, h_t, labels, mask, pos))
    return sums


def _fused_fwd(cfg, dtype, by_position, h_s, w_s, h_t, w_t, labels, mask, pos):
    """The sums and, chunk by chunk while its logits are at hand, the loss's gradient for the student's hidden states
    and head (a plain backward pass would compute both models' logits of every chunk again)."""
    def body(carry, xs):
        total, d_head = carry
        hs, ht, y, m, p = xs

        def loss(hs, w_s):
            sums = _chunk_sums(cfg, dtype, by_position, hs, w_s, ht, w_t, y, m, p)
            return sums["loss"], sums

        (_, sums), (d_hs, d_ws) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(hs, w_s)
        return ({k: total[k] + sums[k] for k in total}, d_head + d_ws), d_hs

    init = (_zero_sums(by_position), jnp.zeros(w_s.shape, jnp.float32))
    (sums, d_head), d_hidden = jax.lax.scan(body, init, (h_s, h_t, labels, mask, pos))
    return sums, (d_hidden, d_head, *dtype_marks(h_s, w_s), h_t, w_t, labels, mask, pos)


def _fused_bwd(cfg, dtype, by_position, residuals, g):
    d_hidden, d_head, h_type, w_type, h_t, w_t, labels, mask, pos = residuals
    scale = g["loss"]  # the metrics carry no gradient
    integer = lambda x: np.zeros(x.shape, jax.dtypes.float0)  # noqa: E731
    return ((scale * d_hidden).astype(h_type.dtype), (scale * d_head).astype(w_type.dtype), jnp.zeros_like(h_t),
            jnp.zeros_like(w_t), integer(labels), jnp.zeros_like(mask), integer(pos))


_fused_sums.defvjp(_fused_fwd, _fused_bwd)


def naive_distill_loss(student_hidden, student_head, teacher_hidden, teacher_head, labels, mask, cfg=LossConfig(),
                       positions=None, dtype="float32"):
    """The same sums from full [tokens, vocab] logits: the reference the chunked loss is tested against."""
    h_s = student_hidden.reshape(-1, student_hidden.shape[-1])
    h_t = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])
    terms = _token_terms(_logits(h_s, student_head, dtype), _logits(h_t, teacher_head, dtype), labels.reshape(-1), cfg)
    return _sums(terms, mask.reshape(-1).astype(jnp.float32), None if positions is None else positions.reshape(-1))
