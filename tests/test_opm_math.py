"""The OPM formulas against direct solves on samples: per-channel regression and full least squares."""

import jax.numpy as jnp
import numpy as np
import pytest

from kept_jax.mapping.calibration import SiteStats, _partial_sums
from kept_jax.mapping.opm import absorb, absorb_direction, absorb_error, gain_error, lsq_gain

EPS = 1e-5
D, N = 16, 4096


def _samples(seed=0):
    """Residual-stream-like inputs: per-channel means (so mean(x) != 0) and a correlated spread."""
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(D, D)) / np.sqrt(D)
    return (rng.normal(size=(N, D)) @ mix + rng.normal(size=D) * 1.5).astype(np.float32)


def _stats(x, outer=True):
    sums = {k: np.asarray(v, np.float64) for k, v in _partial_sums(jnp.asarray(x), EPS, outer).items()}
    return SiteStats(n=float(len(x)), **sums)


def _u_a(x):
    x = x.astype(np.float64)
    u = x / np.sqrt((x**2).mean(-1, keepdims=True) + EPS)
    c = x - x.mean(-1, keepdims=True)
    return u, c / np.sqrt((c**2).mean(-1, keepdims=True) + EPS)


@pytest.mark.parametrize("centered", [False, True])
def test_lsq_gain_is_the_per_channel_regression(centered):
    rng = np.random.default_rng(1)
    x = _samples()
    gamma, beta = 1 + 0.3 * rng.normal(size=D), 0.5 * rng.normal(size=D)
    u, a = _u_a(x)
    if centered:
        u = a  # the recentered stream's RMSNorm sees a
    target = gamma * a + beta
    direct = np.array([np.linalg.lstsq(u[:, j : j + 1], target[:, j], rcond=None)[0][0] for j in range(D)])
    gain = lsq_gain(gamma, beta, _stats(x), centered)
    np.testing.assert_allclose(gain, direct, rtol=1e-4)
    assert not np.allclose(gain, gamma, rtol=1e-2)  # the fixture makes beta matter
    # The reported error is the direct relative residual.
    residual = ((target - gain * u) ** 2).sum() / (target**2).sum()
    assert gain_error(gamma, beta, gain, _stats(x), centered) == pytest.approx(residual, rel=1e-3)


def test_rank1_edit_is_the_least_squares_map():
    rng = np.random.default_rng(2)
    x = _samples()
    _, a = _u_a(x)
    w = rng.normal(size=(8, D)) / np.sqrt(D)
    gamma, beta = 1 + 0.3 * rng.normal(size=D), 0.5 * rng.normal(size=D)
    stats = _stats(x)
    k = absorb_direction(stats, ridge=1e-9)
    edited = absorb(w, gamma, beta, k)
    # Direct: the linear map K minimising sum_t ||W(gamma*a_t + beta) - K a_t||^2.
    targets = (gamma * a + beta) @ w.T
    k_direct = np.linalg.lstsq(a, targets, rcond=None)[0].T
    # a is zero-mean over channels, so K is defined up to its action on the ones vector: compare predictions.
    fresh = _u_a(_samples(seed=7))[1]
    np.testing.assert_allclose(fresh @ edited.T, fresh @ k_direct.T, atol=1e-4 * np.abs(fresh @ k_direct.T).max())
    # The reported error is the direct unabsorbed fraction of W beta.
    wb = w @ beta
    unabsorbed = ((wb - (a @ k)[:, None] * wb) ** 2).sum(1).mean() / (wb @ wb)
    assert absorb_error(stats, k) == pytest.approx(unabsorbed, rel=1e-3)
    assert 0 < absorb_error(stats, k) < 1


def test_exact_gain_when_beta_is_zero_and_the_stream_is_centered():
    x = _samples()
    x = x - x.mean(-1, keepdims=True)
    gamma = np.linspace(0.5, 1.5, D)
    gain = lsq_gain(gamma, np.zeros(D), _stats(x), centered=True)
    np.testing.assert_allclose(gain, gamma, rtol=1e-6)
    assert gain_error(gamma, np.zeros(D), gain, _stats(x), centered=True) < 1e-12
