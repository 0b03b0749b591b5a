"""A job's plan: its config and its source's layout resolved, once, into everything that follows from them.

The program (`kept_jax.train`) reads the config (`train_config.load_config`) and the source's `config.json` (from
the checkpoint, or `source_config` for a dry run without the weights) and calls `make_plan`; the job
(`train.Job`), the dry run (`dry_run`) and the benchmarks consume the frozen `JobPlan` it returns and derive none
of it again. Every check that needs only the config and the layout happens here, before anything is loaded:
the recipe's source architecture, the sequence length against the source's context, the student's shape against
the teacher's, trainable patterns that select nothing, the mesh against the batch, and the sharding rules.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from kept_jax import sharding
from kept_jax.errors import KeptError
from kept_jax.stages import Stage, plan_stages
from kept_jax.train_config import JobConfig

# The source architectures each recipe starts from (mohawk converts an Orion to a Llama first).
RECIPE_SOURCES = {"kept": ("orion",), "mohawk": ("llama", "orion")}


@dataclasses.dataclass(frozen=True)
class JobPlan:
    cfg: JobConfig
    layout: str  # where the source's layout was read: the checkpoint, or the source_config file
    source_config: Any  # the source's ModelConfig, with the job's runtime fields (dtypes, scan, remat, kernel)
    teacher_config: Any  # what the student learns from: the source, or (mohawk from an Orion) the Llama it becomes
    student_config: Any
    stages: tuple[Stage, ...]
    mesh: dict[str, int]  # mesh axis -> size
    rules: tuple  # the student's logical-axis rules (flax's pairs): the defaults with mesh.rules applied
    teacher_rules: tuple  # the teacher's: the student's with mesh.teacher_rules applied
    notes: tuple[str, ...] = ()  # said before the job starts; not errors

    @property
    def devices(self) -> int:
        return math.prod(self.mesh.values())

    @property
    def micro_batch(self) -> int:
        """Sequences per device in one micro-step."""
        return sharding.per_device_batch(self.cfg.data.batch_size, self.mesh)


def make_plan(cfg: JobConfig, source_config, layout: str, devices: int, student_layout=None) -> JobPlan:
    """The plan of job `cfg` on `devices` devices, from the source's config as read from `layout` (without runtime
    fields) and, for mohawk, the student's layout when `student_config` names one (a LlambaConfig)."""
    wanted = RECIPE_SOURCES[cfg.recipe]
    if source_config.architecture not in wanted:
        hint = "; recipe=mohawk distills a Llama into a Llamba" if source_config.architecture == "llama" else ""
        names = " or an ".join(a.capitalize() for a in wanted)
        raise KeptError(f"source must be an {names} checkpoint for recipe {cfg.recipe}; {layout} describes "
                        f"{source_config.architecture!r}{hint}")
    d = cfg.data
    if d.seq_len > source_config.max_position_embeddings and not d.beyond_context:
        raise KeptError(f"data.seq_len {d.seq_len} is longer than the source's context, max_position_embeddings "
                        f"{source_config.max_position_embeddings} of {layout}: the teacher was not trained there. "
                        f"Lower data.seq_len, or set data.beyond_context=true to distill past it anyway")
    source_config = source_config.replace(**cfg.runtime(type(source_config)))
    teacher_config, student_config = job_models(cfg, source_config, student_layout)
    source_config = source_config.replace(scan_layers=teacher_config.scan_layers)  # loaded in the teacher's layout
    stages = tuple(plan_stages(cfg))
    check_trainable_sets(stages, student_config)
    mesh = dict(zip(sharding.MESH_AXES, sharding.mesh_shape(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, devices)))
    sharding.per_device_batch(d.batch_size, mesh)  # the batch must split over the mesh
    rules = sharding.rules_from(cfg.mesh.rules)
    teacher_rules = sharding.rules_from(cfg.mesh.teacher_rules, dict(rules))
    notes = tuple(n for n in (stage_order_note(cfg),) if n)
    return JobPlan(cfg, layout, source_config, teacher_config, student_config, stages, mesh, rules, teacher_rules,
                   notes)


