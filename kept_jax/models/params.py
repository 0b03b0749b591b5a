"""Parameter-tree helpers for any architecture: initialisation, scanned <-> unscanned layer layouts, the output head."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from kept_jax.config import ModelConfig
from kept_jax.models.products import laid_out_transpose

Params = dict[str, Any]


def init_params(config: ModelConfig, rng: jax.Array, seq_len: int = 8) -> Params:
    """Random parameters (plain arrays, logical-axis boxes removed) in the layout `config.scan_layers` selects."""
    variables = config.model_class(config).init(rng, jnp.zeros((1, seq_len), jnp.int32))
    return nn.unbox(variables["params"])


def abstract_params(config: ModelConfig) -> Params:
    """Shapes and dtypes of the parameters, without allocating them."""
    return jax.eval_shape(lambda: init_params(config, jax.random.key(0), seq_len=1))


def _layers_parent(params: Params) -> str:
    """The top-level module holding `layers` (`model` for Llama and Orion, `backbone` for Llamba)."""
    return next(top for top, sub in params.items() if isinstance(sub, dict) and "layers" in sub)


def stack_layers(params: Params) -> Params:
    """`<top>/layers/<i>/...` (unscanned) -> `<top>/layers/...` with a leading layer axis (scanned)."""
    top = _layers_parent(params)
    layers = params[top]["layers"]
    if not all(k.isdigit() for k in layers):
        return params  # already stacked
    ordered = [layers[str(i)] for i in range(len(layers))]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *ordered)
    return {**params, top: {**params[top], "layers": stacked}}


def unstack_layers(params: Params) -> Params:
    """Inverse of `stack_layers`."""
    top = _layers_parent(params)
    layers = params[top]["layers"]
    if all(k.isdigit() for k in layers):
        return params  # already unstacked
    num_layers = jax.tree.leaves(layers)[0].shape[0]
    unstacked = {str(i): jax.tree.map(lambda x, i=i: x[i], layers) for i in range(num_layers)}
    return {**params, top: {**params[top], "layers": unstacked}}


def layer_params(params: Params) -> Params:
    """The `layers` subtree with a leading layer axis, whichever layout `params` is in."""
    return stack_layers(params)[_layers_parent(params)]["layers"]


def layers_at(params: Params, indices: tuple[int, ...]) -> Params:
    """The parameters of layers `indices`, stacked on a leading axis, whichever layout `params` is in (all of a
    stacked tree is returned as it is; a part of it is gathered; unstacked layers are stacked)."""
    layers = params[_layers_parent(params)]["layers"]
    if all(k.isdigit() for k in layers):
        return jax.tree.map(lambda *xs: jnp.stack(xs), *(layers[str(i)] for i in indices))
    if tuple(indices) == tuple(range(jax.tree.leaves(layers)[0].shape[0])):
        return layers
    return jax.tree.map(lambda x: x[jnp.asarray(indices)], layers)


def layer_list(params: Params) -> list[Params]:
    """Each layer's own parameters, in order, whichever layout `params` is in (a stacked tree is unstacked)."""
    layers = unstack_layers(params)[_layers_parent(params)]["layers"]
    return [layers[str(i)] for i in range(len(layers))]


def _get(tree: Params, path: tuple[str, ...]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def head_kernel(params: Params, config: ModelConfig) -> jax.Array:
    """The output head as a [hidden, vocab] matrix, tied or not, divided by `config.logit_divisor` when that is
    not 1 (the logits are then hidden @ head_kernel, as the model computes them)."""
    # A tied head is the embedding transposed, laid out as a matrix of its own: XLA would otherwise fold the
    # transpose into the product that reads it, which XLA:CPU then cannot run with bf16 operands.
    kernel = (laid_out_transpose(_get(params, config.embedding_path)) if config.tie_word_embeddings
              else _get(params, config.head_path))
    return kernel if config.logit_divisor == 1 else kernel / jnp.asarray(config.logit_divisor, kernel.dtype)
