"""Placing the job on a device mesh: axes `data`, `fsdp`, `tensor`, and logical-axis rules from the config.

Every parameter carries logical axis names from the model: the shared ones (`vocab`, `embed`, `mlp`, `norm`,
`layers`) and each architecture's own (`q_heads`, `kv_heads` for attention; see `logical_axis_rules`); LoRA adapters inherit their kernel's input axis (a) or output axis (b). Rules map logical names to
mesh axes, e.g. `embed: fsdp` shards every weight's hidden dimension over the fsdp axis (ZeRO-3 style: XLA gathers it
for each layer), `mlp: tensor` splits the MLP Megatron-style. Batches are [grad_accum, batch, seq] with the batch
dimension over `data` and `fsdp`. Optimizer state mirrors the trainable leaves. GSPMD inserts the collectives.
"""

from __future__ import annotations

import math
import os
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from kept_jax.config import ModelConfig
from kept_jax.errors import KeptError
from kept_jax.models import ARCHITECTURES, build_model

MESH_AXES = ("data", "fsdp", "tensor")
# The shared logical axes, then every architecture's own.
DEFAULT_RULES: dict[str, Any] = {
    "batch": ("data", "fsdp"), "vocab": "tensor", "embed": "fsdp", "mlp": "tensor", "norm": None, "layers": None,
}
for _arch in ARCHITECTURES.values():
    DEFAULT_RULES.update(_arch.logical_axis_rules)
LOGICAL_AXES = tuple(DEFAULT_RULES)
Rules = Sequence[tuple[str, Any]]


def rules_from(overrides: Mapping[str, Any] | None, base: Mapping[str, Any] = DEFAULT_RULES) -> Rules:
    """The default rules with `overrides` ({logical: mesh axis | [axes] | None}) applied, as flax's rule pairs."""
    merged = dict(base)
    for logical, target in (overrides or {}).items():
        if logical not in LOGICAL_AXES:
            raise KeptError(f"sharding rule for unknown logical axis {logical!r}; logical axes: {', '.join(LOGICAL_AXES)}")
        targets = (target,) if isinstance(target, str) else tuple(target or ())
        bad = [t for t in targets if t not in MESH_AXES]
        if bad:
            raise KeptError(f"sharding rule {logical}: {target!r} names {bad[0]!r}; mesh axes: {', '.join(MESH_AXES)}")
        merged[logical] = targets[0] if len(targets) == 1 else (targets or None)
    return tuple(merged.items())


def mesh_shape(data: int, fsdp: int, tensor: int, num_devices: int) -> tuple[int, int, int]:
    """Resolves one -1 entry to the remaining devices and checks that the product is the device count."""
    shape = [data, fsdp, tensor]
    if sum(s == -1 for s in shape) > 1 or any(s == 0 or s < -1 for s in shape):
        raise KeptError(f"mesh (data={data}, fsdp={fsdp}, tensor={tensor}): use positive sizes and at most one -1")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if num_devices % known:
            raise KeptError(f"mesh: {num_devices} devices do not divide by fsdp x tensor x data = {known}")
        shape[shape.index(-1)] = num_devices // known
    if math.prod(shape) != num_devices:
        raise KeptError(f"mesh data={shape[0]} x fsdp={shape[1]} x tensor={shape[2]} = {math.prod(shape)} devices, "
                        f"but {num_devices} are visible; set mesh.data=-1 to use the rest")
    return tuple(shape)


def make_mesh(data: int, fsdp: int, tensor: int, devices: Sequence | None = None) -> Mesh:
    """A mesh over all devices (of every host). `tensor` is innermost, so it stays within a host's fast links."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(data, fsdp, tensor, len(devices))
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def logical_axes(config: ModelConfig) -> dict[tuple[str, ...], tuple]:
    """{("params", *path): logical names per dimension}, from the model's own annotations (no allocation)."""
    boxed = jax.eval_shape(lambda: build_model(config).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))
    specs = nn.get_partition_spec({"params": boxed["params"]})
    flat = traverse_util.flatten_dict(specs)
    return {key: tuple(spec) for key, spec in flat.items()}


def variable_axes(key: tuple[str, ...], params_axes: Mapping[tuple[str, ...], tuple]) -> tuple:
    """Logical axes of a params or LoRA leaf: a [.., in, r] reads the kernel's input axis, b [.., r, out] its output."""
    if key[0] == "lora":
        kernel = params_axes[("params", *key[1:-1], "kernel")]
        return (*kernel[:-1], None) if key[-1] == "a" else (*kernel[:-2], None, kernel[-1])
    return params_axes[key]


def _axis_names(entry) -> tuple[str, ...]:
    """One PartitionSpec entry (None, an axis name, or a tuple of them) as a tuple of mesh axis names."""
    return (entry,) if isinstance(entry, str) else tuple(entry or ())


def mesh_spec(axes: tuple, shape: tuple, mesh_sizes: Mapping[str, int], rules: Rules, where: str) -> PartitionSpec:
    """The mesh PartitionSpec of a leaf with logical `axes`; every sharded dimension must split evenly."""
    spec = nn.logical_to_mesh_axes(axes, rules)
    for size, mesh_axes in zip(shape, spec):
        names = _axis_names(mesh_axes)
        ways = math.prod(mesh_sizes[n] for n in names)
        if size % ways:
            raise KeptError(f"{where}: dimension {size} does not split {ways} ways over mesh axes {names}; "
                            f"change the mesh sizes or the sharding rules")
    return spec


