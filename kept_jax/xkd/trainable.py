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


def describe(spec: str | tuple[str, ...]) -> str:
    """A trainable set as a config spells it: `all`, or `[mixer/, input_layernorm]`."""
    return spec if isinstance(spec, str) else "[" + ", ".join(spec) + "]"


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
    """The student's variables in three parts; each `shared` leaf is read from the teacher's params."""

    trainable: Flat
    frozen: Flat
    shared: dict[tuple[str, ...], tuple[str, ...]]  # student (collection, *path) -> the teacher's ("params", *path)

    def assemble(self, teacher_params: dict, trainable: Flat | None = None) -> dict:
        """The student's variables dict, e.g. inside the jitted step (trainable may be the traced version)."""
        teacher_flat = traverse_util.flatten_dict({"params": teacher_params})
        flat = {key: teacher_flat[twin] for key, twin in self.shared.items()}
        flat.update(self.frozen)
        flat.update(self.trainable if trainable is None else trainable)
        return traverse_util.unflatten_dict(flat)

    def num_trainable(self) -> int:
        return sum(int(np.prod(x.shape)) for x in self.trainable.values())


def _fp32(x):
    if isinstance(x, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(x.shape, jnp.float32)
    return jnp.asarray(x, jnp.float32)


def shared_leaves(flat: Flat, teacher_params: dict,
                  shared_paths: dict[tuple[str, ...], tuple[str, ...]]) -> dict[tuple[str, ...], tuple[str, ...]]:
    """Student key -> teacher key, for the `params` leaves of `flat` that the mapping says hold the teacher's values
    (`Mapping.shared_with_teacher`: student params path -> teacher params path) where the teacher has a leaf of
    the same shape."""
    teacher_flat = traverse_util.flatten_dict({"params": teacher_params})
    out = {}
    for key, value in flat.items():
        twin = ("params", *shared_paths[key[1:]]) if key[0] == "params" and key[1:] in shared_paths else None
        if twin in teacher_flat and teacher_flat[twin].shape == value.shape:
            out[key] = twin
    return out


def split_by_paths(student_variables: Flat | dict, teacher_params: dict, spec: str | tuple[str, ...],
                   shared_paths: dict[tuple[str, ...], tuple[str, ...]]) -> StudentSplit:
    """Trainable leaves (fp32 master copies), the frozen leaves the student keeps, and the frozen leaves it reads
    from the teacher (`shared_leaves`). It works on shapes (`jax.ShapeDtypeStruct`, for plans) as well as on arrays.
    `student_variables` is nested or flat (keys (collection, *path)).
    """
    flat = student_variables if all(isinstance(k, tuple) for k in student_variables) else \
        traverse_util.flatten_dict(student_variables)
    twins = shared_leaves(flat, teacher_params, shared_paths)
    trainable, frozen, shared = {}, {}, {}
    for key, value in flat.items():
        if is_trainable(key, spec):
            trainable[key] = _fp32(value)
        elif key in twins:
            shared[key] = twins[key]
        else:
            frozen[key] = value
    return StudentSplit(trainable, frozen, shared)
