"""Distillation losses from final hidden states and head weights, in token chunks.

`[tokens, vocab]` fp32 logits never exist for either model: a `lax.scan` walks chunks of `chunk_size` tokens, and
its body is under `jax.checkpoint`, so the backward pass recomputes one chunk's logits at a time. Peak temporary
memory is O(chunk_size * vocab), not O(tokens * vocab) (tests/test_losses.py measures it with `memory_analysis`).

Per token, with p = softmax(z_teacher / T) and q = softmax(z_student / T):
  forward KL  = T^2 * KL(p || q)      (the default; T^2 keeps gradient scale independent of T, as in Hinton et al.)
  reverse KL  = T^2 * KL(q || p)
  JSD         = T^2 * (KL(p || m) + KL(q || m)) / 2, m = (p + q) / 2
  CE          = -log softmax(z_student)[next token]   (at T = 1)
The loss is their weighted sum. Metrics are always at T = 1: KL(teacher || student), top-1 agreement, both NLLs.
Everything is returned as sums over unmasked tokens, so that accumulation and cross-device reduction are exact.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

Array = jax.Array
METRICS = ("loss", "kl", "agree", "student_nll", "teacher_nll", "tokens")


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
    lq1, lp1 = (lq, lp) if t == 1.0 else (jax.nn.log_softmax(z_s), jax.nn.log_softmax(z_t))
    student_nll = -jnp.take_along_axis(lq1, labels[:, None], -1)[:, 0]
    if cfg.ce:
        loss += cfg.ce * student_nll
    metrics = {
        "loss": loss,
        "kl": jax.lax.stop_gradient(jnp.sum(jnp.exp(lp1) * (lp1 - lq1), -1)),
        "agree": (jnp.argmax(z_s, -1) == jnp.argmax(z_t, -1)).astype(jnp.float32),
        "student_nll": jax.lax.stop_gradient(student_nll),
        "teacher_nll": -jnp.take_along_axis(lp1, labels[:, None], -1)[:, 0],
    }
    return metrics


def _logits(hidden: Array, head: Array) -> Array:
    return jnp.dot(hidden, head.astype(hidden.dtype), preferred_element_type=jnp.float32)


def chunked_distill_loss(
    student_hidden: Array,
    student_head: Array,
    teacher_hidden: Array,
    teacher_head: Array,
    labels: Array,
    mask: Array,
    cfg: LossConfig = LossConfig(),
) -> dict[str, Array]:
    """Sums over unmasked tokens of the loss and metrics (see module doc), plus the token count.

    hidden: [..., hidden_size] (flattened to tokens); head: [hidden_size, vocab]; labels, mask: [...].
    Differentiate `out["loss"]` (a sum; divide by `out["tokens"]` for the mean).
    """
    d_s, d_t = student_hidden.shape[-1], teacher_hidden.shape[-1]
    h_s, h_t = student_hidden.reshape(-1, d_s), teacher_hidden.reshape(-1, d_t)
    labels, mask = labels.reshape(-1), mask.reshape(-1).astype(jnp.float32)
    n = h_s.shape[0]
    chunk = min(cfg.chunk_size, n)
    pad = -n % chunk
    if pad:
        h_s, h_t = jnp.pad(h_s, ((0, pad), (0, 0))), jnp.pad(h_t, ((0, pad), (0, 0)))
        labels, mask = jnp.pad(labels, (0, pad)), jnp.pad(mask, (0, pad))
    chunks = (n + pad) // chunk

    @jax.checkpoint
    def body(carry, xs):
        hs, ht, y, m = xs
        terms = _token_terms(_logits(hs, student_head), _logits(ht, teacher_head), y, cfg)
        return {k: carry[k] + jnp.sum(v * m) for k, v in terms.items()}, None

    init = {k: jnp.zeros((), jnp.float32) for k in METRICS if k != "tokens"}
    xs = (h_s.reshape(chunks, chunk, d_s), h_t.reshape(chunks, chunk, d_t), labels.reshape(chunks, chunk),
          mask.reshape(chunks, chunk))
    sums, _ = jax.lax.scan(body, init, xs)
    sums["tokens"] = jnp.sum(mask)
    return sums


def naive_distill_loss(student_hidden, student_head, teacher_hidden, teacher_head, labels, mask, cfg=LossConfig()):
    """The same sums from full [tokens, vocab] logits: the reference the chunked loss is tested against."""
    h_s = student_hidden.reshape(-1, student_hidden.shape[-1])
    h_t = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])
    mask = mask.reshape(-1).astype(jnp.float32)
    terms = _token_terms(_logits(h_s, student_head), _logits(h_t, teacher_head), labels.reshape(-1), cfg)
    sums = {k: jnp.sum(v * mask) for k, v in terms.items()}
    sums["tokens"] = jnp.sum(mask)
    return sums
