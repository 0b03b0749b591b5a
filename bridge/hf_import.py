"""Hugging Face directory -> HF-named tensors, and any reader of HF-named tensors -> Flax params, strictly validated.

Reads `model.safetensors`, sharded safetensors with `model.safetensors.index.json`, and `pytorch_model*.bin`
(with `weights_only=True`: a checkpoint never runs code). Every failure is a `KeptError` naming the file or
tensor and the fix; nothing half-loaded is returned.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import pickle
import re
import warnings
import zipfile
from typing import Any, Callable, Iterator

import jax
import ml_dtypes  # registers bfloat16 with NumPy; safetensors' NumPy reader needs it
import numpy as np

from kept_jax.config import NUMPY_DTYPES, ModelConfig
from kept_jax.models.names import TensorSpec, is_harmless_buffer
from kept_jax.errors import KeptError

SAFETENSORS_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16}
READABLE_DTYPES = frozenset(SAFETENSORS_DTYPES) | frozenset(NUMPY_DTYPES)  # safetensors or torch dtype names
WEIGHT_FILES = (
    "model.safetensors.index.json",
    "model.safetensors",
    "pytorch_model.bin.index.json",
    "pytorch_model.bin",
)


@dataclasses.dataclass
class ImportReport:
    files: list[str]
    skipped: list[tuple[str, str]]  # (tensor name, why)
    source_dtypes: dict[str, int]  # dtype -> number of tensors
    num_params: int

    def summary(self) -> str:
        lines = [f"read {self.num_params:,} parameters from {', '.join(self.files)}"]
        lines.append("source dtypes: " + ", ".join(f"{k} x{v}" for k, v in sorted(self.source_dtypes.items())))
        for name, why in self.skipped:
            lines.append(f"skipped {name}: {why}")
        return "\n".join(lines)


# ---- Tensor sources -------------------------------------------------------------------------------


class _SafetensorsFile:
    def __init__(self, path: str):
        from safetensors import safe_open

        self.path = path
        try:
            self._handle = safe_open(path, framework="numpy")
            self._names = list(self._handle.keys())
        except Exception as e:  # SafetensorError is not importable as a class in every version
            raise KeptError(
                f"cannot read {path}: {e}. The file is truncated or corrupt; re-download or re-save the checkpoint"
            ) from None

    def names(self) -> list[str]:
        return self._names

    def dtype_and_shape(self, name: str) -> tuple[str, tuple[int, ...]]:
        sl = self._handle.get_slice(name)
        return sl.get_dtype(), tuple(sl.get_shape())

    def read(self, name: str) -> np.ndarray:
        try:
            return self._handle.get_tensor(name)
        except Exception as e:
            raise KeptError(f"cannot read tensor {name!r} from {self.path}: {e}; the file is corrupt") from None


class _TorchFile:
    def __init__(self, path: str):
        try:
            import torch
        except ImportError:
            raise KeptError(
                f"{path} is a PyTorch .bin checkpoint and reading it needs torch: pip install 'kept_jax[torch]'"
            ) from None
        self.path = path
        self._torch = torch
        try:
            with warnings.catch_warnings():  # kept_jax reports what matters itself, in one line
                warnings.simplefilter("ignore")
                try:
                    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
                except RuntimeError as e:
                    if "mmap" not in str(e):
                        raise
                    state = torch.load(path, map_location="cpu", weights_only=True)  # legacy non-zip format
        except pickle.UnpicklingError as e:
            # torch's own message advises weights_only=False, which would run the file's code: never repeated here.
            found = re.search(r"GLOBAL ([\w.]+)", str(e))
            what = f"a pickled {found.group(1)} object" if found else "pickled objects other than tensors"
            raise KeptError(
                f"{path} holds {what}, and kept_jax reads .bin files only as plain tensors (weights_only=True), so "
                "that a checkpoint never runs code. Convert it to safetensors in an environment you trust"
            ) from None
        except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as e:
            raise KeptError(
                f"cannot read {path}: {str(e).splitlines()[0]}. The file is truncated or corrupt; re-download it"
            ) from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise KeptError(f"{path} is not a state dict of tensors; pass a Hugging Face checkpoint")
        self._state = state

    def names(self) -> list[str]:
        return list(self._state)

    def dtype_and_shape(self, name: str) -> tuple[str, tuple[int, ...]]:
        t = self._state[name]
        return str(t.dtype).removeprefix("torch."), tuple(t.shape)

    def read(self, name: str) -> np.ndarray:
        t = self._state[name].contiguous()
        if t.dtype == self._torch.bfloat16:
            return t.view(self._torch.int16).numpy().view(ml_dtypes.bfloat16)
        return t.numpy()


def _read_index(path: str) -> dict[str, str]:
    try:
        with open(path, encoding="utf-8") as f:
            index = json.load(f)
        weight_map = index["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise TypeError("weight_map must map tensor names to file names")
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise KeptError(f"{path} is not a valid index ({type(e).__name__}: {e}); re-download it") from None
    return weight_map


class CheckpointReader:
    """All tensors of an HF directory, by name, opened lazily; reading returns one tensor as NumPy."""

    config_name = "config.json"  # what describes the tensors, for messages

    def __init__(self, model_dir: str):
        self.model_dir = model_dir
        found = [f for f in WEIGHT_FILES if os.path.isfile(os.path.join(model_dir, f))]
        if not found:
            raise KeptError(
                f"no weights in {model_dir!r}: expected one of {', '.join(WEIGHT_FILES)}"
            )
        weights = found[0]
        self.format = "safetensors" if "safetensors" in weights else "pytorch"
        if weights.endswith(".index.json"):
            self.weight_map = _read_index(os.path.join(model_dir, weights))
            self.files = sorted(set(self.weight_map.values()))
            for name in self.files:
                if not os.path.isfile(os.path.join(model_dir, name)):
                    raise KeptError(
                        f"{weights} lists shard {name!r}, which is not in {model_dir!r}; the download is incomplete"
                    )
        else:
            self.weight_map = None
            self.files = [weights]
        self._open: dict[str, Any] = {}
        if self.weight_map is None:
            self.weight_map = {n: weights for n in self._file(weights).names()}
        else:
            for file_name in self.files:  # the index must agree with the shards it names
                have = set(self._file(file_name).names())
                listed = [n for n, f in self.weight_map.items() if f == file_name and n not in have]
                if listed:
                    raise KeptError(
                        f"{weights} says {listed[0]!r} is in {file_name}, but it is not there; the shard or the "
                        "index is from another checkpoint"
                    )

    def _file(self, file_name: str):
        if file_name not in self._open:
            path = os.path.join(self.model_dir, file_name)
            self._open[file_name] = _SafetensorsFile(path) if self.format == "safetensors" else _TorchFile(path)
        return self._open[file_name]

    def names(self) -> list[str]:
        return list(self.weight_map)

    def release(self) -> None:
        """Closes the open files; the pages they mapped stop counting against host memory."""
        self._open.clear()

    def dtype_and_shape(self, name: str) -> tuple[str, tuple[int, ...]]:
        return self._file(self.weight_map[name]).dtype_and_shape(name)

    def read(self, name: str) -> np.ndarray:
        return self._file(self.weight_map[name]).read(name)

    def where(self, name: str) -> str:
        return self.weight_map[name]


class ArrayReader:
    """The CheckpointReader interface over in-memory HF-named NumPy arrays (a conversion's output)."""

    config_name = "config"

    def __init__(self, tensors: dict[str, np.ndarray], label: str = "converted tensors"):
        self.tensors, self.model_dir, self.files = tensors, label, [label]

    def names(self) -> list[str]:
        return list(self.tensors)

    def dtype_and_shape(self, name: str) -> tuple[str, tuple[int, ...]]:
        return self.tensors[name].dtype.name, self.tensors[name].shape

    def read(self, name: str) -> np.ndarray:
        return self.tensors[name]

    def where(self, name: str) -> str:
        return self.model_dir


# ---- Import -------------------------------------------------------------------------------------


def _check_names(reader: CheckpointReader, specs: list[TensorSpec], config: ModelConfig) -> list[tuple[str, str]]:
    expected = {s.hf_name for s in specs}
    present = set(reader.names())
    missing = [s.hf_name for s in specs if s.hf_name not in present]
    skipped, unexpected = [], []
    for name in reader.names():
        if name in expected:
            continue
        if is_harmless_buffer(name):
            skipped.append((name, "rotary buffer, recomputed from the config"))
        elif name == "lm_head.weight" and config.tie_word_embeddings:
            skipped.append((name, f"tied to {config.hf_embedding_name} (checked equal)"))
        else:
            unexpected.append(name)

    def listing(names):
        return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")

    if missing:
        raise KeptError(
            f"checkpoint {reader.model_dir!r} is missing {len(missing)} tensor(s) that its {reader.config_name} implies: "
            f"{listing(missing)}. Check that {reader.config_name} (model_type {config.architecture!r}, "
            f"{', '.join(f'{k}={v}' for k, v in config.layout_flags().items())}) belongs to these weights"
        )
    if unexpected:
        raise KeptError(
            f"checkpoint {reader.model_dir!r} has {len(unexpected)} tensor(s) its {reader.config_name} does not explain: "
            f"{listing(unexpected)}. Check that {reader.config_name} belongs to these weights"
        )
    return skipped


def _read_checked(reader: CheckpointReader, spec: TensorSpec, dtypes: collections.Counter) -> np.ndarray:
    name = spec.hf_name
    dtype, shape = reader.dtype_and_shape(name)
    if dtype not in getattr(reader, "readable_dtypes", READABLE_DTYPES):
        raise KeptError(
            f"tensor {name!r} in {reader.where(name)} has dtype {dtype}; kept_jax reads float32, float16 and "
            "bfloat16 checkpoints (dequantize it first)"
        )
    if shape != spec.hf_shape:
        raise KeptError(
            f"tensor {name!r} in {reader.where(name)} has shape {shape}, but {reader.config_name} implies {spec.hf_shape}; "
            "the config and the weights do not match"
        )
    array = reader.read(name)
    finite = np.isfinite(array)
    if not finite.all():
        raise KeptError(
            f"tensor {name!r} in {reader.where(name)} has {int(finite.size - finite.sum())} non-finite values "
            "(NaN or Inf); the checkpoint is damaged or diverged"
        )
    dtypes[dtype] += 1
    return array


def iter_params(
    reader: CheckpointReader, config: ModelConfig, dtypes: collections.Counter,
    keep: Callable[[TensorSpec], bool] = lambda spec: True,
) -> Iterator[tuple[tuple[str, ...], np.ndarray]]:
    """Yields (params path, NumPy array in `config.param_dtype`), one leaf at a time, of the tensors `keep` selects.

    With `scan_layers` a leaf is the [L, ...] stack of one tensor kind, filled layer by layer in place.
    """
    target = NUMPY_DTYPES[config.param_dtype]
    by_leaf: dict[tuple[str, ...], list[TensorSpec]] = collections.defaultdict(list)
    for spec in filter(keep, config.tensor_table()):
        by_leaf[spec.params_path(config.scan_layers)].append(spec)
    for path, specs in by_leaf.items():
        first = specs[0]
        shape = first.hf_shape[::-1] if first.transpose else first.hf_shape
        if first.layer is not None and config.scan_layers:
            leaf = np.empty((len(specs), *shape), dtype=target)
            for spec in specs:
                value = _read_checked(reader, spec, dtypes)
                leaf[spec.layer] = value.T if spec.transpose else value
        else:
            value = _read_checked(reader, first, dtypes)
            leaf = np.ascontiguousarray((value.T if first.transpose else value).astype(target))
        yield path, leaf


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def params_from_reader(reader, config: ModelConfig, keep: Callable[[TensorSpec], bool] = lambda spec: True,
                       progress: str | None = None) -> tuple[dict, list[tuple[str, str]], dict[str, int]]:
    """Validated kept_jax params (on the default device) from any reader of HF-named tensors: all of them, or the
    part `keep` selects (the checkpoint's names are checked in full either way). `progress`: the label of a
    progress bar over the leaves read."""
    skipped = _check_names(reader, config.tensor_table(), config)
    dtypes: collections.Counter = collections.Counter()
    params: dict = {}
    leaves = iter_params(reader, config, dtypes, keep)
    if progress:
        from kept_jax.runlog import counted

        total = len({spec.params_path(config.scan_layers) for spec in filter(keep, config.tensor_table())})
        leaves = counted(leaves, total, progress, "tensor")
    for path, leaf in leaves:
        _set(params, path, jax.device_put(leaf))
        del leaf
        if getattr(reader, "format", None) == "safetensors":
            reader.release()  # a .bin shard would be unpickled again: keep it
    return params, skipped, dict(dtypes)


def streamed_layers(reader, config: ModelConfig) -> Iterator[dict]:
    """Each layer's own params (validated, on the default device), read from the checkpoint when the previous one
    is done with: only one layer of a large model is in memory."""
    unscanned = config.replace(scan_layers=False)
    for i in range(config.num_hidden_layers):
        params, _, _ = params_from_reader(reader, unscanned, lambda spec, i=i: spec.layer == i)
        layer = next(iter(params.values()))["layers"][str(i)]
        del params
        yield layer
        del layer  # before the next layer is read
