"""Parameter-tree helpers: initialisation, scanned <-> unscanned layer layouts, the output head."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from kept_jax.config import ModelConfig

Params = dict[str, Any]


def init_params(config: ModelConfig, rng: jax.Array, seq_len: int = 8) -> Params:
    """Random parameters (plain arrays, logical-axis boxes removed) in the layout `config.scan_layers` selects."""
    from kept_jax.models.transformer import CausalLM

    variables = CausalLM(config).init(rng, jnp.zeros((1, seq_len), jnp.int32))
    return nn.unbox(variables["params"])


def abstract_params(config: ModelConfig) -> Params:
    """Shapes and dtypes of the parameters, without allocating them."""
    return jax.eval_shape(lambda: init_params(config, jax.random.key(0), seq_len=1))


def stack_layers(params: Params) -> Params:
    """`model/layers/<i>/...` (unscanned) -> `model/layers/...` with a leading layer axis (scanned)."""
    layers = params["model"]["layers"]
    if not all(k.isdigit() for k in layers):
        return params  # already stacked
    ordered = [layers[str(i)] for i in range(len(layers))]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *ordered)
    return {**params, "model": {**params["model"], "layers": stacked}}


def unstack_layers(params: Params) -> Params:
    """Inverse of `stack_layers`."""
    layers = params["model"]["layers"]
    if all(k.isdigit() for k in layers):
        return params  # already unstacked
    num_layers = jax.tree.leaves(layers)[0].shape[0]
    unstacked = {str(i): jax.tree.map(lambda x, i=i: x[i], layers) for i in range(num_layers)}
    return {**params, "model": {**params["model"], "layers": unstacked}}


def head_kernel(params: Params, config: ModelConfig) -> jax.Array:
    """The output head as a [hidden, vocab] matrix, tied or not."""
    if config.tie_word_embeddings:
        return params["model"]["embed_tokens"]["embedding"].T
    return params["lm_head"]["kernel"]
