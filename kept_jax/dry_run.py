"""`python -m kept_jax.train --config C --dry-run [--device-memory 80GB] [--devices N]`: a job on shapes alone.

Nothing is loaded or allocated: the job's plan (`kept_jax.plan.JobPlan`, from the source's config.json, or
`source_config` when the weights are elsewhere) gives the models, stages and mesh, `jax.eval_shape` gives every
parameter's shape, and the mapping's rules say which student weights equal
the teacher's (and so share its buffers). It checks that the mapping covers every tensor of the layout and that every
sharded dimension splits evenly on the mesh, then prints parameter counts and the memory per device:

  weights        teacher leaves (precision.params) + student leaves that differ from the teacher, / shard factor
  trainable      fp32 master copies of the trainable leaves, / shard factor
  optimizer      AdamW m and v: 2 x 4 bytes per trainable value, / shard factor
  gradients      fp32, one buffer (two with grad_accum > 1: the step's and the running sum), / shard factor
  activations    per micro-batch of b = batch_size / (data x fsdp) sequences of T tokens, c bytes (compute dtype):
                   saved for the backward pass, per layer (d hidden, q = heads x head_dim, k = 2 x kv_heads x head_dim,
                   f = ffn size, H heads):
                     full, save-dots-no-batch   b T d                 (the layer input only)
                     save-dots                  b T (3d + q + k + 2f) (input and matmul outputs)
                     none                       b T (5d + 2q + k + 3f) + attention probabilities b H T^2 in fp32
                                                (xla attention only; cudnn's fused kernel keeps b H T)
                   x L layers x c bytes, / tensor where the rules shard those dimensions (not counted: upper bound)
                 + one layer's working set while it is recomputed and differentiated: 2 x the `none` row x c
                 + the teacher's and the student's final hidden states: 2 b T d c
                 + the loss's chunk logits, teacher and student and the gradient: 3 x chunk x vocab x 4 bytes
  fsdp gather    with fsdp > 1, one layer's and the head's weights, whole, for teacher and student, / tensor
  total          the sum; it fits when it is at most 95% of the device memory (XLA needs some room of its own)

The activation rows are estimates of XLA's live set, not its exact allocation: on a GPU, `benchmarks/` measures the
compiled step's `memory_analysis()` to check them.
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from kept_jax.config import replaced_layers
from kept_jax.memory import GIB, parse_size
from kept_jax.plan import for_shapes

FIT_FRACTION = 0.95


def _nbytes(x) -> int:
    return int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize


def per_device_bytes(flat: dict, axes, rules, mesh_sizes: dict, itemsize: int | None = None) -> float:
    """The bytes of `flat`'s leaves that one device holds under `rules` (in `itemsize`-byte elements when given)."""
    from kept_jax import sharding

    total = 0.0
    for key, value in flat.items():
        spec = sharding.mesh_spec(sharding.variable_axes(key, axes), tuple(value.shape), mesh_sizes, rules,
                                  "/".join(key))
        size = _nbytes(value) if itemsize is None else int(np.prod(value.shape)) * itemsize
        total += size / sharding.shard_factor(spec, mesh_sizes)
    return total


def _count(flat: dict) -> int:
    return sum(int(np.prod(v.shape)) for v in flat.values())


def layer_bytes(config, kind: str, b: int, t: int, c: int) -> dict[str, float]:
    """One layer's activations for b sequences of t tokens in c-byte elements: everything its forward makes
    (`none`) and what each remat policy saves of it (d hidden, f ffn size). An attention layer, with q = heads x
    head_dim, k = 2 x kv_heads x head_dim, H heads: `none` b T (5d + 2q + k + 3f) and the probabilities b H T^2 in fp32
    (b H T with cudnn's fused kernel); save-dots b T (3d + q + k + 2f). A state-space layer (a Llamba's, a hybrid's
    Mamba-2): the input, two norms, the MLP's residual (4 d), in_proj's output and the convolution's, y and the gated
    y (2 d_inner), the MLP (3 f), and the chunked SSD's fp32 within-chunk matrices (H x chunk per token); save-dots
    b T (d + in_proj + d_inner + 2f). full and save-dots-no-batch keep the layer input, b T d."""
    d, f = config.hidden_size, config.intermediate_size
    if kind == "attention":
        heads = config.num_attention_heads
        q, k = heads * config.head_dim, 2 * config.num_key_value_heads * config.head_dim
        probs = b * heads * (t * t if config.attention_impl == "xla" else t) * 4  # fp32 softmax
        none, dots = b * t * (5 * d + 2 * q + k + 3 * f) * c + probs, b * t * (3 * d + q + k + 2 * f) * c
    else:
        none = b * t * (4 * d + config.in_proj_size + config.conv_channels + 2 * config.d_inner + 3 * f) * c
        none += b * t * config.mixer_heads * config.ssm_chunk * 4
        dots = b * t * (d + config.in_proj_size + config.d_inner + 2 * f) * c
    return {"none": none, "full": b * t * d * c, "save-dots-no-batch": b * t * d * c, "save-dots": dots}


