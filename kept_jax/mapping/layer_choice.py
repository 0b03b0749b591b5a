"""Which layers of a Llama a hybrid keeps as attention, measured: `--attention-layers auto:N`. docs/hybrid.md.

The rule (leave one out, as Apriel-H1 chooses the layers it replaces): for each layer l, the teacher with only layer
l's attention replaced by its initialized Mamba-2 mixer is scored against the teacher on held-out text; the N layers
whose replacement costs the most KL keep their attention. One compiled program serves every layer: the teacher's
layers run in a `lax.scan` and the replaced one is picked by `lax.cond` from a runtime index, so the L measurements
cost L forward passes and a single compilation.
"""

from __future__ import annotations

from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np

from kept_jax.metrics import score
from kept_jax.models import build_model, layer_params


def leave_one_out_kl(teacher_config, teacher_params, mamba_config, mamba_params,
                     batches: Iterable[np.ndarray]) -> np.ndarray:
    """[L]: KL(teacher || the teacher with only layer l replaced by `mamba_params`' layer l), nats per scored token,
    for each layer l. `mamba_config` is the all-Mamba-2 hybrid of the teacher's shape (its layers alike)."""
    teacher = build_model(teacher_config)
    t_block = teacher_config.block_class(teacher_config)
    m_block = mamba_config.block_class(mamba_config)
    t_layers, m_layers = layer_params(teacher_params), layer_params(mamba_params)
    layers = teacher_config.num_hidden_layers

    @jax.jit
    def sums(replaced, tokens, teacher_logits):
        args = teacher_config.block_args(tokens)

        def body(x, xs):
            index, t_layer, m_layer = xs
            x = jax.lax.cond(index == replaced, lambda: m_block.apply({"params": m_layer}, x, *args)[0],
                             lambda: t_block.apply({"params": t_layer}, x, *args)[0])
            return x, None

        x = teacher.apply({"params": teacher_params}, tokens, method="embed")
        x, _ = jax.lax.scan(body, x, (jnp.arange(layers), t_layers, m_layers))
        logits = teacher.apply({"params": teacher_params}, x, method="head")
        out = score(teacher_logits, logits, tokens)
        return out["kl"], out["tokens"]

    totals = np.zeros((layers, 2))
    forward = jax.jit(lambda tokens: teacher.apply({"params": teacher_params}, tokens))
    for tokens in batches:
        reference = forward(tokens)
        for layer in range(layers):
            totals[layer] += np.asarray(sums(layer, tokens, reference), np.float64)
    return totals[:, 0] / totals[:, 1]


def most_costly(costs: np.ndarray, n: int) -> tuple[int, ...]:
    """The `n` layers whose replacement costs the most, in layer order (ties: the earlier layer)."""
    order = sorted(range(len(costs)), key=lambda i: (-costs[i], i))
    return tuple(sorted(order[:n]))
