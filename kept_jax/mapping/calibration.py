"""Calibration statistics of every norm site's input, from the teacher's own activations on text.

For a norm input x (one token, hidden size D): u = x / sqrt(mean(x^2) + eps) is what an RMSNorm with unit gain
outputs, and a = (x - mean(x)) / sqrt(var(x) + eps) is what a LayerNorm with unit gain and no bias outputs. After
recentering the residual writers the stream is x - mean(x), whose RMSNorm output is exactly a.

Statistics are sums, never stored activations: each batch's partial sums are computed on the device in fp32 and
added into float64 accumulators on the host. The teacher runs one layer at a time over all calibration batches, so
only one layer's weights and the batches' hidden states are alive: a checkpoint can be calibrated straight from its
files, layer by layer, in a fraction of its size.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from kept_jax.config import ModelConfig
from kept_jax.models import build_model

Params = dict[str, Any]
SOWN_SITES = ("input_layernorm_in", "post_attention_layernorm_in")  # what a decoder layer sows, in its own names


@dataclasses.dataclass
class SiteStats:
    """Sums over calibration tokens at one norm site; `aa_outer` (sum of a a^T) only where requested."""

    n: float
    u: np.ndarray
    uu: np.ndarray
    a: np.ndarray
    aa: np.ndarray
    au: np.ndarray
    aa_outer: np.ndarray | None = None
    absorb: tuple[float, np.ndarray, float] | None = None  # (ridge, direction, error) once solved; see opm.solved

    def mean(self, name: str) -> np.ndarray:
        return getattr(self, name) / self.n


def _partial_sums(x: jax.Array, eps: float, outer: bool) -> dict[str, jax.Array]:
    x = x.astype(jnp.float32).reshape(-1, x.shape[-1])
    u = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)
    centered = x - jnp.mean(x, axis=-1, keepdims=True)
    a = centered * jax.lax.rsqrt(jnp.mean(centered * centered, axis=-1, keepdims=True) + eps)
    sums = {"u": u.sum(0), "uu": (u * u).sum(0), "a": a.sum(0), "aa": (a * a).sum(0), "au": (a * u).sum(0)}
    if outer:
        sums["aa_outer"] = jnp.dot(a.T, a, precision=jax.lax.Precision.HIGHEST)
    return sums


def calibrate(
    config: ModelConfig, embedding: Params, layers: Iterable[Params], batches: Iterable[np.ndarray],
    outer_sites: Iterable[str] = (), finish: Callable[[SiteStats], SiteStats] = lambda stats: stats,
) -> dict[str, SiteStats]:
    """Norm-site statistics keyed by HF norm name (`model.layers.{i}.input_layernorm`, ..., `model.norm`).

    `embedding`: params holding what the model's `embed` reads (the whole tree will do); `layers`: each layer's own
    params in order (`layer_list(params)`, or a generator reading them from a checkpoint one at a time).
    `outer_sites` get the full [D, D] second moment of a. `finish` is applied to each site's statistics as soon as
    they are complete (`opm.solved` keeps of a [D, D] moment only what the mapping reads of it)."""
    outer_sites = frozenset(outer_sites)
    eps = config.rms_norm_eps
    model, block = build_model(config), config.block_class(config)
    batches = [jnp.asarray(tokens) for tokens in batches]
    if not batches:
        raise ValueError("calibration needs at least one batch of tokens")
    n = float(sum(int(np.prod(tokens.shape)) for tokens in batches))

    @jax.jit
    def embed(p, tokens):
        return model.apply({"params": p}, tokens, method="embed")

    @functools.partial(jax.jit, static_argnames="outer")
    def layer_sums(p, x, tokens, outer):
        (x, _), sown = block.apply({"params": p}, x, *config.block_args(tokens), mutable="intermediates")
        sites = sorted(sown["intermediates"])
        return x, {k: _partial_sums(sown["intermediates"][k][0], eps, o) for k, o in zip(sites, outer)}

    @functools.partial(jax.jit, static_argnames="outer")
    def final_sums(x, outer):
        return _partial_sums(x, eps, outer)

    totals: dict[str, dict[str, np.ndarray]] = {}
    stats: dict[str, SiteStats] = {}

    def add(site: str, sums) -> None:
        acc = totals.setdefault(site, {})
        for key, value in jax.device_get(sums).items():
            acc[key] = acc.get(key, 0.0) + np.asarray(value, dtype=np.float64)

    def complete(site: str) -> None:
        stats[site] = finish(SiteStats(n=n, **totals.pop(site)))

    hidden = [embed(embedding, tokens) for tokens in batches]
    i = -1  # not enumerate(): its reused result tuple would keep the previous layer alive while the next is read
    for layer in layers:
        i += 1
        names = {key: f"model.layers.{i}.{key.removesuffix('_in')}" for key in SOWN_SITES}
        outer = tuple(names[key] in outer_sites for key in sorted(SOWN_SITES))
        for b, tokens in enumerate(batches):
            hidden[b], sums = layer_sums(layer, hidden[b], tokens, outer)
            for key, values in sums.items():
                add(names[key], values)
        del layer
        for site in names.values():
            complete(site)
    for x in hidden:
        add("model.norm", final_sums(x, "model.norm" in outer_sites))
    complete("model.norm")
    return stats