def kl_activation_bytes(cfg, config, b: int) -> dict[str, float]:
    """The activation rows of a logits-KL step (the module docstring), in bytes per device: every layer's saved
    activations, one layer's recompute and gradients, both final hidden states, the loss's chunk logits."""
    t, c = cfg.data.seq_len, jnp.dtype(cfg.precision.compute).itemsize
    layers = [layer_bytes(config, kind, b, t, c) for kind in config.layer_kinds]
    return {
        f"saved for backward ({cfg.model.remat}, {config.num_hidden_layers} layers)":
            sum(layer[cfg.model.remat] for layer in layers),
        "one layer's recompute + gradients": 2 * max(layer["none"] for layer in layers),
        "final hidden states (teacher, student)": 2 * b * t * config.hidden_size * c,
        f"loss chunk logits ({cfg.loss.chunk_size} x {config.padded_vocab_size})":
            3 * cfg.loss.chunk_size * config.padded_vocab_size * 4,
    }


def estimate(plan) -> dict:
    """Everything the dry run prints about `plan` beyond the plan itself, as data (tests read it): the mapping,
    parameter counts, and memory per device (per stage for mohawk)."""
    if plan.cfg.recipe == "mohawk":
        return estimate_mohawk(plan)
    from kept_jax.mapping import build_mapping
    from kept_jax.models.params import abstract_params
    from kept_jax.xkd.trainable import init_lora, split_by_paths

    cfg = plan.cfg
    mapping = build_mapping(cfg.opm, plan.source_config, stats={})  # rules only: statistics are read when applied
    mapping.check()
    teacher_config, student_config = for_shapes(plan.teacher_config), for_shapes(plan.student_config)
    teacher = abstract_params(teacher_config)
    student = {"params": abstract_params(student_config)}
    if cfg.trainable == "lora":
        student["lora"] = jax.eval_shape(lambda p: init_lora(p, cfg.lora.rank, cfg.lora.targets, jax.random.key(0)),
                                         student["params"])
    teacher_flat = traverse_util.flatten_dict({"params": teacher})
    split = split_by_paths(student, teacher, cfg.trainable, mapping.shared_with_teacher())
    trainable, own, shared = split.trainable, split.frozen, split.shared

    teacher_bytes, student_bytes = _placement(plan)
    memory = _weight_rows(cfg, teacher_bytes(teacher_flat), own, student_bytes(own),
                          student_bytes(trainable, itemsize=4))
    memory.update(kl_activation_bytes(cfg, plan.student_config, plan.micro_batch))  # its attention kernel
    if plan.mesh["fsdp"] > 1:  # XLA gathers a layer's fsdp-sharded weights (teacher's and student's) to use them
        c = teacher_config
        layer_and_head = (c.matmul_params() - c.hidden_size * c.vocab_size) / c.num_hidden_layers + c.hidden_size * c.vocab_size
        memory["one layer's and the head's weights, gathered (fsdp)"] = (
            2 * layer_and_head * jnp.dtype(cfg.precision.params).itemsize / plan.mesh["tensor"])
    return {
        "mapping": mapping, "teacher_params": _count(teacher_flat),
        "student_params": _count(traverse_util.flatten_dict({"params": student["params"]})),
        "trainable_params": _count(trainable), "shared_leaves": len(shared),
        "student_leaves": len(traverse_util.flatten_dict(student)), "memory": memory, "total": sum(memory.values()),
    }


def _placement(plan):
    """(teacher_bytes(flat), student_bytes(flat, itemsize=None)): per-device bytes under the job's sharding rules."""
    from kept_jax import sharding

    student_axes = sharding.logical_axes(for_shapes(plan.student_config))
    teacher_axes = sharding.logical_axes(for_shapes(plan.teacher_config))

    def teacher_bytes(flat):
        return per_device_bytes(flat, teacher_axes, plan.teacher_rules, plan.mesh)

    def student_bytes(flat, itemsize=None):
        return per_device_bytes(flat, student_axes, plan.rules, plan.mesh, itemsize)

    return teacher_bytes, student_bytes


def _weight_rows(cfg, teacher: float, own: dict, own_bytes: float, trainable_fp32: float) -> dict[str, float]:
    """The memory rows every job has: weights, fp32 trainable copies, AdamW's m and v, gradients."""
    return {
        f"teacher weights ({cfg.precision.params})": teacher,
        f"student weights not shared with the teacher ({len(own)} leaves)": own_bytes,
        "trainable leaves, fp32 master copies": trainable_fp32,
        "optimizer state (AdamW m and v, fp32)": 2 * trainable_fp32,
        "gradients (fp32" + (", and the accumulation sum)" if cfg.data.grad_accum > 1 else ")"):
            trainable_fp32 * (2 if cfg.data.grad_accum > 1 else 1),
    }


