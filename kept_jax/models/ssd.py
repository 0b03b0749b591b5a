"""The sequence mixing of Discrete-Mamba-2, as pure functions, in three forms that compute the same thing.

Per head h (H heads of dim P, in G groups that share B and C; N = state size) and token t:

    S_t = a_t S_{t-1} + x_t B_t^T        a_t = exp(log_a_t) in (0, 1]; S is [P, N]
    y_t = S_t C_t

- `ssd_recurrent`: the recurrence itself, one token at a time (`ssd_step` is the generation step);
- `mixing_matrix`: y = M x with M[t, s] = (C_t . B_s) prod_{s<r<=t} a_r, the per-head L x L matrix (MOHAWK's
  stage 1 aligns it with attention);
- `ssd_chunked`: the state-space-duality algorithm (Dao & Gu 2024): the matrix form inside chunks of Q tokens and
  the recurrence between chunks, O(T Q) instead of O(T^2). Any T: the tail is padded with a = 1, x = B = C = 0,
  which changes neither the outputs nor the final state.

Decays are handled as log-decays and summed over segments, never as products or differences of cumulative sums
(a cumulative sum of large log-decays loses the small ones it is later differenced against): `segment_sums` adds
each segment directly, so a = sigmoid(-l) stays exact for l = +-200 and gives 0, never NaN. Heads are grouped as
in mamba_ssm: head h reads group h // (H / G). Decays, states and accumulation are fp32; the products take their
operands in `dtype`, the compute dtype (kept_jax.models.products), except the recurrence of states between chunks,
which stays fp32 throughout (its dots run under the name scope `STATE_SCOPE`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import kept_jax.models.products as products

Array = jax.Array
F32 = jnp.float32
STATE_SCOPE = "fp32_state_recurrence"  # the products kept in fp32 by the precision policy


def segment_sums(log_a: Array) -> Array:
    """[..., T] -> [..., T, T]: out[t, s] = sum_{s<r<=t} log_a[r] for s <= t (0 on the diagonal), -inf above it.

    Each entry is its own masked cumulative sum, so exp(out) is exact where a difference of prefix sums would not be.
    """
    t = log_a.shape[-1]
    repeated = jnp.broadcast_to(log_a[..., :, None], (*log_a.shape, t))  # [..., r, s] = log_a[r]
    below = np.tril(np.ones((t, t), dtype=bool), -1)  # r > s
    sums = jnp.cumsum(jnp.where(below, repeated, 0.0), axis=-2)
    return jnp.where(np.tril(np.ones((t, t), dtype=bool)), sums, -jnp.inf)


def _grouped(x: Array, log_a: Array, groups: int) -> tuple[Array, Array]:
    """x [b, T, H, P] -> [b, T, G, J, P] and log_a [b, T, H] -> [b, T, G, J], with H = G x J."""
    b, t, h, p = x.shape
    return x.reshape(b, t, groups, h // groups, p), log_a.reshape(b, t, groups, h // groups)


def mixing_matrix(B: Array, C: Array, log_a: Array, heads: int, dtype=F32) -> Array:
    """M [b, H, T, T] with M[t, s] = (C_t . B_s) exp(sum_{s<r<=t} log_a_r) for s <= t, 0 above the diagonal.

    B, C: [b, T, G, N]; log_a: [b, T, H]. The skip term D is not included.
    """
    b, t, g, _ = B.shape
    cb = products.einsum("btgn,bsgn->bgts", C, B, dtype)
    decay = jnp.exp(segment_sums(log_a.astype(jnp.float32).reshape(b, t, g, heads // g).transpose(0, 2, 3, 1)))
    return (cb[:, :, None] * decay).reshape(b, heads, t, t)


def ssd_matrix(x: Array, B: Array, C: Array, log_a: Array, dtype=F32) -> Array:
    """y [b, T, H, P] = M x, through the materialized `mixing_matrix`."""
    m = mixing_matrix(B, C, log_a, x.shape[2], dtype)
    return products.einsum("bhts,bshp->bthp", m, x, dtype)


def ssd_step(state: Array, x: Array, B: Array, C: Array, log_a: Array) -> tuple[Array, Array]:
    """One token: state [b, H, P, N], x [b, H, P], B and C [b, G, N], log_a [b, H] -> (y [b, H, P], new state)."""
    b, h, p, n = state.shape
    g = B.shape[1]
    state = state.reshape(b, g, h // g, p, n)
    decay = jnp.exp(log_a.astype(jnp.float32)).reshape(b, g, h // g, 1, 1)
    x = x.astype(jnp.float32).reshape(b, g, h // g, p)
    state = decay * state + x[..., None] * B.astype(jnp.float32)[:, :, None, None, :]
    y = jnp.einsum("bgjpn,bgn->bgjp", state, C.astype(jnp.float32))
    return y.reshape(b, h, p), state.reshape(b, h, p, n)


def ssd_recurrent(x: Array, B: Array, C: Array, log_a: Array,
                  initial_state: Array | None = None) -> tuple[Array, Array]:
    """y [b, T, H, P] and the final state [b, H, P, N], by `ssd_step` over the tokens (a `lax.scan`)."""
    b, _, h, p = x.shape
    state = _initial_state(initial_state, b, h, p, B.shape[-1])

    def step(state, inputs):
        y, state = ssd_step(state, *inputs)
        return state, y

    inputs = tuple(jnp.moveaxis(v, 1, 0) for v in (x, B, C, log_a))
    final, ys = jax.lax.scan(step, state, inputs)
    return jnp.moveaxis(ys, 0, 1), final


def ssd_chunked(x: Array, B: Array, C: Array, log_a: Array, chunk_size: int,
                initial_state: Array | None = None, dtype=F32) -> tuple[Array, Array]:
    """y [b, T, H, P] and the final state [b, H, P, N] by chunks of `chunk_size` tokens (any T)."""
    b, t, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    q = min(chunk_size, t)
    pad = -t % q
    x, B, C, log_a = (jnp.pad(v.astype(jnp.float32), [(0, 0), (0, pad)] + [(0, 0)] * (v.ndim - 2))
                      for v in (x, B, C, log_a))
    nc = (t + pad) // q
    x, log_a = _grouped(x, log_a, g)
    x = x.reshape(b, nc, q, g, h // g, p)
    B, C = B.reshape(b, nc, q, g, n), C.reshape(b, nc, q, g, n)
    log_a = log_a.reshape(b, nc, q, g, h // g).transpose(0, 3, 4, 1, 2)  # [b, G, J, nc, Q]

    # Within each chunk: the matrix form, (C B^T o decays) x.
    decay = jnp.exp(segment_sums(log_a))  # [b, G, J, nc, Q, Q]
    cb = products.einsum("bclgn,bcsgn->bgcls", C, B, dtype)
    y = products.einsum("bgjcls,bcsgjp->bclgjp", cb[:, :, None] * decay, x, dtype)
    # Each chunk's own contribution to the state at its end (its last row of decays: suffix sums, exact).
    to_end = jnp.moveaxis(decay[..., -1, :], (3, 4), (1, 2))[..., None]  # [b, nc, Q, G, J, 1]
    chunk_states = products.einsum("bcsgn,bcsgjp->bcgjpn", B, to_end * x, dtype)
    # Between chunks: the recurrence over chunk totals, as a small [nc + 1, nc + 1] matrix of segment sums, in fp32.
    totals = jnp.pad(jnp.sum(log_a, axis=-1), [(0, 0)] * 3 + [(1, 0)])  # [b, G, J, nc + 1]
    start = _initial_state(initial_state, b, h, p, n).reshape(b, 1, g, h // g, p, n)
    with jax.named_scope(STATE_SCOPE):
        states = products.contract("bgjzc,bcgjpn->bzgjpn", jnp.exp(segment_sums(totals)),
                                   jnp.concatenate([start, chunk_states], axis=1))
    entering, final = states[:, :-1], states[:, -1]
    # The state entering each chunk, decayed to each of its tokens (prefix sums from the chunk start, exact).
    from_start = jnp.moveaxis(jnp.exp(jnp.cumsum(log_a, axis=-1)), (3, 4), (1, 2))[..., None]  # [b, nc, Q, G, J, 1]
    y = y + products.einsum("bclgn,bcgjpn->bclgjp", C, entering, dtype) * from_start
    return y.reshape(b, nc * q, h, p)[:, :t], final.reshape(b, h, p, n)


FORMS = ("chunked", "matrix", "recurrent")  # the forms `mix` runs, a model's runtime `mixer_form`


def mix(form: str, x: Array, B: Array, C: Array, log_a: Array, chunk_size: int, dtype=F32) -> Array:
    """y [b, T, H, P] of a whole sequence from a zero state, in one of the three `FORMS` (products' operands in
    `dtype`; the recurrent form is fp32 throughout)."""
    if form == "matrix":
        return ssd_matrix(x, B, C, log_a, dtype)
    if form == "recurrent":
        return ssd_recurrent(x, B, C, log_a)[0]
    return ssd_chunked(x, B, C, log_a, chunk_size, dtype=dtype)[0]


def chunked_flops_per_token(heads: int, groups: int, head_dim: int, state: int, chunk_size: int, seq_len: int) -> float:
    """Forward FLOPs per token of `ssd_chunked`, with Q = min(chunk_size, T) and n = ceil(T / Q) chunks: C B^T in
    its chunk 2 G Q N, the intra-chunk product 2 H Q P, the chunk's state and the entering state's output 4 H P N, the
    recurrence between chunks 2 H P N (n + 1)^2 / T. Elementwise work (decays) is not counted."""
    h, g, p, n = heads, groups, head_dim, state
    q = min(chunk_size, seq_len)
    chunks = -(-seq_len // q)
    return 2 * g * q * n + 2 * h * q * p + 4 * h * p * n + 2 * h * p * n * (chunks + 1) ** 2 / seq_len


def _initial_state(state: Array | None, b: int, h: int, p: int, n: int) -> Array:
    return jnp.zeros((b, h, p, n), jnp.float32) if state is None else state.astype(jnp.float32)


def causal_conv(x: Array, kernel: Array, bias: Array | None, history: Array | None = None,
                lengths: Array | None = None) -> tuple[Array, Array]:
    """Depthwise causal convolution: out[t, c] = sum_k kernel[k, 0, c] x[t - (K-1) + k, c] (+ bias[c]).

    x: [b, T, C]; kernel: [K, 1, C] (HF's Conv1d weight [C, 1, K] transposed; k = K-1 is the current token);
    history: the K-1 inputs before x ([b, K-1, C], zeros at the start of a sequence). Returns the output and the
    new history: the K-1 inputs before position `lengths[i]` of row i (default T, the last K-1), so that a
    right-padded batch keeps each row's own window and T = 1 is the generation step.
    """
    k = kernel.shape[0]
    if history is None:
        history = jnp.zeros((x.shape[0], k - 1, x.shape[2]), x.dtype)
    window = jnp.concatenate([history.astype(x.dtype), x], axis=1)
    t = x.shape[1]
    out = sum(window[:, i : i + t] * kernel[i, 0].astype(x.dtype) for i in range(k))
    if bias is not None:
        out = out + bias.astype(x.dtype)
    if lengths is None:
        return out, window[:, t:]
    # Window index j holds position j - (K-1): the inputs at positions lengths - (K-1) ... lengths - 1.
    rows = lengths[:, None] + jnp.arange(k - 1)[None, :]
    return out, jnp.take_along_axis(window, rows[..., None], axis=1)
