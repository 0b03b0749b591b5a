"""Scanned vs unscanned layers and every remat policy compute the same logits and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bridge import load_checkpoint
from kept_jax.config import REMAT_POLICIES
from kept_jax.models import build_model, stack_layers

TOKENS = jnp.asarray(np.random.default_rng(1).integers(0, 512, size=(2, 16)), dtype=jnp.int32)


def _logits_and_grads(path, scan_layers, remat_policy):
    config, params, _ = load_checkpoint(path, scan_layers=scan_layers, remat_policy=remat_policy)
    model = build_model(config)

    def loss(p):
        logits = model.apply({"params": p}, TOKENS)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1]), TOKENS[:, 1:, None], -1)), logits

    grads, logits = jax.jit(jax.grad(loss, has_aux=True))(params)
    return np.asarray(logits), jax.tree.map(np.asarray, stack_layers(grads))


@pytest.fixture(scope="module")
def baseline(orion_checkpoint):
    return _logits_and_grads(orion_checkpoint[0], scan_layers=True, remat_policy="none")


@pytest.mark.parametrize("remat_policy", REMAT_POLICIES)
@pytest.mark.parametrize("scan_layers", [True, False])
def test_same_logits_and_grads(orion_checkpoint, baseline, scan_layers, remat_policy):
    logits, grads = _logits_and_grads(orion_checkpoint[0], scan_layers, remat_policy)
    base_logits, base_grads = baseline
    assert jax.tree.structure(grads) == jax.tree.structure(base_grads)
    # XLA fuses differently with remat or unrolled layers, which reorders fp32 rounding only:
    # every tensor matches to 1e-5 of its own scale.
    _assert_close(logits, base_logits)
    jax.tree.map(_assert_close, grads, base_grads)


def _assert_close(actual, expected):
    scale = float(np.abs(expected).max())
    assert scale > 0
    np.testing.assert_array_less(np.abs(actual - expected).max(), 1e-5 * scale)