def job_models(cfg: JobConfig, source_config, student_layout=None):
    """(teacher, student) configs: kept's Orion and the Llama it becomes (with the LoRA scale); mohawk's Llama
    teacher (an Orion source converted to one first) and its Llamba or hybrid student. The teacher's layers are
    scanned when the student's are (a hybrid of two kinds of layer runs them as a loop), so that the layers the
    student copies can read the teacher's buffers."""
    from kept_jax.mapping import target_config

    if cfg.recipe == "kept":
        return source_config, target_config(source_config, cfg.opm).replace(lora_scale=cfg.lora.alpha / cfg.lora.rank)
    teacher = target_config(source_config, cfg.opm) if source_config.architecture == "orion" else source_config
    student = mohawk_student_config(cfg, teacher, student_layout)
    return teacher.replace(scan_layers=student.scan_layers), student


def mohawk_student_config(cfg: JobConfig, teacher_config, layout=None):
    """The student (`cfg.student`): `layout` (the config `student_config` names) checked against the teacher, or
    one derived from it, with the job's runtime fields; refused when a matrix stage cannot give each mixer head an
    attention head."""
    from kept_jax.mapping.hybrid_init import parse_attention_layers
    from kept_jax.mapping.students import student_config

    layers = ()
    if cfg.student == "hybrid" and layout is not None:
        layers = layout.attention_layers  # its config.json's layer_types (load_config refuses attention_layers too)
    elif cfg.student == "hybrid":
        spec = cfg.attention_layers
        spec = ",".join(map(str, spec)) if isinstance(spec, tuple) else str(spec)
        layers = parse_attention_layers(spec, teacher_config.num_hidden_layers)
        if isinstance(layers, int):
            raise KeptError(f"attention_layers: {cfg.attention_layers} chooses layers by measurement, which a job "
                            f"does not repeat: run python -m kept_jax.convert --to hybrid --source {cfg.source} "
                            f"--attention-layers {cfg.attention_layers} --out DIR, which prints the layers it keeps, "
                            "and give them as a list (attention_layers: 3,9,14), or give student_config: "
                            "DIR/config.json")
    student = student_config(cfg.student, teacher_config, cfg.mixer_init, layout, layers, cfg.mamba_groups)
    student = student.replace(**cfg.runtime(type(student)))
    heads = teacher_config.num_attention_heads
    if any(s.objective == "matrix" for s in cfg.stages) and student.mixer_heads % heads:
        raise KeptError(f"the matrix stage compares each mixer head with an attention head, but the student has "
                        f"{student.mixer_heads} heads and the teacher {heads}; give the student a multiple of the "
                        "teacher's heads, or drop the matrix stage")
    return student


def check_trainable_sets(stages, student_config) -> None:
    """Every stage's trainable set selects some parameter of the student: a pattern that matches nothing is refused
    from the config alone, before the teacher is loaded."""
    from flax import traverse_util

    from kept_jax.models.params import abstract_params
    from kept_jax.xkd.trainable import describe, is_trainable

    paths = list(traverse_util.flatten_dict(abstract_params(for_shapes(student_config))))
    for stage in stages:
        if stage.trainable == "lora" or any(is_trainable(("params", *p), stage.trainable) for p in paths):
            continue
        example = "/".join(next(p for p in paths if "layers" in p))
        raise KeptError(f"stage {stage.name}: trainable={describe(stage.trainable)} selects no parameter of the "
                        f"student ({student_config.architecture}, whose paths are like {example}); check the patterns")


def for_shapes(config):
    """`config` to trace for shapes alone: shapes do not depend on the attention kernel, and cudnn's cannot even be
    traced without a GPU."""
    return config.replace(attention_impl="xla") if hasattr(config, "attention_impl") else config


def stage_order_note(cfg: JobConfig) -> str:
    """A note when a mohawk job's objectives are not in MOHAWK's order (matrix, hidden, kl: each stage starts from
    what the one before aligned); empty when they are. A different order is allowed (an ablation may want it)."""
    order = ("matrix", "hidden", "kl")
    objectives = [s.objective for s in cfg.stages]
    if objectives == sorted(objectives, key=order.index):
        return ""
    return (f"note: the stages' objectives run {' -> '.join(objectives)}, not in MOHAWK's order matrix -> hidden -> "
            "kl, in which each stage starts from what the one before aligned")
