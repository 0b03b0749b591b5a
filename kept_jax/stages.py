"""The stages of a training job, planned from its config alone (`kept_jax.plan` puts them in the job's plan).

`kept` trains one stage, XKD's logits KL, with `train.*` (linear warmup, cosine decay). `mohawk` trains the config's
`stages:` in order, each with its objective, token budget, peak learning rate and trainable set, and a fresh AdamW
(0.9, 0.95) on a warmup-stable-decay schedule (Bick et al. 2024).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import optax


WSD_END = 1e-8  # where each stage's decay ends
ADAM_B1, ADAM_B2 = 0.9, 0.95  # MOHAWK's AdamW


@dataclasses.dataclass(frozen=True)
class Stage:
    """One training stage: steps (global_start, global_start + steps], with its own fresh optimizer."""

    name: str
    objective: str  # a key of kept_jax.xkd.objectives.OBJECTIVES
    start: int  # the global step before the stage's first
    steps: int
    trainable: Any  # a named set or path patterns (kept_jax.xkd.trainable.is_trainable)
    schedule: optax.Schedule
    optimizer: optax.GradientTransformation

    @property
    def end(self) -> int:
        return self.start + self.steps


def wsd_schedule(lr: float, steps: int, warmup: float, decay: float) -> optax.Schedule:
    """Warmup-stable-decay over `steps`: linear from 0 to `lr` over the first `warmup` fraction, constant, then
    linear to 1e-8 over the last `decay` fraction. Update k (from 0) uses schedule(k)."""
    n_warm, n_decay = round(warmup * steps), round(decay * steps)
    n_stable = steps - n_warm - n_decay
    # With no warmup the first boundary is 0 and the warmup piece is never used.
    return optax.join_schedules([optax.linear_schedule(0.0, lr, max(n_warm, 1)), optax.constant_schedule(lr),
                                 optax.linear_schedule(lr, WSD_END, max(n_decay, 1))], [n_warm, n_warm + n_stable])


def decay_where_updated(weight_decay: float) -> optax.GradientTransformation:
    """AdamW's decoupled weight decay, on the leaves Adam moves this step only: a leaf that never had a gradient
    stays exactly as it is, as PyTorch's AdamW skips a parameter without a gradient (MOHAWK's stage 1 trains the
    mixers' input side; out_proj and z_bias are outside its graph and must not shrink)."""
    def update(updates, state, params):
        def decayed(u, p):
            return u + jnp.where(jnp.any(u != 0), weight_decay, 0.0).astype(u.dtype) * p

        return jax.tree.map(decayed, updates, params), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def stage_optimizer(schedule: optax.Schedule, weight_decay: float, clip: float) -> optax.GradientTransformation:
    """MOHAWK's AdamW (0.9, 0.95, eps 1e-8) on `schedule`, global-norm clipped at `clip` (0: not clipped, as the
    reference trains), with the weight decay of `decay_where_updated`."""
    adamw = optax.chain(optax.scale_by_adam(b1=ADAM_B1, b2=ADAM_B2, eps=1e-8), decay_where_updated(weight_decay),
                        optax.scale_by_learning_rate(schedule))
    return optax.chain(optax.clip_by_global_norm(clip), adamw) if clip > 0 else adamw


def plan_stages(cfg) -> list[Stage]:
    """The job's stages: kept's one (train.*), or mohawk's `stages:` with steps from their token budgets."""
    from kept_jax.xkd.step import make_optimizer, make_schedule

    t = cfg.train
    if cfg.recipe == "kept":
        return [Stage("xkd", "kl", 0, t.steps, cfg.trainable, make_schedule(t.lr, t.warmup, t.steps),
                      make_optimizer(t.lr, t.warmup, t.steps, t.weight_decay, t.clip))]
    stages, start = [], 0
    for s in cfg.stages:
        steps = max(1, math.ceil(s.tokens / cfg.data.tokens_per_step))
        schedule = wsd_schedule(s.lr, steps, s.warmup, s.decay)
        stages.append(Stage(s.name, s.objective, start, steps, s.trainable, schedule,
                            stage_optimizer(schedule, s.weight_decay, s.clip)))
        start += steps
    return stages
