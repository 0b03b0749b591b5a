"""Pure-MLX stand-ins for the three Metal kernels cartesia-mlx imports from `cartesia_metal` (Apple only), so that the
runtime runs on Linux's MLX CPU wheels. Written from how `cartesia_mlx.layers.ssd.llamba_ssd.LlambaSSD` calls them
and the shapes of its `get_default_state`; tests/test_mlx_export.py checks them against kept_jax's mixer before the
runtime uses them. `install()` puts them where the runtime's imports look."""

import sys
import types

import mlx.core as mx
from mlx import nn


def conv1d_forward(x, weight, bias, state, swish=False):
    """Causal depthwise convolution of x [b, l, C] after `state` [b, C, K-1] (the K-1 previous inputs, oldest
    first): y[t, c] = sum_k weight[c, k] x[t - (K-1) + k, c] + bias[c], then silu with `swish`. Returns y and the
    last K-1 inputs as the new state."""
    k, length = weight.shape[1], x.shape[1]
    window = mx.concatenate([state.swapaxes(1, 2).astype(x.dtype), x], axis=1)  # [b, K-1+l, C]
    y = sum(window[:, j:j + length] * weight[:, j] for j in range(k)) + bias
    if swish:
        y = nn.silu(y)
    return y, window[:, window.shape[1] - (k - 1):].swapaxes(1, 2)


def conv1d_update(x, weight, bias, state, swish=False):
    """One token x [b, C]: `conv1d_forward` of a sequence of one."""
    y, state = conv1d_forward(x[:, None], weight, bias, state, swish)
    return y[:, 0], state


def ssd_update(x, dt, A, B, C, D, dt_bias, dt_min, dt_max, state, softplus=True, flip_A_sign=False, z=None):
    """One step of the state-space recurrence, per head h of group g = h // (H / G):
    dt = clip(softplus(dt + dt_bias)); S_h = exp(dt A) S_h + dt x_h B_g^T; y_h = S_h C_g + D x_h.
    x [b, H, P], dt [b, H], B and C [b, G, N], state [b, H, P, N]. Llamba passes A=None with flip_A_sign
    (A = -1: the decay is exp(-dt)); Mamba-2 passes its negative A."""
    if z is not None:
        raise NotImplementedError("the gated variant (z) is not needed for Llamba")
    if (A is None) != flip_A_sign:
        raise NotImplementedError("A=None goes with flip_A_sign=True (Llamba), a given A without it (Mamba-2)")
    if dt_bias is not None:
        dt = dt + dt_bias
    if softplus:
        dt = nn.softplus(dt)
    dt = mx.clip(dt, dt_min, dt_max)
    h = x.shape[1]
    log_decay = -dt if A is None else dt * A
    repeat = h // B.shape[1]
    B, C = mx.repeat(B, repeat, axis=1), mx.repeat(C, repeat, axis=1)  # [b, H, N]
    state = (state * mx.exp(log_decay)[..., None, None]
             + (dt[..., None] * x)[..., None] * B[:, :, None, :])
    y = (state @ C[..., None])[..., 0] + D[:, None] * x
    return y.astype(x.dtype), state


def install() -> None:
    module = types.ModuleType("cartesia_metal")
    module.conv1d_forward, module.conv1d_update, module.ssd_update = conv1d_forward, conv1d_update, ssd_update
    sys.modules["cartesia_metal"] = module
