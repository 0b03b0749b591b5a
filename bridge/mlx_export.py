"""A Llamba for Cartesia's on-device runtime, `cartesia-mlx`: `python -m kept_jax.convert --to mlx`.

The runtime's checkpoint is one safetensors file whose metadata is the model's config tree (each key a dotted path,
each value JSON) and whose tensors are named by its module tree; `cartesia_mlx.from_pretrained(FILE)` builds the
modules from the tree and loads the tensors into them. A Llamba there is an `LM` of `n_layer` repeats of two
residual blocks, a `LlambaSSD` mixer and a `SwiGLU` MLP, each behind its pre-norm:

    kept_jax (HF names)                          cartesia-mlx
    backbone.embedding.weight                    embedding.encoder.weight
    backbone.layers.i.input_layernorm            model.layers.{2i}.norm
    backbone.layers.i.mixer.in_proj / out_proj   model.layers.{2i}.layer.in_proj / out_proj      (quantized)
    backbone.layers.i.mixer.conv1d.weight [C,1,K] model.layers.{2i}.layer.conv_weight [C, K]
    backbone.layers.i.mixer.conv1d.bias, z_bias, D   model.layers.{2i}.layer.conv_bias, z_bias, D
    backbone.layers.i.post_attention_layernorm   model.layers.{2i+1}.norm
    backbone.layers.i.mlp.gate/up/down_proj      model.layers.{2i+1}.layer.in_proj/gate_proj/out_proj (quantized)
    backbone.final_layernorm                     model.norm
    lm_head (the embedding when tied)            head.linear                                     (--quantize-head)

Quantized layers are MLX's `QuantizedLinear` (affine: per group of `group_size` inputs a scale and a bias, values
packed into uint32), made by `mlx.core.quantize` itself; everything else is bfloat16. What the runtime cannot say is
refused: B and C shared by groups of heads (its mixer has one B and C per head), a final norm epsilon other than its
RMSNorm's 1e-5, an MLP width that `round(expand * d_model)` does not give back.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable

import numpy as np

from kept_jax.errors import KeptError
from kept_jax.quantize import GROUP_SIZES

BITS = (4, 8, 16)  # 16: bfloat16, nothing quantized
WEIGHTS_FILE = "model.safetensors"
RUNTIME_NORM_EPS = 1e-5  # mlx.nn.RMSNorm's default; the runtime's config has no key for it


def check_expressible(config) -> None:
    """Refuses a Llamba the runtime cannot express, before anything is read."""
    if config.n_qk_heads != config.n_v_heads:
        raise KeptError(f"cartesia-mlx's Llamba mixer has one B and C per head; this Llamba shares them in groups "
                        f"(ssm_cfg.n_qk_heads {config.n_qk_heads} < n_v_heads {config.n_v_heads}), which it cannot "
                        "express")
    if config.rms_norm_eps != RUNTIME_NORM_EPS:
        raise KeptError(f"cartesia-mlx's norms use epsilon {RUNTIME_NORM_EPS:g}; this Llamba's final norm uses "
                        f"norm_epsilon {config.rms_norm_eps:g}, which it cannot express")
    if round(_mlp_expand(config) * config.hidden_size) != config.intermediate_size:
        raise KeptError(f"cartesia-mlx sizes the MLP as round(expand x d_model); no expand gives "
                        f"intermediate_size {config.intermediate_size} from d_model {config.hidden_size}")


def check_group_size(config, bits: int, group_size: int) -> None:
    """Every quantized layer's input size must be a whole number of groups (the head's is in_proj's, d_model)."""
    if bits == 16:
        return
    inputs = {"the mixer's in_proj": config.hidden_size, "the mixer's out_proj": config.d_inner,
              "the MLP's down_proj": config.intermediate_size}
    for layer, size in inputs.items():
        if size % group_size:
            raise KeptError(f"--group-size {group_size} does not divide the input size {size} of {layer}; choose one "
                            f"that does ({', '.join(map(str, GROUP_SIZES))})")


def _mlp_expand(config) -> float:
    return config.intermediate_size / config.hidden_size


def _quantization(bits: int, group_size: int) -> dict | None:
    return None if bits == 16 else {"group_size": group_size, "bits": bits}


def config_tree(config, bits: int, group_size: int, quantize_head: bool, tokenizer: str) -> dict:
    """The runtime's config tree. Every level names its quantization and width itself: the runtime resolves
    `Inherit` defaults from its own base configs, not from this tree's parents."""
    quant, d = _quantization(bits, group_size), config.hidden_size
    eos = config.eos_token_id[0] if isinstance(config.eos_token_id, (list, tuple)) else config.eos_token_id
    common = {"quantization_kwargs": quant, "d_model": d}
    mixer = {"_class_": "layers.ssd.llamba_ssd.LlambaSSD", **common, "expand": config.expand,
             "kernel_size": config.d_conv, "d_state": config.d_state, "n_heads": config.n_v_heads, "bias": False,
             "conv_bias": True, "conv_swish": config.ssm_activation == "silu"}
    mlp = {"_class_": "layers.ffn.SwiGLU", **common, "expand": _mlp_expand(config), "activation": "swish",
           "glu": True, "norm": None, "bias": config.mlp_bias, "quantize_gate": True}

    def block(layer: dict, stateful: bool) -> dict:
        return {"_class_": "layers.residual_block.ResidualBlock", **common, "norm_point": "pre",
                "stateful": stateful, "layer": layer}

    return {
        "_class_": "models.llamba.Llamba", **common,
        "n_tokens": config.padded_vocab_size,
        "eos": -1 if eos is None else int(eos),  # -1: no end token, generation runs to max_tokens
        "tokenizer": {"_class_": "utils.tokenizer.Tokenizer", "name": tokenizer},
        "embedding": {"_class_": "layers.embedding.Embedding", "d_model": d, "n_tokens": config.padded_vocab_size},
        "model": {"_class_": "layers.sequence_model.SequenceModel", **common,
                  "n_layer_repeats": config.num_hidden_layers, "unique_layers": [block(mixer, True), block(mlp, False)],
                  "post_norm": True, "pre_norm": False, "final_proj": False, "norm_type": "rms"},
        "head": {"_class_": "layers.linear.Linear", "quantization_kwargs": quant if quantize_head else None,
                 "input_dims": d, "output_dims": config.padded_vocab_size, "bias": False},
    }


