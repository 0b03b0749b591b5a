"""Distillation objectives: what the teacher provides and what the student pays, apart from the step that trains.

The jitted step (kept_jax/xkd/step.py) knows nothing of the loss; an objective gives it

    targets(teacher_params, tokens) -> pytree             the teacher's side, run outside the gradient
    sums(variables, teacher_params, tokens, targets)      the student's loss and metrics, as sums -> dict
    metrics                                               the names of those sums ("loss" among them)
    count                                                 the sum the loss is a mean over (tokens, matrices)

Sums, not means, so that gradient accumulation and the cross-device reduction are exact; the step divides the
gradient by `sums[count]`. MaxText's distillation strategies separate the trainer from the loss the same way.

- `LogitKL`: KEPT's XKD and MOHAWK's stage 3, the chunked KL on logits (kept_jax/xkd/losses.py).
- `MatrixOrientation`: MOHAWK stage 1, sum over layers of the mean over batch and heads of ||M_l - A_l||_F, the
  student mixer's materialized matrix against the teacher's attention probabilities, one layer at a time in a scan.
- `HiddenAlignment`: MOHAWK stage 2, sum over layers of the mean over batch and tokens of ||Block_l(u_l) - u_l+1||_2,
  each student block fed the teacher's hidden state u_l entering layer l (u_L: the output before the final norm).

Both run over the layers the student replaced: those whose kind (`ModelConfig.layer_kinds`) differs from the
teacher's, every layer of a Llamba, the Mamba-2 layers of a hybrid (its attention layers are the teacher's).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

import numpy as np

from kept_jax.config import replaced_layers
from kept_jax.models import head_kernel, layers_at
from kept_jax.metrics import SUMS, labels_and_mask
from kept_jax.xkd.losses import LossConfig, chunked_distill_loss


@dataclasses.dataclass(frozen=True)
class LogitKL:
    """The chunked distillation loss on the final hidden states and both heads (forward KL by default)."""

    teacher: nn.Module
    student: nn.Module
    loss: LossConfig = LossConfig()
    metrics: ClassVar[tuple[str, ...]] = ("loss", *SUMS)
    count: ClassVar[str] = "tokens"

    def targets(self, teacher_params, tokens):
        hidden = self.teacher.apply({"params": teacher_params}, tokens, output="hidden")
        return hidden, head_kernel(teacher_params, self.teacher.config)

    def sums(self, variables, teacher_params, tokens, targets):
        teacher_hidden, teacher_head = targets
        hidden = self.student.apply(variables, tokens, output="hidden")
        labels, mask = labels_and_mask(tokens)
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        return chunked_distill_loss(hidden, head_kernel(variables["params"], self.student.config), teacher_hidden,
                                    teacher_head, labels, mask, self.loss, positions, self.student.config.compute_dtype)


def _replaced_blocks(teacher_config, student_config):
    """(layer indices, teacher block, student block) of the replaced layers, each side one kind of block."""
    layers = replaced_layers(teacher_config, student_config)
    if not layers:
        raise ValueError("the student replaces no layer of the teacher: there is nothing to align")
    blocks = []
    for config in (teacher_config, student_config):
        kinds = {config.block_classes[i] for i in layers}
        if len(kinds) != 1:
            raise ValueError(f"the replaced layers of {config.architecture} are of {len(kinds)} kinds; one expected")
        blocks.append(kinds.pop()(config))
    return layers, *blocks


def teacher_layer_inputs(teacher: nn.Module, teacher_params, tokens) -> jax.Array:
    """[L + 1, b, T, d]: u_0 ... u_L, the hidden states entering each teacher layer and the last one's output."""
    inputs, _ = teacher.apply({"params": teacher_params}, tokens, method="layer_inputs", mutable="intermediates")
    return inputs


def _layer_scan(body, xs) -> jax.Array:
    """[L]: `body(layer xs)` for each layer, one layer alive at a time: the body is rematerialized in the backward
    pass, so nothing of size [b, heads, T, T] (or a block's activations) is kept per layer."""
    def step(carry, layer_xs):
        return carry, body(*layer_xs)

    _, per_layer = jax.lax.scan(jax.checkpoint(step), None, xs)
    return per_layer


