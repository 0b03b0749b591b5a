"""Orion and Llama as one pure-functional Flax causal LM; the config's architecture picks the norm."""

from kept_jax.models.params import head_kernel, init_params, stack_layers, unstack_layers
from kept_jax.models.transformer import CausalLM

__all__ = ["CausalLM", "head_kernel", "init_params", "stack_layers", "unstack_layers"]
