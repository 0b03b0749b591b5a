"""The one definition of how a converted or distilled model is scored against its teacher on the same tokens.

The conversion report, the training job's held-out evaluation and `bridge.verify` all use it:

- Positions scored: in each row of T tokens, positions 0 .. T-2, the ones that have a next token in the row (the
  last position is not scored by any metric, so KL, agreement and both NLLs cover the same tokens). A position's
  index is the number of tokens before it in its row: rows are cut from packed text, so position 0 starts a row,
  not necessarily a document.
- KL(teacher || student) = sum_v p_t(v) (log p_t(v) - log p_s(v)) at temperature 1, nats per scored token.
- Agreement: the two models' top-1 tokens are equal. NLLs: -log p(next token) under each model.
- By position: KL and agreement in the buckets of POSITION_BUCKETS (early positions carry most of a conversion's
  error).

Everything is summed per batch (the caller's dtype: fp32 on a device, float64 in `bridge.verify`) and divided once
at the end by `summarize`, so batches, chunks and devices add up exactly. `compare` runs two models on the same
batches and returns the summary; optionally with the predicted cost of dropping a constant logit vector c (the final
norm's beta through the head): about 1/2 E_x[Var_{p(.|x)}(c)] nats/token to second order, over the same positions.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
if TYPE_CHECKING:
    import flax.linen as nn
POSITION_BUCKETS = ((0, 8), (8, 32), (32, 128), (128, None))  # [lo, hi) positions; None: to the row's end
BUCKET_NAMES = tuple(f"{lo}-{hi}" if hi else f"{lo}+" for lo, hi in POSITION_BUCKETS)
TOKEN_METRICS = ("kl", "agree", "student_nll", "teacher_nll")


def labels_and_mask(tokens: Array) -> tuple[Array, Array]:
    """Next-token labels [b, T] and the scored positions (1.0 at 0 .. T-2; the last has no next token)."""
    labels = jnp.concatenate([tokens[:, 1:], tokens[:, :1]], axis=1)
    mask = jnp.ones(tokens.shape, jnp.float32).at[:, -1].set(0.0)
    return labels, mask


def token_metrics(teacher_logits: Array, student_logits: Array, labels: Array) -> dict[str, Array]:
    """Per position [...]: KL(teacher || student), top-1 agreement (1.0 or 0.0) and both NLLs of `labels`."""
    lt, ls = jax.nn.log_softmax(teacher_logits, -1), jax.nn.log_softmax(student_logits, -1)
    return {
        "kl": jnp.sum(jnp.exp(lt) * (lt - ls), -1),
        "agree": (jnp.argmax(teacher_logits, -1) == jnp.argmax(student_logits, -1)).astype(lt.dtype),
        "student_nll": -jnp.take_along_axis(ls, labels[..., None], -1)[..., 0],
        "teacher_nll": -jnp.take_along_axis(lt, labels[..., None], -1)[..., 0],
    }


def bucket_weights(positions: Array, mask: Array) -> Array:
    """[..., buckets]: `mask` spread over the position buckets (one-hot by position)."""
    lo = jnp.asarray([b[0] for b in POSITION_BUCKETS])
    hi = jnp.asarray([b[1] if b[1] is not None else 2**31 - 1 for b in POSITION_BUCKETS])
    inside = (positions[..., None] >= lo) & (positions[..., None] < hi)
    return inside.astype(mask.dtype) * mask[..., None]


def masked_sums(terms: dict[str, Array], mask: Array, positions: Array) -> dict[str, Array]:
    """Sums of per-position `terms` over `mask`, the token count, and KL / agreement / count per position bucket."""
    weights = bucket_weights(positions, mask)
    sums = {key: jnp.sum(terms[key] * mask) for key in TOKEN_METRICS}
    sums["tokens"] = jnp.sum(mask)
    for k, name in enumerate(BUCKET_NAMES):
        sums[f"kl@{name}"] = jnp.sum(terms["kl"] * weights[..., k])
        sums[f"agree@{name}"] = jnp.sum(terms["agree"] * weights[..., k])
        sums[f"tokens@{name}"] = jnp.sum(weights[..., k])
    return sums


SUMS = (*TOKEN_METRICS, "tokens", *(f"{m}@{n}" for n in BUCKET_NAMES for m in ("kl", "agree", "tokens")))


def score(teacher_logits: Array, student_logits: Array, tokens: Array) -> dict[str, Array]:
    """The sums of one batch of rows [b, T] from both models' full logits [b, T, vocab]."""
    labels, mask = labels_and_mask(tokens)
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    return masked_sums(token_metrics(teacher_logits, student_logits, labels), mask.astype(teacher_logits.dtype),
                       positions)


def summarize(totals: dict[str, float]) -> dict:
    """Means from summed metrics: kl, agreement, both NLLs and perplexities per scored token, and `by_position`
    ({bucket: {"kl", "agreement", "tokens"}}, empty buckets left out)."""
    n = float(totals["tokens"])
    if n <= 0:
        raise ValueError("no scored positions: each row needs at least two tokens")
    out = {"tokens": int(n), "kl": totals["kl"] / n, "agreement": totals["agree"] / n,
           "teacher_nll": totals["teacher_nll"] / n, "student_nll": totals["student_nll"] / n}
    out["teacher_ppl"], out["student_ppl"] = math.exp(out["teacher_nll"]), math.exp(out["student_nll"])
    out["by_position"] = {
        name: {"kl": totals[f"kl@{name}"] / count, "agreement": totals[f"agree@{name}"] / count, "tokens": int(count)}
        for name in BUCKET_NAMES if (count := float(totals.get(f"tokens@{name}", 0.0))) > 0
    }
    return out


def format_by_position(by_position: dict) -> str:
    """One line: KL (and agreement) per position bucket."""
    return "KL by position: " + ", ".join(f"{name}: {m['kl']:.3e} ({m['agreement']:.1%})"
                                          for name, m in by_position.items())


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
