"""Recipes: how a training job builds its teacher and student from the loaded source. docs/design.md.

A recipe takes the job's plan (`kept_jax.plan.JobPlan`: the teacher's and the student's configs and the stages,
all from the config and the source's layout) and the source's loaded params, and returns a `Recipe`: the
teacher's params, the student's initial variables, the mapping between them, and which student leaves read the
teacher's buffers (the mapping's identity rules, student path <- teacher path). The jitted step, optimizer,
sharding, checkpoints and logs are the same for every recipe (kept_jax/train.py).

- `kept`: Orion -> Llama by NPM + OPM, calibrated on the teacher's activations; one stage, XKD's logits KL, with
  `train.*` (cosine schedule) and `loss.*`.
- `mohawk`: Llama -> Llamba or a Mamba-2/attention hybrid (`student`), each attention replaced (a hybrid's outside
  `attention_layers`) by an initialized mixer (`mixer_init`), distilled in the `stages:` of the config (matrix orientation, hidden-state alignment, logits KL; AdamW 0.9/0.95 on a
  warmup-stable-decay schedule restarted per stage). An Orion source is first converted to Llama by the kept
  conversion (no training), and that Llama is the teacher: Orion -> Llama -> Llamba in one job.
"""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass
class Recipe:
    teacher_params: dict
    student_variables: dict
    mapping: Any  # kept_jax.mapping.Mapping: teacher -> student
    shared: dict[tuple[str, ...], tuple[str, ...]]  # student params path -> teacher params path


def kept_conversion(cfg, orion_config, llama_config, orion_params, calib_batches):
    """Orion -> the Llama of `llama_config` by NPM + OPM: (llama params, HF-named tensors, mapping, teacher params).

    The returned teacher params read the Llama's recentered writers: recentering leaves a LayerNorm teacher's
    function unchanged, so teacher and student keep one copy of them instead of two."""
    from bridge.hf_import import ArrayReader, params_from_reader
    from kept_jax.convert import run_mapping, source_tensor_reader
    from kept_jax.mapping import build_mapping, calibrate, outer_sites
    from kept_jax.models import layer_list
    from kept_jax.runlog import counted

    layers = counted(layer_list(orion_params), orion_config.num_hidden_layers, "calibrate", "layer")
    stats = calibrate(orion_config, orion_params, layers, calib_batches, outer_sites=outer_sites(cfg.opm, orion_config))
    mapping = build_mapping(cfg.opm, orion_config, stats)
    tensors, _ = run_mapping(mapping, source_tensor_reader(cfg.source), cfg.precision.params)
    llama_params, _, _ = params_from_reader(ArrayReader(tensors), llama_config)
    for path in sorted(mapping.params_paths(lambda t: t.startswith("recenter"))):
        orion_params = _set(orion_params, path, _get(llama_params, path))
    return llama_params, tensors, mapping, orion_params


def kept(plan, source_params, calib_batches) -> Recipe:
    import jax

    from kept_jax.xkd.trainable import init_lora

    cfg = plan.cfg
    llama_params, _, mapping, teacher_params = kept_conversion(cfg, plan.source_config, plan.student_config,
                                                               source_params, calib_batches)
    variables = {"params": llama_params}
    if cfg.trainable == "lora":
        variables["lora"] = init_lora(llama_params, cfg.lora.rank, cfg.lora.targets, jax.random.key(cfg.train.seed))
    return Recipe(teacher_params, variables, mapping, mapping.shared_with_teacher())


def mohawk(plan, source_params, calib_batches) -> Recipe:
    from bridge.hf_import import ArrayReader, params_from_reader
    from kept_jax.convert import run_mapping, source_tensor_reader
    from kept_jax.mapping.students import student_mapping

    cfg, teacher_config, student_config = plan.cfg, plan.teacher_config, plan.student_config
    if plan.source_config.architecture == "orion":
        teacher_params, tensors, _, _ = kept_conversion(cfg, plan.source_config, teacher_config, source_params,
                                                        calib_batches)
        read = tensors.__getitem__
    else:  # a Llama (the plan checked the source's architecture)
        teacher_params, read = source_params, source_tensor_reader(cfg.source)
    mapping = student_mapping(teacher_config, student_config, cfg.mixer_init, cfg.train.seed)
    tensors, _ = run_mapping(mapping, read, cfg.precision.params)
    student_params, _, _ = params_from_reader(ArrayReader(tensors), student_config)
    return Recipe(teacher_params, {"params": student_params}, mapping, mapping.shared_with_teacher())


RECIPES = {"kept": kept, "mohawk": mohawk}


def _get(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def _set(tree: dict, path, value) -> dict:
    if len(path) == 1:
        return {**tree, path[0]: value}
    return {**tree, path[0]: _set(tree[path[0]], path[1:], value)}
