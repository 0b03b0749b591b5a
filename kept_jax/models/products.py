"""Every matrix product of the models, under one precision policy: operands in the compute dtype, accumulation and
results in fp32, in the forward and in the backward pass.

With compute dtype bfloat16 a CPU with AMX (or any GPU) multiplies bf16 operands at several times its fp32 speed,
and fp32 accumulation keeps the sums as exact as fp32 ones. Plain autodiff does not keep that policy: the cotangent
of an fp32 result is fp32, so the transposed products of `jax.grad` mix fp32 with bf16 and run in fp32. Here the
products (`linear`, `attend` for a head tied to its embedding, `einsum`) are written with a `custom_vjp` that casts
the cotangent to the compute dtype first.

XLA:CPU's fast bf16 path (a YNNPACK fusion) takes row-major operands contracted on the lhs's last dimension; it
converts any other bf16 product to fp32, or, when the layout is decided after that choice, fails at run time
(docs/benchmarks.md, "bf16 on the CPU's matrix units"). The weight gradient x^T g contracts both operands on their
first dimension, so `linear` lays x^T out in memory (`laid_out_transpose`): a copy of x, and the product runs 3.5x
faster than in fp32 on this machine's AMX (814 against 231 GFLOP/s at [512, 2048] x [2048, 1408]). `contract` puts
every einsum in that form.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
F32 = jnp.float32


def laid_out_transpose(a: Array) -> Array:
    """`a` with its last two axes swapped, materialized row-major: XLA folds a plain transpose into the product that
    reads it (which then takes XLA:CPU's slow path); a transpose of a view with one more axis is a copy it keeps."""
    *lead, n, m = a.shape
    split = next((s for s in (8, 2) if n % s == 0 and n > s), None)
    if split is None:
        return jnp.swapaxes(a, -1, -2)
    k = len(lead)
    view = a.reshape(*lead, n // split, split, m)
    return view.transpose(*range(k), k + 2, k, k + 1).reshape(*lead, m, n)


def dtype_marks(*arrays: Array) -> tuple[Array, ...]:
    """Each array's dtype as a zero-size array: a custom VJP's residuals must be arrays, and its backward casts each
    gradient back to its input's dtype."""
    return tuple(jnp.zeros((0,), a.dtype) for a in arrays)


def _dot(a: Array, b: Array, contract_b: int = 0) -> Array:
    """a [n, k] times b [k, m] (contract_b 0) or b [m, k] transposed (contract_b 1), accumulated in fp32."""
    return jax.lax.dot_general(a, b, (((1,), (contract_b,)), ((), ())), preferred_element_type=F32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def linear(x: Array, w: Array, dtype: jnp.dtype) -> Array:
    """x [..., k] @ w [k, m] -> fp32 [..., m], with both operands cast to `dtype`."""
    return _linear_fwd(x, w, dtype)[0]


def _linear_fwd(x, w, dtype):
    x2, wc = x.reshape(-1, x.shape[-1]).astype(dtype), w.astype(dtype)
    y = _dot(x2, wc).reshape(*x.shape[:-1], w.shape[-1])
    # The residuals: x^T laid out while x is at hand (the backward's copy would read it back from a layer scan's
    # stacked residuals) and w, both in the compute dtype (half of fp32's memory for bf16), and the input dtypes.
    return y, (laid_out_transpose(x2), wc, *dtype_marks(x, w))


def _linear_bwd(dtype, residuals, g):
    xt, wc, x_type, w_type = residuals
    g2 = g.reshape(-1, g.shape[-1]).astype(dtype)
    dx = _dot(g2, wc, contract_b=1)  # g w^T: w read row-major, contracted on its last dimension
    dw = _dot(xt, g2)  # x^T g
    return dx.reshape(*g.shape[:-1], xt.shape[0]).astype(x_type.dtype), dw.astype(w_type.dtype)


linear.defvjp(_linear_fwd, _linear_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def attend(x: Array, table: Array, dtype: jnp.dtype) -> Array:
    """x [..., k] @ table [m, k]^T -> fp32 [..., m], both cast to `dtype`: a head tied to an embedding table, read
    where it lies (each row contracted on its last dimension, a form XLA:CPU's bf16 path takes), never transposed:
    a transposed table would be a copy per call (a decode step), or a layout the bf16 path refuses."""
    return _attend_fwd(x, table, dtype)[0]


def _attend_fwd(x, table, dtype):
    x2, tc = x.reshape(-1, x.shape[-1]).astype(dtype), table.astype(dtype)
    y = _dot(x2, tc, contract_b=1).reshape(*x.shape[:-1], table.shape[0])
    return y, (x2, tc, *dtype_marks(x, table))


def _attend_bwd(dtype, residuals, g):
    x2, tc, x_type, t_type = residuals
    g2 = g.reshape(-1, g.shape[-1]).astype(dtype)
    dx = _dot(g2, tc)  # g table
    dt = _dot(laid_out_transpose(g2), x2)  # g^T x
    return dx.reshape(*g.shape[:-1], x2.shape[1]).astype(x_type.dtype), dt.astype(t_type.dtype)


attend.defvjp(_attend_fwd, _attend_bwd)


def contract(spec: str, a: Array, b: Array) -> Array:
    """`jnp.einsum(spec, a, b)` accumulated in fp32, as one batched product in the form XLA:CPU's fast path takes:
    a laid out [batch, m, k] and b [batch, k, n], both row-major. (jnp.einsum leaves the layouts to XLA, which may
    pick a transposed one that its bf16 path refuses, and then runs the product in fp32 or fails.)"""
    (sa, sb), out = spec.split("->")[0].split(","), spec.split("->")[1]
    batch = [i for i in out if i in sa and i in sb]
    summed = [i for i in sa if i in sb and i not in out]
    a_free, b_free = [i for i in sa if i not in sb], [i for i in sb if i not in sa]
    size = dict(zip(sa, a.shape)) | dict(zip(sb, b.shape))
    n_batch, m, k, n = (int(np.prod([size[i] for i in idx])) for idx in (batch, a_free, summed, b_free))
    at = a.transpose([sa.index(i) for i in batch + a_free + summed]).reshape(n_batch, m, k)
    bt = b.transpose([sb.index(i) for i in batch + summed + b_free]).reshape(n_batch, k, n)
    y = jax.lax.dot_general(at, bt, (((2,), (1,)), ((0,), (0,))), preferred_element_type=F32)
    y = y.reshape([size[i] for i in batch + a_free + b_free])
    return y.transpose([(batch + a_free + b_free).index(i) for i in out])


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 3))
def einsum(spec: str, a: Array, b: Array, dtype: jnp.dtype) -> Array:
    """`jnp.einsum(spec, a, b)` -> fp32, with both operands cast to `dtype`, and so are the gradients' products.
    Every index of an operand must appear in another term (none summed within one operand: its gradient would be a
    broadcast, which these products do not write)."""
    return _einsum_fwd(spec, a, b, dtype)[0]


def _einsum_fwd(spec, a, b, dtype):
    ac, bc = a.astype(dtype), b.astype(dtype)
    return contract(spec, ac, bc), (ac, bc, *dtype_marks(a, b))


def _einsum_bwd(spec, dtype, residuals, g):
    ac, bc, a_type, b_type = residuals
    inputs, out = spec.split("->")
    sa, sb = inputs.split(",")
    gc = g.astype(dtype)
    da = contract(f"{out},{sb}->{sa}", gc, bc)
    db = contract(f"{sa},{out}->{sb}", ac, gc)
    return da.astype(a_type.dtype), db.astype(b_type.dtype)


einsum.defvjp(_einsum_fwd, _einsum_bwd)