def shard_factor(spec: PartitionSpec, mesh_sizes: Mapping[str, int]) -> int:
    """Into how many pieces the spec cuts a leaf (the rest of the mesh holds replicas)."""
    return math.prod(mesh_sizes[n] for entry in spec for n in _axis_names(entry))


def _named(mesh: Mesh, rules: Rules, axes: tuple, shape: tuple, where: str) -> NamedSharding:
    return NamedSharding(mesh, mesh_spec(axes, shape, dict(mesh.shape), rules, where))


def flat_shardings(flat: Mapping[tuple[str, ...], Any], params_axes, mesh: Mesh, rules: Rules) -> dict:
    """Shardings for a flat {(collection, *path): array or ShapeDtypeStruct} dict."""
    return {key: _named(mesh, rules, variable_axes(key, params_axes), tuple(value.shape), "/".join(key))
            for key, value in flat.items()}


def tree_shardings(tree: dict, params_axes, mesh: Mesh, rules: Rules) -> dict:
    """Shardings for a nested params dict (the teacher's)."""
    flat = traverse_util.flatten_dict({"params": tree})
    return traverse_util.unflatten_dict(flat_shardings(flat, params_axes, mesh, rules))["params"]


def state_shardings(abstract_state, trainable_shardings: Mapping, mesh: Mesh):
    """The train state's shardings: optimizer moments follow their trainable leaf; counters are replicated."""
    replicated = NamedSharding(mesh, PartitionSpec())

    def leaf(path, _):
        for entry in reversed(path):
            key = getattr(entry, "key", None)
            if isinstance(key, tuple) and key in trainable_shardings:
                return trainable_shardings[key]
        return replicated

    return jax.tree_util.tree_map_with_path(leaf, abstract_state)


def batch_sharding(mesh: Mesh, rules: Rules) -> NamedSharding:
    """[grad_accum, batch, seq] token arrays: the batch dimension over the rule for `batch`."""
    return NamedSharding(mesh, nn.logical_to_mesh_axes((None, "batch", None), rules))


def rows_sharding(mesh: Mesh, rules: Rules) -> NamedSharding:
    """Arrays whose first dimension is the batch ([batch, seq] tokens, [batch, ...] decode state): rows over the
    rule for `batch`, the other dimensions whole."""
    return NamedSharding(mesh, nn.logical_to_mesh_axes(("batch",), rules))


def per_device_batch(batch_size: int, mesh_sizes: Mapping[str, int], name: str = "data.batch_size",
                     fix: str = "mesh.data / mesh.fsdp") -> int:
    """Sequences per device of a [batch, seq] array split over the data and fsdp axes."""
    ways = mesh_sizes["data"] * mesh_sizes["fsdp"]
    if batch_size % ways:
        raise KeptError(f"{name} {batch_size} does not split over data x fsdp = {ways} devices; "
                        f"change the batch size or {fix}")
    return batch_size // ways


def global_batch(local: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """This host's rows [grad_accum, batch / hosts, seq] -> one global array (every host calls this)."""
    if jax.process_count() == 1:
        return jax.device_put(local, sharding)
    return jax.make_array_from_process_local_data(sharding, local)


def global_rows(rows: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """Rows every host holds in full (held-out data) -> one global array."""
    if jax.process_count() == 1:
        return jax.device_put(rows, sharding)
    return jax.make_array_from_callback(rows.shape, sharding, lambda index: rows[index])


def to_host(x) -> np.ndarray:
    """A (possibly sharded, possibly multi-host) array as one numpy array on this host."""
    if jax.process_count() > 1 and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def launched_distributed(environ: Mapping[str, str] = os.environ) -> bool:
    """True when a launcher started several processes: an explicit coordinator, SLURM, or Open MPI."""
    if environ.get("JAX_COORDINATOR_ADDRESS"):
        return True
    counts = (environ.get(name, "1") for name in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "JAX_NUM_PROCESSES"))
    return any(count.isdigit() and int(count) > 1 for count in counts)


def distributed_arguments(environ: Mapping[str, str] = os.environ) -> dict[str, int]:
    """What `jax.distributed.initialize` cannot read itself: a hand launch's JAX_NUM_PROCESSES and JAX_PROCESS_ID
    (SLURM and Open MPI launches it detects; JAX_COORDINATOR_ADDRESS it reads)."""
    names = {"num_processes": "JAX_NUM_PROCESSES", "process_id": "JAX_PROCESS_ID"}
    arguments = {}
    for argument, name in names.items():
        value = environ.get(name)
        if value is not None:
            if not value.isdigit():
                raise KeptError(f"{name}={value!r}: give a whole number")
            arguments[argument] = int(value)
    return arguments


def initialize_distributed(environ: Mapping[str, str] = os.environ) -> None:
    """`jax.distributed.initialize()` (it reads the launcher's environment) when launched as several processes."""
    if launched_distributed(environ):
        jax.distributed.initialize(**distributed_arguments(environ))
