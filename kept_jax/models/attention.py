"""Causal attention for training and prefill, in query blocks, with its backward pass written out (a `custom_vjp`).

    out = softmax(scale q k^T, causal) v

Heads are laid out head-major once, [b, kv_heads, T, group, d], so that a block of queries is contiguous and every
product is a batched matmul over (b, kv_heads). Each block of queries attends only to the keys up to its own end,
which skips about half of the T x T work. The products take operands in the compute dtype and accumulate in fp32
(kept_jax.models.products); logits and softmax are fp32.

The backward is the standard one (as in FlashAttention) from the probabilities the forward kept, in the compute
dtype: dV = P^T dO, dP = dO V^T, dS = P (dP - rowsum(dO o O)), dQ = scale dS K, dK = scale dS^T Q. Autodiff of the
forward would keep the fp32 logits as well and run the transposed products in fp32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from kept_jax.models.products import dtype_marks, laid_out_transpose

Array = jax.Array
F32 = jnp.float32

QUERY_BLOCK = 128  # the smallest query block
MAX_QUERY_BLOCKS = 16  # and at most this many blocks, so long sequences do not unroll into a huge graph

_BATCHED = ((0, 1), (0, 1))  # (b, kv_heads) are the batch axes of every product


def _bmm(a: Array, b: Array, contract_b: int) -> Array:
    """[B, K, r, c] x [B, K, c, m] (contract_b 2) or [B, K, m, c] (contract_b 3) -> fp32 [B, K, r, m]."""
    return jax.lax.dot_general(a, b, (((3,), (contract_b,)), _BATCHED), preferred_element_type=F32)


def query_blocks(seq: int) -> list[tuple[int, int]]:
    """[start, end) of each block of queries."""
    block = max(QUERY_BLOCK, -(-seq // MAX_QUERY_BLOCKS))
    return [(start, min(start + block, seq)) for start in range(0, seq, block)]


def _visible(start: int, end: int, group: int) -> np.ndarray:
    """[rows, end] mask of a block: row r is query start + r // group, which sees keys 0 .. start + r // group."""
    queries = np.repeat(np.arange(start, end), group)
    return np.arange(end)[None, :] <= queries[:, None]


def _head_major(q: Array, k: Array, v: Array, dtype) -> tuple[Array, Array, Array]:
    """q [b, K, T + 1, G, d], k and v [b, K, T + 1, d] in `dtype`, with a zero at position T: every block then
    reads a slice of them. A product reading the whole transposed array would get the transpose folded into its
    dimensions, a form XLA:CPU runs in fp32 (padded before the cast: a bf16 pad is itself converted to fp32)."""
    batch, seq, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    q = q.reshape(batch, seq, kv_heads, heads // kv_heads, head_dim)
    return tuple(jnp.swapaxes(jnp.pad(x, [(0, 0), (0, 1)] + [(0, 0)] * (x.ndim - 2)).astype(dtype), 1, 2)
                 for x in (q, k, v))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _attention(q: Array, k: Array, v: Array, scale: float, dtype) -> Array:
    return _attention_fwd(q, k, v, scale, dtype)[0]


def _attention_fwd(q, k, v, scale, dtype):
    batch, seq, heads, head_dim = q.shape
    qh, kh, vh = _head_major(q, k, v, dtype)  # [b, K, T + 1, G, d], [b, K, T + 1, d], [b, K, T + 1, d]
    kv_heads, group = kh.shape[1], heads // kh.shape[1]
    outputs, probs = [], []
    for start, end in query_blocks(seq):
        qb = qh[:, :, start:end].reshape(batch, kv_heads, (end - start) * group, head_dim)
        logits = _bmm(qb, kh[:, :, :end], 3) * scale
        p = jax.nn.softmax(jnp.where(_visible(start, end, group), logits, jnp.finfo(F32).min), axis=-1).astype(dtype)
        outputs.append(_bmm(p, vh[:, :, :end], 2))  # [b, K, rows, d]
        probs.append(p)
    o = jnp.concatenate(outputs, axis=2)  # [b, K, T * G, d]
    out = o.reshape(batch, kv_heads, seq, group, head_dim).transpose(0, 2, 1, 3, 4).reshape(q.shape)
    return out.astype(q.dtype), (qh, kh, vh, o, probs, dtype_marks(q, k, v))


def _attention_bwd(scale, dtype, residuals, g):
    qh, kh, vh, o, probs, (q_type, k_type, v_type) = residuals
    batch, kv_heads, seq, group, head_dim = qh.shape
    seq -= 1  # the zero pad
    rows = seq * group
    do = g.reshape(batch, seq, kv_heads, group, head_dim).transpose(0, 2, 1, 3, 4).reshape(batch, kv_heads, rows,
                                                                                           head_dim)
    row_dot = jnp.sum(do.astype(F32) * o, axis=-1, keepdims=True)  # rowsum(dO o O) = rowsum(P o dP)
    do = do.astype(dtype)
    dq, dk, dv = [], jnp.zeros((batch, kv_heads, seq, head_dim), F32), jnp.zeros((batch, kv_heads, seq, head_dim), F32)
    for (start, end), p in zip(query_blocks(seq), probs):
        r0, r1 = start * group, end * group
        qb = qh[:, :, start:end].reshape(batch, kv_heads, r1 - r0, head_dim)
        dob = do[:, :, r0:r1]
        dp = _bmm(dob, vh[:, :, :end], 3)
        ds = (p.astype(F32) * (dp - row_dot[:, :, r0:r1]) * scale).astype(dtype)
        dq.append(_bmm(ds, kh[:, :, :end], 2))
        # dK^T = Q^T dS and dV^T = dO^T P: row-major products with the small operand laid out transposed; their
        # [d, keys] results are turned back here, so that the final [b, K, T, d] -> [b, T, K, d] moves whole rows of d
        # (turned back at the end instead, the strided copy fused into RoPE's backward: an 8% slower bf16 step).
        pad = ((0, 0), (0, 0), (0, seq - end), (0, 0))
        dk = dk + jnp.pad(laid_out_transpose(_bmm(laid_out_transpose(qb), ds, 2)), pad)
        dv = dv + jnp.pad(laid_out_transpose(_bmm(laid_out_transpose(dob), p, 2)), pad)
    dq = jnp.concatenate(dq, axis=2).reshape(batch, kv_heads, seq, group, head_dim).transpose(0, 2, 1, 3, 4)
    dk, dv = (x.transpose(0, 2, 1, 3) for x in (dk, dv))  # [b, K, T, d] -> [b, T, K, d]
    return (dq.reshape(batch, seq, kv_heads * group, head_dim).astype(q_type.dtype), dk.astype(k_type.dtype),
            dv.astype(v_type.dtype))


_attention.defvjp(_attention_fwd, _attention_bwd)


def causal_attention(q: Array, k: Array, v: Array, scale: float | None = None, dtype=None) -> Array:
    """softmax(scale q k^T, causal) v in query blocks; `scale` defaults to 1 / sqrt(head_dim), the products' operand
    dtype `dtype` to q's.

    q: [batch, seq, heads, head_dim]; k, v: [batch, seq, kv_heads, head_dim] (heads a multiple of kv_heads).
    `jax.nn.dot_product_attention(implementation="xla")` computes the full square and is about 2.5x slower forward +
    backward on a CPU (benchmarks/xkd_step.py).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return _attention(q, k, v, scale, jnp.dtype(dtype or q.dtype))
