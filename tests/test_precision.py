"""The precision policy (kept_jax.models.products): under compute dtype bfloat16 every matrix product of a training
step, forward and backward, takes bf16 operands and accumulates in fp32, read from the compiled program (a product
that falls back to fp32 operands, which XLA:CPU does for layouts its fast path does not take, or to a bf16 result
fails); and the step's loss and gradients stay within a stated distance of the fp32 step's on the same weights.

Objectives: the XKD logit KL (Llama student), MOHAWK's three stages (Llamba student), and a hybrid's forward and
backward through its attention, Mamba-2 (chunked) and mixing matrix. The one product kept fp32 by design is the
recurrence of Mamba-2 states between chunks (`ssd.STATE_SCOPE`).
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kept_jax.models.hybrid as hybrid
from kept_jax.models import build_model, config_from_hf, init_params, ssd
from kept_jax.xkd.losses import LossConfig
from kept_jax.xkd.objectives import HiddenAlignment, LogitKL, MatrixOrientation
from tests import fixtures as fx
from tests.test_hybrid import _mixer
from tests.test_mohawk import _randomized, _student_config, _teacher_config

TOKENS = np.random.default_rng(3).integers(0, 512, size=(2, 40)).astype(np.int32)  # 40: several chunks of 8
# bf16 operands keep 8 significant bits. Measured on these models (2026-12-06): the bf16 loss is within 0.4% of the
# fp32 step's, and each gradient within 4.0% (relative norm of the difference; 0.6-1.5% but for stage 3's Llamba).
LOSS_RTOL, GRAD_RTOL = 1e-2, 8e-2


def dot_types(hlo: str) -> list[tuple[str, str, str, str]]:
    """(lhs, rhs, result) element types and the op_name of every dot in an optimized HLO module's text."""
    dots = []
    for body in re.split(r"\n(?=\S)", hlo):  # one computation per block
        types = dict(re.findall(r"%([\w.\-]+) = (\w+)\[", body))
        for name, out, lhs, rhs, rest in re.findall(r"%([\w.\-]+) = (\w+)\[[^\n]*? dot\(%([\w.\-]+), %([\w.\-]+)\)(.*)",
                                                    body):
            op = re.search(r'op_name="([^"]*)"', rest)
            dots.append((types[lhs], types[rhs], out, op.group(1) if op else name))
    return dots


def assert_bf16_products(fn, *args):
    dots = dot_types(jax.jit(fn).lower(*args).compile().as_text())
    assert dots, "no products found: the HLO parser has gone stale"
    wrong = [d for d in dots if d[:3] != ("bf16", "bf16", "f32") and ssd.STATE_SCOPE not in d[3]]
    assert not wrong, f"{len(wrong)} of {len(dots)} products off the policy, e.g. {wrong[:3]}"


def _relative(a, b) -> float:
    """|a - b| / |b|; 0 for two zero gradients (a leaf the objective does not reach)."""
    diff, norm = float(jnp.linalg.norm((a - b).ravel())), float(jnp.linalg.norm(b.ravel()))
    return diff / norm if norm else diff


def _compare(loss_of, params):
    """Value and gradients of `loss_of(dtype)` at `params`, bf16 against fp32; also checks the bf16 program."""
    bf16, fp32 = loss_of("bfloat16"), loss_of("float32")
    assert_bf16_products(jax.value_and_grad(bf16), params)
    (v16, g16), (v32, g32) = (jax.jit(jax.value_and_grad(f))(params) for f in (bf16, fp32))
    assert abs(float(v16) - float(v32)) <= LOSS_RTOL * abs(float(v32)), (float(v16), float(v32))
    errors = jax.tree.map(_relative, g16, g32)
    worst = max(jax.tree.leaves(errors))
    assert worst <= GRAD_RTOL, errors
    return float(v16) / float(v32) - 1, worst


def _objective_loss(objective_class, teacher_cfg, student_cfg, teacher_params, **kwargs):
    def loss_of(dtype):
        teacher = build_model(teacher_cfg.replace(compute_dtype=dtype))
        student = build_model(student_cfg.replace(compute_dtype=dtype))
        objective = objective_class(teacher, student, **kwargs)
        tokens = jnp.asarray(TOKENS)
        targets = objective.targets(teacher_params, tokens)
        return lambda params: objective.sums({"params": params}, teacher_params, tokens, targets)["loss"]
    return loss_of


@pytest.mark.parametrize("tied, chunk", [(False, 32), (True, 32), (True, 1024)])
def test_xkd_step_products_are_bf16_and_close_to_fp32(tied, chunk):
    """Untied and tied heads (the embedding is the head), the loss in chunks and in one chunk (a tied head's
    transpose was once folded into a one-chunk loss's product, which XLA:CPU could not run in bf16)."""
    teacher_cfg = config_from_hf({**fx.base_config("tiny-llama"), "tie_word_embeddings": tied})
    teacher_params = init_params(teacher_cfg, jax.random.key(0))
    student_params = init_params(teacher_cfg, jax.random.key(1))
    _compare(_objective_loss(LogitKL, teacher_cfg, teacher_cfg, teacher_params, loss=LossConfig(chunk_size=chunk)),
             student_params)


@pytest.mark.parametrize("objective", [MatrixOrientation, HiddenAlignment, LogitKL])
def test_mohawk_stage_products_are_bf16_and_close_to_fp32(objective):
    teacher_cfg = _teacher_config()
    student_cfg = _student_config(teacher_cfg)
    teacher_params = _randomized(init_params(teacher_cfg, jax.random.key(0)), 1)
    student_params = _randomized(init_params(student_cfg, jax.random.key(0)), 2)
    kwargs = {"loss": LossConfig(chunk_size=32)} if objective is LogitKL else {}
    _compare(_objective_loss(objective, teacher_cfg, student_cfg, teacher_params, **kwargs), student_params)


def _next_token_loss(config):
    """loss_of(dtype) for `_compare`: the model's cross-entropy on the next token, through its own head."""
    labels = np.roll(TOKENS, -1, axis=1)

    def model_loss(dtype):
        model = build_model(config.replace(compute_dtype=dtype))
        return lambda params: -jnp.mean(jnp.take_along_axis(
            jax.nn.log_softmax(model.apply({"params": params}, jnp.asarray(TOKENS))), labels[..., None], axis=-1))
    return model_loss


def test_a_tied_head_reads_the_embedding_in_bf16():
    """The model's own head tied to its embedding (`products.attend`), forward and backward."""
    config = config_from_hf({**fx.base_config("tiny-llama"), "tie_word_embeddings": True})
    _compare(_next_token_loss(config), init_params(config, jax.random.key(0)))


def test_hybrid_products_are_bf16_and_close_to_fp32():
    """The model's forward and backward (attention, Mamba-2 in chunks, fused MLP, head), and the Mamba-2 mixing
    matrix MOHAWK's stage 1 aligns."""
    config = config_from_hf(fx.base_config("tiny-hybrid"))
    _compare(_next_token_loss(config), init_params(config, jax.random.key(0)))
    mixer_config, mixer_params, u = _mixer()
    m_weights = jnp.asarray(np.random.default_rng(5).standard_normal((2, mixer_config.mamba_n_heads, 21, 21)))

    def matrix_loss(dtype):
        mixer = hybrid.Mamba2(mixer_config.replace(compute_dtype=dtype))
        return lambda params: jnp.sum(mixer.apply({"params": params}, u, method="mixing_matrix") * m_weights)

    _compare(matrix_loss, mixer_params)
