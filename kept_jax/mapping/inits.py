"""The starting values of a new mixer's tensors, shared by the Llamba and the hybrid inits: float64 arrays in HF
layout, each drawn from a generator seeded by (seed, tensor name), so that any one tensor can be rebuilt alone."""

from __future__ import annotations

import zlib

import numpy as np


def seeded_rng(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def default_linear(name: str, shape: tuple[int, int], seed: int) -> np.ndarray:
    """nn.Linear's default weight [out, in]: U(-1/sqrt(in), 1/sqrt(in))."""
    bound = 1.0 / np.sqrt(shape[1])
    return seeded_rng(seed, name).uniform(-bound, bound, size=shape)


def repeat_heads(weight: np.ndarray, kv_heads: int, heads: int) -> np.ndarray:
    """[kv_heads x head_dim, d] -> [heads x head_dim, d]: each KV head repeated for the query heads that read it."""
    per_head = weight.reshape(kv_heads, -1, weight.shape[-1])
    return np.repeat(per_head, heads // kv_heads, axis=0).reshape(-1, weight.shape[-1])


def conv_identity(channels: int, kernel: int):
    """A depthwise Conv1d weight [C, 1, K] that passes the current token through (tap K-1)."""
    def fn() -> np.ndarray:
        weight = np.zeros((channels, 1, kernel))
        weight[:, 0, -1] = 1.0
        return weight
    return fn
