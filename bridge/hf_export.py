"""kept_jax params -> a Hugging Face directory, one tensor at a time, written to a temporary directory and renamed.

Shards are planned from the tensor table before any data is produced (sizes are known from shapes), so each
safetensors file is written by streaming: header first, then each tensor as it is computed. The format is the
documented safetensors layout (u64 header length, JSON header padded to 8 bytes, raw little-endian data); the
library's writer needs every tensor of a file in memory at once, which a 14B export cannot afford.
"""

from __future__ import annotations

import json
import math
import os
import struct
from typing import Any, Callable

import ml_dtypes
import numpy as np

from kept_jax.config import NUMPY_DTYPES, ModelConfig
from kept_jax.models.names import TensorSpec

SAFETENSORS_DTYPE_NAMES = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16", np.dtype(ml_dtypes.bfloat16): "BF16"}
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # 5GB, as Transformers' save_pretrained counts it


def hf_tensor(params: dict, config: ModelConfig, spec: TensorSpec, dtype: str) -> np.ndarray:
    """One HF tensor (HF layout, `dtype`) taken from kept_jax params (scanned or not)."""
    node: Any = params
    for key in spec.params_path(config.scan_layers):
        node = node[key]
    array = np.asarray(node[spec.layer] if spec.layer is not None and config.scan_layers else node)
    if spec.transpose:
        array = array.T
    return np.ascontiguousarray(array.astype(NUMPY_DTYPES[dtype]))


def plan_shards(
    entries: list[tuple[str, tuple[int, ...]]], dtype: str, max_shard_bytes: int | None
) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Greedy, in table order; a tensor larger than the limit gets a shard of its own; no limit: one file."""
    itemsize = np.dtype(NUMPY_DTYPES[dtype]).itemsize
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in entries:
        nbytes = math.prod(shape) * itemsize
        if shards[-1] and max_shard_bytes is not None and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    return shards


def write_safetensors(
    path: str, entries: list[tuple[str, tuple[int, ...]]], dtype: str, get: Callable[[str], np.ndarray]
) -> None:
    """Streams one safetensors file: the header from the planned shapes, then each tensor from `get`."""
    np_dtype = np.dtype(NUMPY_DTYPES[dtype])
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in entries:
        nbytes = math.prod(shape) * np_dtype.itemsize
        header[name] = {"dtype": SAFETENSORS_DTYPE_NAMES[np_dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for name, shape in entries:
            array = get(name)
            if array.shape != tuple(shape) or array.dtype != np_dtype:
                raise ValueError(f"{name}: produced {array.shape} {array.dtype}, planned {shape} {np_dtype}")
            np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<"), copy=False).tofile(f)


def write_weights(
    out_dir: str,
    entries: list[tuple[str, tuple[int, ...]]],
    dtype: str,
    get: Callable[[str], np.ndarray],
    max_shard_bytes: int | None = DEFAULT_MAX_SHARD_BYTES,
) -> list[str]:
    """`model.safetensors`, or `model-0000k-of-0000N.safetensors` + `model.safetensors.index.json` past the limit."""
    shards = plan_shards(entries, dtype, max_shard_bytes)
    if len(shards) == 1:
        write_safetensors(os.path.join(out_dir, "model.safetensors"), shards[0], dtype, get)
        return ["model.safetensors"]
    itemsize = np.dtype(NUMPY_DTYPES[dtype]).itemsize
    names, weight_map = [], {}
    for k, shard in enumerate(shards, start=1):
        file_name = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(os.path.join(out_dir, file_name), shard, dtype, get)
        weight_map.update({name: file_name for name, _ in shard})
        names.append(file_name)
    total = sum(math.prod(shape) * itemsize for _, shape in entries)
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return names


def write_config(out_dir: str, config: ModelConfig) -> None:
    with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config.to_hf_dict(), f, indent=2)


def shard_limit(config: ModelConfig, requested: int | None = None) -> int | None:
    """The largest file of an export: `requested`, else 5 GB, or no limit for an architecture whose official loader
    reads one `model.safetensors` (Llamba)."""
    if requested is not None:
        return requested
    return None if config.hf_single_file else DEFAULT_MAX_SHARD_BYTES


def write_params(out_dir: str, params: dict, config: ModelConfig, dtype: str,
                 max_shard_bytes: int | None = None) -> list[str]:
    """Writes `config.json` and the weights of kept_jax params, one tensor at a time."""
    specs = {s.hf_name: s for s in config.tensor_table()}
    write_config(out_dir, config.replace(dtype=dtype))
    return write_weights(
        out_dir,
        [(s.hf_name, s.hf_shape) for s in specs.values()],
        dtype,
        lambda name: hf_tensor(params, config, specs[name], dtype),
        shard_limit(config, max_shard_bytes),
    )
