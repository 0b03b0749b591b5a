"""Recipes: what a training job distills from what, and in which stages. DESIGN.md section 7.

A recipe turns the loaded source into a `Recipe`: the teacher (config and params), the student's initial variables,
the mapping between them, which student leaves read the teacher's buffers (the mapping's identity rules, student
path <- teacher path), and its stages. The jitted step, optimizer, sharding, checkpoints and logs are the same for
every recipe (kept_jax/train.py).

- `kept`: Orion -> Llama by NPM + OPM, calibrated on the teacher's activations; one stage, XKD's logits KL, with
  `train.*` (cosine schedule) and `loss.*`.
- `mohawk`: Llama -> Llamba, each attention replaced by an initialized mixer (`mixer_init`), distilled in the
  `stages:` of the config (matrix orientation, hidden-state alignment, logits KL; AdamW 0.9/0.95 on a
  warmup-stable-decay schedule restarted per stage). An Orion source is first converted to Llama by the kept
  conversion (no training), and that Llama is the teacher: Orion -> Llama -> Llamba in one job.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
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


@dataclasses.dataclass
class Recipe:
    teacher_config: Any
    teacher_params: dict
    student_config: Any
    student_variables: dict
    mapping: Any  # kept_jax.mapping.Mapping: teacher -> student
    shared: dict[tuple[str, ...], tuple[str, ...]]  # student params path -> teacher params path
    stages: list[Stage]


def wsd_schedule(lr: float, steps: int, warmup: float, decay: float) -> optax.Schedule:
    """Warmup-stable-decay over `steps`: linear from 0 to `lr` over the first `warmup` fraction, constant, then
    linear to 1e-8 over the last `decay` fraction. Update k (from 0) uses schedule(k)."""
    n_warm, n_decay = round(warmup * steps), round(decay * steps)
    n_stable = steps - n_warm - n_decay
    # With no warmup the first boundary is 0 and the warmup piece is never used.
    return optax.join_schedules([optax.linear_schedule(0.0, lr, max(n_warm, 1)), optax.constant_schedule(lr),
                                 optax.linear_schedule(lr, WSD_END, max(n_decay, 1))], [n_warm, n_warm + n_stable])


def stage_optimizer(schedule: optax.Schedule, weight_decay: float, clip: float) -> optax.GradientTransformation:
    return optax.chain(optax.clip_by_global_norm(clip),
                       optax.adamw(schedule, b1=ADAM_B1, b2=ADAM_B2, weight_decay=weight_decay))


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
                            stage_optimizer(schedule, s.weight_decay, t.clip)))
        start += steps
    return stages


def kept_conversion(cfg, orion_config, orion_params, calib_batches):
    """Orion -> Llama by NPM + OPM: (llama config, llama params, HF-named tensors, mapping, teacher params).

    The returned teacher params read the Llama's recentered writers: recentering leaves a LayerNorm teacher's
    function unchanged, so teacher and student keep one copy of them instead of two."""
    from bridge.hf_import import ArrayReader, params_from_reader
    from kept_jax.convert import run_mapping, source_tensor_reader
    from kept_jax.mapping import build_mapping, calibrate, outer_sites, target_config
    from kept_jax.models import build_model

    stats = calibrate(build_model(orion_config), orion_params, calib_batches,
                      outer_sites=outer_sites(cfg.opm, orion_config))
    mapping = build_mapping(cfg.opm, orion_config, stats)
    tensors, _ = run_mapping(mapping, source_tensor_reader(cfg.source), cfg.precision.params)
    llama_config = target_config(orion_config, cfg.opm).replace(lora_scale=cfg.lora.alpha / cfg.lora.rank)
    llama_params, _, _ = params_from_reader(ArrayReader(tensors), llama_config)
    for path in sorted(mapping.params_paths(lambda t: t.startswith("recenter"))):
        orion_params = _set(orion_params, path, _get(llama_params, path))
    return llama_config, llama_params, tensors, mapping, orion_params


def kept(cfg, source_config, source_params, calib_batches) -> Recipe:
    import jax

    from kept_jax.xkd.trainable import init_lora

    llama_config, llama_params, _, mapping, teacher_params = kept_conversion(cfg, source_config, source_params,
                                                                             calib_batches)
    variables = {"params": llama_params}
    if cfg.trainable == "lora":
        variables["lora"] = init_lora(llama_params, cfg.lora.rank, cfg.lora.targets, jax.random.key(cfg.train.seed))
    return Recipe(source_config, teacher_params, llama_config, variables, mapping, mapping.shared_with_teacher(),
                  plan_stages(cfg))


def mohawk(cfg, source_config, source_params, calib_batches) -> Recipe:
    from bridge.hf_import import ArrayReader, params_from_reader
    from kept_jax.convert import run_mapping, source_tensor_reader
    from kept_jax.mapping.llamba_init import build_llamba_mapping, llamba_config_for

    if source_config.architecture == "orion":
        teacher_config, teacher_params, tensors, _, _ = kept_conversion(cfg, source_config, source_params,
                                                                        calib_batches)
        teacher_config = teacher_config.replace(lora_scale=1.0)
        read = lambda name: tensors[name].astype(np.float64)  # noqa: E731
    else:  # a Llama (the job checked the source's architecture before loading it)
        teacher_config, teacher_params, read = source_config, source_params, source_tensor_reader(cfg.source)
    student_config = llamba_config_for(teacher_config, cfg.mixer_init, student_layout(cfg))
    student_config = student_config.replace(**cfg.runtime(type(student_config)))
    heads = teacher_config.num_attention_heads
    if any(s.objective == "matrix" for s in cfg.stages) and student_config.n_v_heads != heads:
        raise KeptError(f"the matrix stage compares each mixer head with an attention head, but the student has "
                        f"{student_config.n_v_heads} heads and the teacher {heads}; "
                        "give the student n_v_heads equal to the teacher's heads, or drop the matrix stage")
    mapping = build_llamba_mapping(teacher_config, student_config, cfg.mixer_init, cfg.train.seed)
    tensors, _ = run_mapping(mapping, read, cfg.precision.params)
    student_params, _, _ = params_from_reader(ArrayReader(tensors), student_config)
    return Recipe(teacher_config, teacher_params, student_config, {"params": student_params}, mapping,
                  mapping.shared_with_teacher(), plan_stages(cfg))


RECIPES = {"kept": kept, "mohawk": mohawk}


def student_layout(cfg):
    """The Llamba layout `student_config` names (a config.json, or a directory holding one; relative to the working
    directory or to the repository), or None: the student is then derived from the teacher."""
    import os

    from kept_jax.config import ModelConfig, read_config_json
    from kept_jax.train_config import CONFIG_DIR

    if not cfg.student_config:
        return None
    for path in (cfg.student_config, os.path.join(os.path.dirname(CONFIG_DIR), cfg.student_config)):
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        if os.path.isfile(path):
            return ModelConfig.from_hf_dict(read_config_json(path))
    raise KeptError(f"student_config {cfg.student_config!r} is neither a config.json nor a directory holding one; "
                    "give a Llamba config.json (e.g. configs/models/llamba-1b.json) or leave it out to derive the "
                    "student from the teacher")


def _get(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def _set(tree: dict, path, value) -> dict:
    if len(path) == 1:
        return {**tree, path[0]: value}
    return {**tree, path[0]: _set(tree[path[0]], path[1:], value)}
