"""A model as a user holds it -- a Hugging Face directory or a GGUF file -- opened one way, wherever kept_jax reads one.

    ckpt = open_checkpoint(path)                    # a directory with config.json, or a .gguf file
    config = ckpt.config(param_dtype="bfloat16")    # its architecture's ModelConfig
    reader = ckpt.reader()                          # HF-named tensors, one at a time (CheckpointReader interface)
    ckpt.files_dir                                  # where its tokenizer and generation files are
    config, params, report = load_checkpoint(path)  # all of it, validated, on the default device

A checkpoint is opened once per process (`open_checkpoint` remembers it while the file is unchanged): a GGUF file's
metadata takes seconds to parse.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np

from bridge.gguf_import import GGUFFile, is_gguf
from bridge.hf_import import CheckpointReader, ImportReport, params_from_reader
from kept_jax.config import ModelConfig, read_config_json
from kept_jax.errors import KeptError
from kept_jax.models import config_from_hf
from kept_jax.tokenizer import Tokenizer, load_tokenizer


class HFDirectory:
    """A Hugging Face checkpoint directory: `config.json`, weights, and its side files beside them."""

    kind = "Hugging Face directory"

    def __init__(self, path: str):
        self.path = path
        config_path = os.path.join(path, "config.json")
        if not os.path.isfile(config_path):
            raise KeptError(f"{path!r} has no config.json; pass a Hugging Face checkpoint directory (it holds "
                            "config.json and the weights) or a .gguf file")
        self.hf = read_config_json(config_path)

    @property
    def files_dir(self) -> str:
        return self.path

    @property
    def has_tokenizer(self) -> bool:
        return any(os.path.isfile(os.path.join(self.path, name)) for name in ("tokenizer.json", "tokenizer.model"))

    def reader(self) -> CheckpointReader:
        return CheckpointReader(self.path)


Checkpoint = HFDirectory | GGUFFile
_opened: dict[tuple, Checkpoint] = {}


def open_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """The checkpoint at `path`: a Hugging Face directory or a GGUF file; anything else is one clear error."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise KeptError(f"model {path!r} does not exist; pass a Hugging Face checkpoint directory or a .gguf file")
    stat = os.stat(path)
    key = (os.path.realpath(path), stat.st_mtime_ns, stat.st_size)
    if key not in _opened:
        if os.path.isdir(path):
            _opened[key] = HFDirectory(path)
        elif is_gguf(path):
            _opened[key] = GGUFFile(path)
        elif os.path.basename(path) == "config.json":
            raise KeptError(f"{path!r} is a config.json; pass the checkpoint directory that holds it")
        else:
            raise KeptError(f"{path!r} is neither a Hugging Face checkpoint directory nor a GGUF file (a GGUF file "
                            "starts with the bytes 'GGUF'); pass one of those")
    return _opened[key]


def load_config(path: str | os.PathLike, **runtime: Any) -> ModelConfig:
    """The architecture's config of the checkpoint at `path`, with `runtime` fields set (param_dtype, ...)."""
    return config_from_hf(open_checkpoint(path).hf, **runtime)


def check_checkpoint(path: str | os.PathLike) -> ModelConfig:
    """Opens a checkpoint as far as it can be without reading its weights (its config, its tensor directory, its
    files whole), so that a command reading several refuses a damaged one before any work; returns its config."""
    checkpoint = open_checkpoint(path)
    config = config_from_hf(checkpoint.hf)
    checkpoint.reader()
    return config


def tokenizer_dir(path: str | os.PathLike) -> str:
    """Where the tokenizer files of `path` are: a directory itself (a checkpoint, or tokenizer files alone), or the
    files a GGUF file's vocabulary was written to."""
    path = os.fspath(path)
    return path if os.path.isdir(path) else open_checkpoint(path).files_dir


def load_checkpoint_tokenizer(path: str | os.PathLike, architecture: str,
                              missing_fix: str = "pass token ids with --tokens instead") -> Tokenizer:
    """The tokenizer of a checkpoint directory, of tokenizer files alone, or of a GGUF file's vocabulary; a source
    without one is an error naming it and `missing_fix`."""
    path = os.fspath(path)
    if not os.path.isdir(path) and not open_checkpoint(path).has_tokenizer:
        raise KeptError(f"{path} has no tokenizer metadata (tokenizer.ggml.tokens); {missing_fix}")
    tokenizer = load_tokenizer(tokenizer_dir(path), architecture, missing_fix)
    if not os.path.isdir(path):
        tokenizer.source = path  # what messages name: the GGUF given, not the private folder its files went to
    return tokenizer


def load_checkpoint(path: str | os.PathLike, progress: str | None = None, **runtime: Any
                    ) -> tuple[ModelConfig, dict, ImportReport]:
    """Loads any checkpoint kept_jax reads (`kept_jax.models.ARCHITECTURES`, from a directory or a GGUF file);
    `runtime` sets the config's runtime fields (param_dtype, ...); `progress` labels a progress bar.

    Parameters go to the default JAX device one leaf at a time, so host memory stays near one leaf plus the
    model's device copy.
    """
    checkpoint = open_checkpoint(path)
    config = config_from_hf(checkpoint.hf, **runtime)
    reader = checkpoint.reader()
    params, skipped, dtypes = params_from_reader(reader, config, progress=progress)
    if config.tie_word_embeddings and "lm_head.weight" in reader.names():
        if not np.array_equal(reader.read("lm_head.weight"), reader.read(config.hf_embedding_name)):
            raise KeptError(
                f"config.json sets {config.hf_tie_key}=true but lm_head.weight differs from "
                f"{config.hf_embedding_name}; set {config.hf_tie_key}=false in config.json"
            )
    num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    return config, params, ImportReport(reader.files, skipped, dtypes, num_params)