def mohawk_activation_bytes(cfg, objective: str, teacher, student, b: int) -> dict[str, float]:
    """Stage activations per device (estimates of XLA's live set; docs/llamba.md for the objectives), R the layers
    the student replaced (all of a Llamba's, a hybrid's Mamba-2 ones):
      matrix  the teacher's layer inputs (R x b T d), then one layer at a time: the teacher's attention
              probabilities and the student's mixing matrix with its segment sums and their gradients
              (5 x b H T^2 fp32)
      hidden  the teacher's layer inputs ((L+1) x b T d), then one student block at a time, forward and backward
              (2 x its `none` activations)
      kl      as any logits-KL step (`kl_activation_bytes`)"""
    t, c = cfg.data.seq_len, jnp.dtype(cfg.precision.compute).itemsize
    d, heads = student.hidden_size, student.mixer_heads
    replaced = replaced_layers(teacher, student)
    if objective == "matrix":
        return {f"teacher layer inputs ({len(replaced)} x b T d)": len(replaced) * b * t * d * c,
                f"one layer's matrices (5 x b H T^2 fp32, H = {heads})": 5 * b * heads * t * t * 4}
    if objective == "hidden":
        layers = teacher.num_hidden_layers
        block = max(layer_bytes(student, student.layer_kinds[i], b, t, c)["none"] for i in replaced)
        return {f"teacher layer inputs ({layers + 1} x b T d)": (layers + 1) * b * t * d * c,
                "one block, forward and backward (2 x its activations)": 2 * block}
    return kl_activation_bytes(cfg, student, b)


def estimate_mohawk(plan) -> dict:
    """The Llama -> Llamba or hybrid job, stage by stage: weights (teacher, the student leaves not read from the
    teacher, which grow as stages train them), trainable copies, AdamW state, gradients and the stage's
    activations."""
    from kept_jax.mapping.students import student_mapping
    from kept_jax.models.params import abstract_params
    from kept_jax.xkd.trainable import describe, is_trainable, split_by_paths

    cfg, teacher_config, student_config = plan.cfg, plan.teacher_config, plan.student_config
    mapping = student_mapping(teacher_config, student_config, cfg.mixer_init)
    mapping.check()
    teacher = abstract_params(for_shapes(teacher_config))
    student = traverse_util.flatten_dict({"params": abstract_params(student_config)})
    teacher_flat = traverse_util.flatten_dict({"params": teacher})
    teacher_bytes, student_bytes = _placement(plan)
    shared_paths = mapping.shared_with_teacher()
    teacher_weights = teacher_bytes(teacher_flat)
    stages, trained = [], set()
    for stage in plan.stages:
        # A leaf an earlier stage trained is the student's own from then on (fp32), no longer the teacher's.
        own_paths = {p: t for p, t in shared_paths.items() if ("params", *p) not in trained}
        split = split_by_paths(student, teacher, stage.trainable, own_paths)
        own = {k: (jax.ShapeDtypeStruct(v.shape, jnp.float32) if k in trained else v) for k, v in split.frozen.items()}
        memory = _weight_rows(cfg, teacher_weights, own, student_bytes(own),
                              student_bytes(split.trainable, itemsize=4))
        memory.update(mohawk_activation_bytes(cfg, stage.objective, teacher_config, student_config, plan.micro_batch))
        stages.append({"name": stage.name, "objective": stage.objective, "steps": stage.steps,
                       "tokens": stage.steps * cfg.data.tokens_per_step, "trainable": describe(stage.trainable),
                       "trainable_params": _count(split.trainable), "shared_leaves": len(split.shared),
                       "memory": memory, "total": sum(memory.values())})
        trained |= {k for k in student if is_trainable(k, stage.trainable)}
    return {"mapping": mapping, "teacher_params": _count(teacher_flat), "student_params": _count(student),
            "stages": stages, "total": max(s["total"] for s in stages)}


def _amount(n: float) -> str:
    """A count of tokens in the unit that shows it: 2.70B, 0.30B, 12.3M, 20,480 (not 0.00B)."""
    return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{int(n):,}"


def _fits(total: float, capacity: int) -> str:
    return f"{'fits' if total <= FIT_FRACTION * capacity else 'does NOT fit'} ({total / capacity:.0%})"


