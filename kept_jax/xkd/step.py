"""The jitted distillation step: frozen teacher forward, student forward/backward, optimizer update; metric sums.

    step = make_train_step(objective, split, optimizer)
    state, metrics = step(state, teacher_params, frozen, batch)     # batch: int32 [grad_accum, batch, seq]

`state` (trainable leaves and optimizer state) is donated; the teacher's params and the student's frozen leaves
are not, so they stay bit-identical. The teacher's side of the objective runs outside `value_and_grad`, under
`stop_gradient`; the objective (kept_jax/xkd/objectives.py) turns it and the student into a loss: one step for
KEPT's XKD and MOHAWK's three stages.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from kept_jax.xkd.trainable import Flat, StudentSplit


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    step: jax.Array
    trainable: Flat
    opt_state: Any


def make_schedule(lr: float, warmup: int, steps: int) -> optax.Schedule:
    """Linear warmup then cosine decay to 10%; update k (from 0) uses schedule(k)."""
    return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(steps, warmup + 1), end_value=lr / 10)


def make_optimizer(lr: float, warmup: int, steps: int, weight_decay: float, clip: float) -> optax.GradientTransformation:
    """AdamW on `make_schedule`, after global-norm clipping."""
    return optax.chain(optax.clip_by_global_norm(clip),
                       optax.adamw(make_schedule(lr, warmup, steps), weight_decay=weight_decay))


def _fresh_state(trainable: Flat, optimizer: optax.GradientTransformation) -> TrainState:
    return TrainState(jnp.zeros((), jnp.int32), trainable, optimizer.init(trainable))


def abstract_state(split: StudentSplit, optimizer: optax.GradientTransformation) -> TrainState:
    """The state's shapes and dtypes, without allocating it (for shardings and checkpoint restore)."""
    return jax.eval_shape(lambda t: _fresh_state(t, optimizer), split.trainable)


def init_state(split: StudentSplit, optimizer: optax.GradientTransformation, shardings=None) -> TrainState:
    """A fresh state placed by `shardings` (a TrainState of shardings, or None for the default device).

    The trainable leaves are copied (jit outputs new buffers), since the step donates the state it is given.
    """
    return jax.jit(lambda t: _fresh_state(t, optimizer), out_shardings=shardings)(split.trainable)


def _loss_fn(objective, split: StudentSplit):
    def loss(trainable, teacher_params, frozen, tokens, targets):
        variables = dataclasses.replace(split, frozen=frozen).assemble(teacher_params, trainable)
        sums = objective.sums(variables, teacher_params, tokens, targets)
        return sums["loss"], sums

    return loss


def _targets(objective, teacher_params, tokens):
    return jax.lax.stop_gradient(objective.targets(teacher_params, tokens))


def make_train_step(objective, split: StudentSplit, optimizer: optax.GradientTransformation,
                    state_shardings=None) -> Callable:
    """`objective` (kept_jax/xkd/objectives.py) gives the loss; `state_shardings` (from `abstract_state`) pins the
    new state's layout to the old one's across steps."""
    grad_fn = jax.value_and_grad(_loss_fn(objective, split), has_aux=True)

    def step(state: TrainState, teacher_params, frozen, batch):
        def micro(tokens):
            targets = _targets(objective, teacher_params, tokens)
            (_, sums), grads = grad_fn(state.trainable, teacher_params, frozen, tokens, targets)
            return grads, sums

        if batch.shape[0] == 1:  # no accumulation loop, and no gradient-sized running sum
            grads, sums = micro(batch[0])
        else:
            def accumulate(total, tokens):
                return jax.tree.map(jnp.add, total, micro(tokens)), None

            zero = (jax.tree.map(jnp.zeros_like, state.trainable),
                    {k: jnp.zeros((), jnp.float32) for k in objective.metrics})
            (grads, sums), _ = jax.lax.scan(accumulate, zero, batch)
        grads = jax.tree.map(lambda g: g / sums[objective.count], grads)  # the gradient of the mean loss
        updates, opt_state = optimizer.update(grads, state.opt_state, state.trainable)
        trainable = optax.apply_updates(state.trainable, updates)
        metrics = dict(sums, grad_norm=optax.global_norm(grads))
        return TrainState(state.step + 1, trainable, opt_state), metrics

    out_shardings = None
    if state_shardings is not None:
        mesh = jax.tree.leaves(state_shardings)[0].mesh
        out_shardings = (state_shardings, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    return jax.jit(step, donate_argnums=(0,), out_shardings=out_shardings)


def make_eval_step(objective) -> Callable:
    """Metric sums of `objective` on one [batch, seq] array, for held-out evaluation, of the student's whole
    variables (`StudentSplit.assemble` outside the step): one program serves every stage of a job, whatever each
    trains, where a step over the split would compile again for each stage's layout."""

    @jax.jit
    def evaluate(variables, teacher_params, tokens):
        return objective.sums(variables, teacher_params, tokens, _targets(objective, teacher_params, tokens))

    return evaluate
