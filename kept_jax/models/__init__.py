"""The architectures kept_jax runs, one module each, and the one constructor everything calls.

    config = bridge.load_config(path)          # the architecture comes from config.json's model_type
    model = build_model(config)                # a Flax module: model.apply({"params": params}, tokens, output=...)

Adding an architecture: write its module (config with `model_types`, `_from_hf`/`to_hf_dict`, `tensor_table`,
formulas, logical axes, `model_class`; blocks built from `layers.py`) and add its config class to ARCHITECTURES.
"""

from __future__ import annotations

import flax.linen as nn

from kept_jax.config import ModelConfig
from kept_jax.errors import KeptError
from kept_jax.models.hybrid import HybridConfig, HybridForCausalLM
from kept_jax.models.llama import LlamaConfig, LlamaForCausalLM
from kept_jax.models.llamba import LlambaConfig, LlambaForCausalLM
from kept_jax.models.params import (abstract_params, head_kernel, init_params, layer_list, layer_params,
                                    layers_at, stack_layers, unstack_layers)

ARCHITECTURES: dict[str, type[ModelConfig]] = {t: c for c in (LlamaConfig, LlambaConfig, HybridConfig)
                                               for t in c.model_types}


def config_from_hf(hf: dict, **runtime) -> ModelConfig:
    """The typed config of a Hugging Face `config.json` dict, of the architecture its `model_type` names (or,
    without one, whose `layout_keys` it has), with runtime choices (dtypes, scan, remat)."""
    model_type = hf.get("model_type")
    if model_type is None:  # an official writer's layout without one: the class whose layout_keys it has says
        model_type = next((t for c in ARCHITECTURES.values() if (t := c.model_type_of(hf))), None)
    if model_type not in ARCHITECTURES:
        raise KeptError(f"config.json has model_type {model_type!r}; kept_jax reads "
                        f"{', '.join(map(repr, ARCHITECTURES))}")
    return ARCHITECTURES[model_type].from_hf_dict(hf, **runtime)


def build_model(config: ModelConfig) -> nn.Module:
    """The Flax model of `config`'s architecture."""
    return config.model_class(config)


__all__ = [
    "ARCHITECTURES", "HybridConfig", "HybridForCausalLM", "LlamaConfig", "LlamaForCausalLM", "LlambaConfig", "LlambaForCausalLM", "ModelConfig",
    "abstract_params", "build_model", "config_from_hf", "head_kernel", "init_params", "layer_list", "layer_params", "layers_at",
    "stack_layers",
    "unstack_layers",
]