@dataclasses.dataclass(frozen=True)
class MatrixOrientation:
    """MOHAWK stage 1 (needs a teacher with attention probabilities and a student with mixing matrices, whose
    heads are a multiple of the attention's)."""

    teacher: nn.Module
    student: nn.Module
    metrics: ClassVar[tuple[str, ...]] = ("loss", "matrices")
    count: ClassVar[str] = "matrices"

    def targets(self, teacher_params, tokens):
        layers = replaced_layers(self.teacher.config, self.student.config)
        return teacher_layer_inputs(self.teacher, teacher_params, tokens)[np.asarray(layers)]

    def sums(self, variables, teacher_params, tokens, targets):
        t_cfg, s_cfg = self.teacher.config, self.student.config
        layers, t_block, s_block = _replaced_blocks(t_cfg, s_cfg)
        rope = t_cfg.block_args(tokens)
        heads = []

        def distance(t_layer, s_layer, u):
            attention = t_block.apply({"params": t_layer}, u, *rope, method="attention_probabilities")
            mixing = s_block.apply({"params": s_layer}, u, method="mixing_matrix")
            # A mixer with more heads than the attention: each attention head is the target of its run of heads.
            attention = jnp.repeat(attention, mixing.shape[1] // attention.shape[1], axis=1)
            heads.append(mixing.shape[1])
            return jnp.sum(jnp.sqrt(jnp.sum(jnp.square(mixing - jax.lax.stop_gradient(attention)), axis=(-2, -1))))

        loss = _layer_scan(distance, (layers_at(teacher_params, layers), layers_at(variables["params"], layers),
                                      targets)).sum()
        batch = tokens.shape[0]
        return {"loss": loss, "matrices": jnp.asarray(batch * heads[0], jnp.float32)}


@dataclasses.dataclass(frozen=True)
class HiddenAlignment:
    """MOHAWK stage 2: every replaced student block against the teacher's layer, on the teacher's input. With
    `by_layer` (held-out evaluation) the sums also hold `layers`, each replaced layer's part of the loss."""

    teacher: nn.Module
    student: nn.Module
    by_layer: bool = False
    metrics: ClassVar[tuple[str, ...]] = ("loss", "tokens")
    count: ClassVar[str] = "tokens"

    def targets(self, teacher_params, tokens):
        """(u_l entering each replaced layer l, u_l+1 leaving it)."""
        layers = np.asarray(replaced_layers(self.teacher.config, self.student.config))
        inputs = teacher_layer_inputs(self.teacher, teacher_params, tokens)
        return inputs[layers], inputs[layers + 1]

    def sums(self, variables, teacher_params, tokens, targets):
        s_cfg = self.student.config
        layers, _, block = _replaced_blocks(self.teacher.config, s_cfg)
        args = s_cfg.block_args(tokens)

        def distance(s_layer, u_in, u_out):
            out, _ = block.apply({"params": s_layer}, u_in, *args)
            diff = out.astype(jnp.float32) - u_out.astype(jnp.float32)
            return jnp.sum(jnp.sqrt(jnp.sum(jnp.square(diff), axis=-1)))

        per_layer = _layer_scan(distance, (layers_at(variables["params"], layers), *targets))
        sums = {"loss": per_layer.sum(), "tokens": jnp.asarray(tokens.size, jnp.float32)}
        return sums | {"layers": per_layer} if self.by_layer else sums


OBJECTIVES = {"kl": LogitKL, "matrix": MatrixOrientation, "hidden": HiddenAlignment}


def make_objective(name: str, teacher: nn.Module, student: nn.Module, loss: LossConfig):
    """The objective called `name` in a config (`OBJECTIVES`); `loss` configures `kl`."""
    if name == "kl":
        return LogitKL(teacher, student, loss)
    return OBJECTIVES[name](teacher, student)
