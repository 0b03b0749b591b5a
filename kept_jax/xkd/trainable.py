"""Which student weights train, and the split that lets teacher and student share device buffers.

Variables are flat dicts keyed by (collection, *path), e.g. ("params", "model", "norm", "weight") or
("lora", "model", "layers", "self_attn", "q_proj", "a"). A student leaf equal to the teacher's leaf at the same
path is *shared*: it is not stored with the student at all, and the jitted step reads it from the teacher's tree,
so a 14B job holds one copy of the common weights. Trainable leaves keep an fp32 master copy.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

Flat = dict[tuple[str, ...], Any]


def is_trainable(key: tuple[str, ...], spec: str | tuple[str, ...]) -> bool:
    """`key` is (collection, *path). Named sets: all, norms, norms+biases, lora; or regexes over 'a/b/c' paths."""
    collection, path = key[0], key[1:]
    if spec == "lora":
        return collection == "lora"
    if collection != "params":
        return False
    if spec == "all":
        return True
    is_norm = path[-1] == "weight" and (path[-2].endswith("layernorm") or path[-2] == "norm")
    if spec == "norms":
        return is_norm
    if spec == "norms+biases":
        return is_norm or path[-1] == "bias"
    joined = "/".join(path)
    return any(re.search(pattern, joined) for pattern in spec)


def init_lora(params: dict, rank: int, targets: tuple[str, ...], key) -> dict:
    """Adapters a [.., in, r] ~ N(0, 1/in) and b = 0 on each target kernel: the student starts exactly where it was."""
    flat = traverse_util.flatten_dict(params)
    adapters = {}
    targeted = [p for p in flat if p[-1] == "kernel" and len(p) >= 2 and p[-2] in targets]
    for k, path in zip(jax.random.split(key, max(1, len(targeted))), targeted):
        kernel = flat[path]
        lead, (d_in, d_out) = kernel.shape[:-2], kernel.shape[-2:]
        adapters[path[:-1] + ("a",)] = jax.random.normal(k, (*lead, d_in, rank), jnp.float32) / np.sqrt(d_in)
        adapters[path[:-1] + ("b",)] = jnp.zeros((*lead, rank, d_out), jnp.float32)
    return traverse_util.unflatten_dict(adapters)


def merge_lora(params: dict, adapters: dict, scale: float) -> dict:
    """Kernels with their adapters folded in (kernel + scale * a @ b), for export."""
    flat = dict(traverse_util.flatten_dict(params))
    flat_adapters = traverse_util.flatten_dict(adapters)
    for path, a in flat_adapters.items():
        if path[-1] != "a":
            continue
        b = flat_adapters[path[:-1] + ("b",)]
        kernel_path = path[:-1] + ("kernel",)
        kernel = flat[kernel_path]
        delta = scale * jnp.matmul(a.astype(jnp.float32), b.astype(jnp.float32))
        flat[kernel_path] = (kernel.astype(jnp.float32) + delta).astype(kernel.dtype)
    return traverse_util.unflatten_dict(flat)


@dataclasses.dataclass
class StudentSplit:
    """The student's variables in three parts; `shared` paths are read from the teacher's params."""

    trainable: Flat
    frozen: Flat
    shared: frozenset[tuple[str, ...]]  # (collection, *path) keys taken from the teacher

    def assemble(self, teacher_params: dict, trainable: Flat | None = None) -> dict:
        """The student's variables dict, e.g. inside the jitted step (trainable may be the traced version)."""
        teacher_flat = traverse_util.flatten_dict({"params": teacher_params})
        flat = {key: teacher_flat[key] for key in self.shared}
        flat.update(self.frozen)
        flat.update(self.trainable if trainable is None else trainable)
        return traverse_util.unflatten_dict(flat)

    def num_trainable(self) -> int:
        return sum(int(np.prod(x.shape)) for x in self.trainable.values())


def split_student(student_variables: dict, teacher_params: dict, spec: str | tuple[str, ...]) -> StudentSplit:
    """Trainable leaves (fp32 master copies), frozen leaves the teacher does not have, and shared paths.

    A frozen leaf is shared when the teacher has a bit-identical array (same shape, dtype and values) at the
    same path; the student's copy is then dropped.
    """
    teacher_flat = traverse_util.flatten_dict({"params": teacher_params})
    trainable, frozen, shared = {}, {}, set()
    for key, value in traverse_util.flatten_dict(student_variables).items():
        if is_trainable(key, spec):
            trainable[key] = jnp.asarray(value, jnp.float32)
            continue
        twin = teacher_flat.get(key)
        if (twin is not None and twin.shape == value.shape and twin.dtype == value.dtype
                and bool(jnp.array_equal(twin, value))):
            shared.add(key)
        else:
            frozen[key] = value
    return StudentSplit(trainable, frozen, frozenset(shared))


def split_by_paths(student_variables: dict, teacher_params: dict, spec: str | tuple[str, ...],
                   shared_paths: frozenset[tuple[str, ...]]) -> StudentSplit:
    """The split when the mapping says which leaves hold the teacher's values (`Mapping.shared_with_teacher`)
    instead of comparing them: it works on shapes (`jax.ShapeDtypeStruct`, for plans) as well as on arrays.

    A frozen params leaf on `shared_paths` is shared when the teacher has a leaf of the same shape there.
    """
    def fp32(x):
        if isinstance(x, jax.ShapeDtypeStruct):
            return jax.ShapeDtypeStruct(x.shape, jnp.float32)
        return jnp.asarray(x, jnp.float32)

    teacher_flat = traverse_util.flatten_dict({"params": teacher_params})
    trainable, frozen, shared = {}, {}, set()
    for key, value in traverse_util.flatten_dict(student_variables).items():
        if is_trainable(key, spec):
            trainable[key] = fp32(value)
        elif key[0] == "params" and key[1:] in shared_paths and key in teacher_flat and teacher_flat[key].shape == value.shape:
            shared.add(key)
        else:
            frozen[key] = value
    return StudentSplit(trainable, frozen, frozenset(shared))