def dry_run_mohawk(plan, device_memory: str | None) -> int:
    p, cfg = estimate_mohawk(plan), plan.cfg
    t, s, mesh = plan.teacher_config, plan.student_config, plan.mesh
    capacity = parse_size(device_memory, "--device-memory") if device_memory else None
    print(f"dry run: abstract shapes only, no weights read\n"
          f"teacher        {plan.layout}: Llama, {t.num_hidden_layers} layers, hidden {t.hidden_size}, "
          f"{t.num_attention_heads} heads x {t.head_dim} ({t.num_key_value_heads} KV), "
          f"{p['teacher_params'] / 1e9:.2f}B\n"
          f"student        {s.describe()}; {p['student_params'] / 1e9:.2f}B; mapping {p['mapping'].strategy}: "
          f"every tensor covered\n"
          f"mesh           data={mesh['data']} x fsdp={mesh['fsdp']} x tensor={mesh['tensor']} = {plan.devices} "
          f"device(s); every sharded dimension splits evenly\n"
          f"batch          {cfg.data.batch_size} x {cfg.data.seq_len} tokens per micro-step ({plan.micro_batch} "
          f"sequences per device), {cfg.data.grad_accum} micro-steps per step", file=sys.stdout)
    fits_all = True
    for stage in p["stages"]:
        print(f"\nstage {stage['name']} ({stage['objective']}): {stage['steps']:,} steps, {_amount(stage['tokens'])} "
              f"tokens, trainable {stage['trainable_params'] / 1e6:,.1f}M ({stage['trainable']}), "
              f"{stage['shared_leaves']} student leaves read from the teacher")
        print(f"  {'memory per device':<62}{'GiB':>8}")
        for name, value in stage["memory"].items():
            print(f"    {name:<60}{value / GIB:>8.2f}")
        line = f"    {'total':<60}{stage['total'] / GIB:>8.2f}"
        if capacity:
            line += f"   {_fits(stage['total'], capacity)}"
            fits_all &= stage["total"] <= FIT_FRACTION * capacity
        print(line)
    if capacity is None:
        return 0
    print(f"\ndevice memory {device_memory} = {capacity / GIB:.1f} GiB: "
          f"{'every stage fits' if fits_all else 'NOT every stage fits'} (the limit is {FIT_FRACTION:.0%}).")
    return 0 if fits_all else 1


def dry_run(plan, device_memory: str | None) -> int:
    """Prints the plan and its estimates; returns 0, or 1 when `device_memory` is given and the job does not fit."""
    if plan.cfg.recipe == "mohawk":
        return dry_run_mohawk(plan, device_memory)
    p, cfg = estimate(plan), plan.cfg
    c, mesh = plan.teacher_config, plan.mesh
    out = sys.stdout
    rules = p["mapping"].rules
    print(f"dry run: abstract shapes only, no weights read\n"
          f"source layout  {plan.layout}: {c.num_hidden_layers} layers, hidden {c.hidden_size}, "
          f"{c.num_attention_heads} heads x {c.head_dim}, ffn {c.intermediate_size}, vocab {c.vocab_size}\n"
          f"mapping        opm={cfg.opm}: {len(rules)} target tensors, {len(p['mapping'].dropped)} source tensors "
          f"dropped on purpose; every tensor covered\n"
          f"mesh           data={mesh['data']} x fsdp={mesh['fsdp']} x tensor={mesh['tensor']} = {plan.devices} "
          f"device(s); every sharded dimension splits evenly\n"
          f"parameters     teacher {p['teacher_params'] / 1e9:.2f}B, student {p['student_params'] / 1e9:.2f}B, "
          f"trainable {p['trainable_params'] / 1e6:.1f}M ({cfg.trainable}); "
          f"{p['shared_leaves']} of {p['student_leaves']} student leaves share the teacher's buffers\n"
          f"batch          {cfg.data.batch_size} x {cfg.data.seq_len} tokens per micro-step ({plan.micro_batch} "
          f"sequences per device), {cfg.data.grad_accum} micro-steps per step", file=out)
    print(f"\n{'memory per device':<60}{'GiB':>8}", file=out)
    for name, value in p["memory"].items():
        print(f"  {name:<58}{value / GIB:>8.2f}", file=out)
    print(f"  {'total':<58}{p['total'] / GIB:>8.2f}", file=out)
    if device_memory is None:
        return 0
    capacity = parse_size(device_memory, "--device-memory")
    fits = p["total"] <= FIT_FRACTION * capacity
    print(f"\ndevice memory {device_memory} = {capacity / GIB:.1f} GiB: "
          f"{'fits' if fits else 'does NOT fit'} ({p['total'] / capacity:.0%} of it; the limit is "
          f"{FIT_FRACTION:.0%}). JAX preallocates 75% of a GPU by default: run with "
          f"XLA_PYTHON_CLIENT_MEM_FRACTION=0.95.", file=out)
    return 0 if fits else 1
