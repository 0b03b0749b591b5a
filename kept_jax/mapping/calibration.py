"""Calibration statistics of every norm site's input, from the teacher's own activations on text.

For a norm input x (one token, hidden size D): u = x / sqrt(mean(x^2) + eps) is what an RMSNorm with unit gain
outputs, and a = (x - mean(x)) / sqrt(var(x) + eps) is what a LayerNorm with unit gain and no bias outputs. After
recentering the residual writers the stream is x - mean(x), whose RMSNorm output is exactly a.

Statistics are sums, never stored activations: each batch's partial sums are computed on the device in fp32 and
added into float64 accumulators on the host.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np

from kept_jax.models.llama import LlamaForCausalLM


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
    model: LlamaForCausalLM, params: dict, batches: Iterable[np.ndarray], outer_sites: Iterable[str] = ()
) -> dict[str, SiteStats]:
    """Norm-site statistics keyed by HF norm name. `outer_sites` get the full [D, D] second moment of a."""
    outer_sites = frozenset(outer_sites)
    eps = model.config.rms_norm_eps

    @jax.jit
    def batch_sums(p, tokens):
        inputs, _ = model.apply({"params": p}, tokens, method="norm_inputs", mutable="intermediates")
        return {site: _partial_sums(x, eps, site in outer_sites) for site, x in inputs.items()}

    totals: dict[str, dict[str, np.ndarray]] = {}
    n = 0
    for tokens in batches:
        sums = jax.device_get(batch_sums(params, jnp.asarray(tokens)))
        n += int(np.prod(tokens.shape))
        for site, values in sums.items():
            acc = totals.setdefault(site, {})
            for key, value in values.items():
                acc[key] = acc.get(key, 0.0) + np.asarray(value, dtype=np.float64)
    if n == 0:
        raise ValueError("calibration needs at least one batch of tokens")
    return {site: SiteStats(n=float(n), **values) for site, values in totals.items()}
