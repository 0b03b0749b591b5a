"""Teacher vs converted model on the same tokens: the scores of `kept_jax.metrics` (KL(teacher || converted),
top-1 agreement, both NLLs, by position), from both models' full logits, batch by batch.

Optionally, the predicted cost of dropping a constant logit vector c (the final norm's beta through the head):
about 1/2 E_x[Var_{p(.|x)}(c)] nats/token to second order, over the same scored positions.
"""

from __future__ import annotations

from typing import Iterable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from kept_jax.metrics import labels_and_mask, score, summarize


def compare(
    teacher: nn.Module,
    teacher_params: dict,
    student: nn.Module,
    student_params: dict,
    batches: Iterable[np.ndarray],
    logit_shift: np.ndarray | None = None,
) -> dict:
    """`kept_jax.metrics.summarize` of both models on `batches` of [batch, seq] tokens.

    `logit_shift` ([vocab]): also report `predicted_shift_kl` = 1/2 E[Var_p(shift)], the second-order KL of
    removing that constant from the teacher's logits.
    """
    shift = None if logit_shift is None else jnp.asarray(logit_shift, jnp.float32)

    @jax.jit
    def step(tp, sp, tokens):
        teacher_logits = teacher.apply({"params": tp}, tokens)
        sums = score(teacher_logits, student.apply({"params": sp}, tokens), tokens)
        if shift is not None:
            p = jax.nn.softmax(teacher_logits, -1)
            mean = jnp.sum(p * shift, -1)
            sums["shift_var"] = jnp.sum((jnp.sum(p * shift**2, -1) - mean**2) * labels_and_mask(tokens)[1])
        return sums

    totals: dict[str, float] = {}
    for tokens in batches:
        for key, value in jax.device_get(step(teacher_params, student_params, jnp.asarray(tokens))).items():
            totals[key] = totals.get(key, 0.0) + float(value)
    if not totals:
        raise ValueError("compare needs at least one batch")
    result = summarize(totals)
    if shift is not None:
        result["predicted_shift_kl"] = 0.5 * totals["shift_var"] / totals["tokens"]
    return result


def batches_of(rows: np.ndarray, batch_size: int) -> list[np.ndarray]:
    return [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]