def tensor_plan(config, quantize_head: bool) -> list[tuple[str, str | None, bool]]:
    """(runtime name, HF name or None for zeros, quantized?) for every tensor the runtime loads, in file order."""
    plan = [("embedding.encoder.weight", config.hf_embedding_name, False)]
    for i in range(config.num_hidden_layers):
        hf, mixer, mlp = f"backbone.layers.{i}", f"model.layers.{2 * i}", f"model.layers.{2 * i + 1}"
        plan += [(f"{mixer}.norm.weight", f"{hf}.input_layernorm.weight", False),
                 (f"{mixer}.layer.in_proj", f"{hf}.mixer.in_proj.weight", True),
                 (f"{mixer}.layer.z_bias", f"{hf}.mixer.z_bias", False),
                 (f"{mixer}.layer.conv_weight", f"{hf}.mixer.conv1d.weight", False),
                 (f"{mixer}.layer.conv_bias", f"{hf}.mixer.conv1d.bias" if config.conv_bias else None, False),
                 (f"{mixer}.layer.D", f"{hf}.mixer.D", False),
                 (f"{mixer}.layer.out_proj", f"{hf}.mixer.out_proj.weight", True),
                 (f"{mlp}.norm.weight", f"{hf}.post_attention_layernorm.weight", False)]
        # The runtime's SwiGLU is out_proj(silu(in_proj(x)) * gate_proj(x)): Llama's gate is its in_proj.
        for ours, theirs in (("gate_proj", "in_proj"), ("up_proj", "gate_proj"), ("down_proj", "out_proj")):
            plan.append((f"{mlp}.layer.{theirs}", f"{hf}.mlp.{ours}.weight", True))
            if config.mlp_bias:
                plan.append((f"{mlp}.layer.{theirs}.bias", f"{hf}.mlp.{ours}.bias", False))
    plan.append(("model.norm.weight", "backbone.final_layernorm.weight", False))
    head = config.hf_embedding_name if config.tie_word_embeddings else "lm_head.weight"
    plan.append(("head.linear", head, quantize_head))
    return plan


def planned_bytes(config, bits: int, group_size: int, quantize_head: bool) -> int:
    """The weights file's tensor bytes: bf16 values, or `bits` per quantized weight plus a bf16 scale and bias per
    group."""
    shapes = {spec.hf_name: spec.hf_shape for spec in config.tensor_table()}
    total = 0
    for _, hf_name, quantized in tensor_plan(config, quantize_head):
        size = config.conv_channels if hf_name is None else int(np.prod(shapes[hf_name]))
        if quantized and bits != 16:
            total += size * bits // 8 + 2 * 2 * size // group_size
        else:
            total += 2 * size
    return total


def export_tensors(config, read: Callable[[str], np.ndarray], bits: int, group_size: int,
                   quantize_head: bool) -> dict:
    """The runtime's tensors (mlx arrays), read one at a time from `read(hf_name)`."""
    mx = require_mlx()
    tensors = {}
    for name, hf_name, quantized in tensor_plan(config, quantize_head):
        if hf_name is None:  # a conv without bias: the runtime's always has one
            tensors[name] = mx.zeros((config.conv_channels,), dtype=mx.bfloat16)
            continue
        value = np.asarray(read(hf_name), dtype=np.float32)
        if not np.isfinite(value).all():
            raise KeptError(f"{hf_name} holds NaN or infinite values; the source checkpoint is damaged")
        if name.endswith("conv_weight"):
            value = value[:, 0, :]  # [C, 1, K] -> [C, K], tap K-1 on the current token as before
        array = mx.array(value).astype(mx.bfloat16)
        if not name.endswith(("in_proj", "out_proj", "gate_proj", "head.linear")):
            made = {name: array}
        elif quantized and bits != 16:
            weight, scales, biases = mx.quantize(array, group_size=group_size, bits=bits)
            made = {f"{name}.weight": weight, f"{name}.scales": scales, f"{name}.biases": biases}
        else:
            made = {f"{name}.weight": array}
        mx.eval(*made.values())  # computed now (MLX is lazy), so the source tensor can go
        tensors.update(made)
    return tensors


def write_mlx(out_dir: str, config, read: Callable[[str], np.ndarray], bits: int, group_size: int,
              quantize_head: bool, tokenizer: str) -> int:
    """Writes `out_dir/model.safetensors` for the runtime; returns its size in bytes."""
    from mlx.utils import tree_flatten

    mx = require_mlx()
    tensors = export_tensors(config, read, bits, group_size, quantize_head)
    metadata = {key: json.dumps(value) for key, value in
                tree_flatten(config_tree(config, bits, group_size, quantize_head, tokenizer))}
    path = os.path.join(out_dir, WEIGHTS_FILE)
    mx.save_safetensors(path, tensors, metadata=metadata)
    return os.path.getsize(path)


def require_mlx():
    try:
        import mlx.core as mx
    except ImportError:
        raise KeptError("--to mlx needs MLX to quantize and write the checkpoint: pip install 'mlx>=0.22' (on "
                        "Linux: pip install 'mlx[cpu]>=0.22'), or pip install 'kept_jax[mlx]'") from None
    return mx
