"""The stages of a training job, planned from its config alone (the job and its dry run share them).

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

from kept_jax.errors import KeptError

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


def stage_order_note(cfg) -> str:
    """A note when a mohawk job's objectives are not in MOHAWK's order (matrix, hidden, kl: each stage starts from
    what the one before aligned); empty when they are. A different order is allowed (an ablation may want it)."""
    order = ("matrix", "hidden", "kl")
    objectives = [s.objective for s in cfg.stages]
    if objectives == sorted(objectives, key=order.index):
        return ""
    return (f"note: the stages' objectives run {' -> '.join(objectives)}, not in MOHAWK's order matrix -> hidden -> "
            "kl, in which each stage starts from what the one before aligned")


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


def mohawk_student_config(cfg, teacher_config):
    """The Llamba student of a mohawk job: the layout `student_config` names (a config.json, or a directory holding
    one), or one derived from the teacher, with the job's runtime fields; refused when a matrix stage cannot pair
    each mixer head with an attention head. The job and its dry run both build the student here."""
    from kept_jax.config import read_config_json
    from kept_jax.mapping.llamba_init import llamba_config_for
    from kept_jax.models import config_from_hf
    from kept_jax.train_config import find_config_json

    layout = None
    if cfg.student_config:
        path = find_config_json(cfg.student_config)
        if path is None:
            raise KeptError(f"student_config {cfg.student_config!r} is neither a config.json nor a directory "
                            "holding one; give a Llamba config.json (e.g. configs/models/llamba-1b.json) or leave it "
                            "out to derive the student from the teacher")
        layout = config_from_hf(read_config_json(path))
    student = llamba_config_for(teacher_config, cfg.mixer_init, layout)
    student = student.replace(**cfg.runtime(type(student)))
    heads = teacher_config.num_attention_heads
    if any(s.objective == "matrix" for s in cfg.stages) and student.n_v_heads != heads:
        raise KeptError(f"the matrix stage compares each mixer head with an attention head, but the student has "
                        f"{student.n_v_heads} heads and the teacher {heads}; "
                        "give the student n_v_heads equal to the teacher's heads, or drop the matrix stage")
    return student


def job_models(cfg, source_config):
    """(teacher, student) configs of a job from its source's config alone, nothing loaded: kept's Orion and the
    Llama it becomes; mohawk's Llama teacher (an Orion source converted to one first) and its Llamba."""
    from kept_jax.mapping import target_config

    if cfg.recipe == "kept":
        return source_config, target_config(source_config, cfg.opm)
    teacher = target_config(source_config, cfg.opm) if source_config.architecture == "orion" else source_config
    return teacher, mohawk_student_config(cfg, teacher)


def check_trainable_sets(cfg, student_config) -> None:
    """Every stage's trainable set selects some parameter of the student: a pattern that matches nothing is refused
    from the config alone, before the teacher is loaded (the job and its dry run both call this)."""
    from flax import traverse_util

    from kept_jax.models.params import abstract_params
    from kept_jax.xkd.trainable import describe, is_trainable

    if cfg.recipe == "kept":  # shapes do not depend on the attention kernel, and cudnn cannot be traced on a CPU
        student_config = student_config.replace(attention_impl="xla")
    paths = list(traverse_util.flatten_dict(abstract_params(student_config)))
    for stage in plan_stages(cfg):
        if stage.trainable == "lora" or any(is_trainable(("params", *p), stage.trainable) for p in paths):
            continue
        example = "/".join(next(p for p in paths if "layers" in p))
        raise KeptError(f"stage {stage.name}: trainable={describe(stage.trainable)} selects no parameter of the "
                        f"student ({student_config.architecture}, whose paths are like {example}); check the patterns")
