"""kept_jax's blocked causal attention against JAX's own `jax.nn.dot_product_attention` (an independent
implementation), forward and backward, across several query blocks, a ragged last block, and GQA/MQA."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kept_jax.models import attention as layers


@pytest.mark.parametrize("seq,heads,kv_heads", [(300, 4, 4), (257, 4, 2), (129, 2, 1)])
def test_causal_attention_matches_jax_across_blocks(seq, heads, kv_heads):
    assert seq > layers.QUERY_BLOCK  # several blocks, the last one ragged
    keys = jax.random.split(jax.random.key(seq), 4)
    q = jax.random.normal(keys[0], (2, seq, heads, 16))
    k = jax.random.normal(keys[1], (2, seq, kv_heads, 16))
    v = jax.random.normal(keys[2], (2, seq, kv_heads, 16))
    weights = jax.random.normal(keys[3], (2, seq, heads, 16))

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v) * weights)

    ours = jax.jit(layers.causal_attention)(q, k, v)
    reference = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")
    np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-5)
    grads = jax.jit(jax.grad(loss(layers.causal_attention), argnums=(0, 1, 2)))(q, k, v)
    reference_grads = jax.jit(jax.grad(loss(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True)),
                                       argnums=(0, 1, 2)))(q, k, v)
    for g, r in zip(grads, reference_grads):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4)


def test_long_sequences_use_at_most_max_blocks():
    seq = layers.QUERY_BLOCK * layers.MAX_QUERY_BLOCKS * 2
    q = jnp.zeros((1, seq, 1, 8))
    text = jax.jit(layers.causal_attention).lower(q, q, q).as_text()
    assert text.count("stablehlo.exponential") <= layers.MAX_QUERY_BLOCKS
