"""The suite's persistent compilation cache (tests/conftest.py) is on and hits: a program compiled again from a
new closure, as every new Job's step is, comes from the disk instead of XLA."""

import os

import jax
import jax.monitoring
import jax.numpy as jnp
import pytest


@pytest.mark.skipif(os.environ.get("KEPT_JAX_TEST_CACHE") == "0", reason="KEPT_JAX_TEST_CACHE=0 turns the cache off")
def test_a_recompiled_program_hits_the_cache():
    assert jax.config.jax_compilation_cache_dir == os.environ["JAX_COMPILATION_CACHE_DIR"]
    events = []
    jax.monitoring.register_event_listener(lambda name, **kwargs: events.append(name))

    def program():
        def f(x):  # a new function object each time: jit's in-memory cache cannot match it
            for _ in range(40):
                x = jnp.tanh(x @ x.T) + 0.123
            return x
        return f

    x = jnp.ones((96, 96))
    threshold = jax.config.jax_persistent_cache_min_compile_time_secs
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)  # however fast this machine compiles it
    try:
        jax.jit(program())(x).block_until_ready()
        before = events.count("/jax/compilation_cache/cache_hits")
        jax.jit(program())(x).block_until_ready()
    finally:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", threshold)
    assert events.count("/jax/compilation_cache/cache_hits") == before + 1
