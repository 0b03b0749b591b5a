"""Teacher vs converted model on the same tokens: KL(teacher || converted), top-1 agreement, both NLLs.

Metrics are sums and counts per batch (fp32 on the device, float64 on the host) and are divided once at the end.
Optionally, the predicted cost of dropping a constant logit vector c (the final norm's beta through the head):
about 1/2 E_x[Var_{p(.|x)}(c)] nats/token to second order.
"""

from __future__ import annotations

import math
from typing import Iterable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np



def _batch_sums(teacher_logits, student_logits, tokens, logit_shift):
    t_logp = jax.nn.log_softmax(teacher_logits, axis=-1)
    s_logp = jax.nn.log_softmax(student_logits, axis=-1)
    t_p = jnp.exp(t_logp)
    next_tokens = tokens[:, 1:, None]
    sums = {
        "tokens": jnp.asarray(tokens.size, jnp.float32),
        "kl": jnp.sum(t_p * (t_logp - s_logp)),
        "agree": jnp.sum(jnp.argmax(teacher_logits, -1) == jnp.argmax(student_logits, -1)).astype(jnp.float32),
        "predicted": jnp.asarray(next_tokens.size, jnp.float32),
        "teacher_nll": -jnp.sum(jnp.take_along_axis(t_logp[:, :-1], next_tokens, -1)),
        "student_nll": -jnp.sum(jnp.take_along_axis(s_logp[:, :-1], next_tokens, -1)),
    }
    if logit_shift is not None:
        mean = jnp.sum(t_p * logit_shift, -1)
        sums["shift_var"] = jnp.sum(jnp.sum(t_p * logit_shift**2, -1) - mean**2)
    return sums


def compare(
    teacher: nn.Module,
    teacher_params: dict,
    student: nn.Module,
    student_params: dict,
    batches: Iterable[np.ndarray],
    logit_shift: np.ndarray | None = None,
) -> dict[str, float]:
    """Per-token KL(teacher || student), agreement, NLLs and perplexities over `batches` of [batch, seq] tokens.

    `logit_shift` ([vocab]): also report `predicted_shift_kl` = 1/2 E[Var_p(shift)], the second-order KL of
    removing that constant from the teacher's logits.
    """
    shift = None if logit_shift is None else jnp.asarray(logit_shift, jnp.float32)

    @jax.jit
    def step(tp, sp, tokens):
        return _batch_sums(teacher.apply({"params": tp}, tokens), student.apply({"params": sp}, tokens), tokens, shift)

    totals: dict[str, float] = {}
    for tokens in batches:
        for key, value in jax.device_get(step(teacher_params, student_params, jnp.asarray(tokens))).items():
            totals[key] = totals.get(key, 0.0) + float(value)
    if not totals:
        raise ValueError("compare needs at least one batch")
    result = {
        "tokens": int(totals["tokens"]),
        "kl": totals["kl"] / totals["tokens"],
        "agreement": totals["agree"] / totals["tokens"],
        "teacher_nll": totals["teacher_nll"] / totals["predicted"],
        "student_nll": totals["student_nll"] / totals["predicted"],
    }
    result["teacher_ppl"] = math.exp(result["teacher_nll"])
    result["student_ppl"] = math.exp(result["student_nll"])
    if shift is not None:
        result["predicted_shift_kl"] = 0.5 * totals["shift_var"] / totals["tokens"]
    return result


def batches_of(rows: np.ndarray, batch_size: int) -> list[np.ndarray]:
    return [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]
