"""MOHAWK's stage objectives equal a naive float64 computation of their definitions, values and gradients.

The reference here is written from the math (docs/llamba.md) with jax.numpy in float64 only for autodiff: the
teacher's attention probabilities with RoPE and GQA repetition spelled out, the student's mixing matrix from cumulative
sums of log-decays (kept_jax sums each segment instead), the blocks as plain formulas, one layer after another.
Stage 1's memory does not grow with depth: one layer's [batch, heads, T, T] at a time (`memory_analysis`).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from kept_jax.models import LlamaConfig, LlambaConfig, build_model, init_params
from kept_jax.models.llamba import BLOCK_NORM_EPS
from kept_jax.stages import stage_optimizer
from kept_jax.xkd.objectives import HiddenAlignment, MatrixOrientation
from tests import fixtures as fx

BATCH, SEQ = 2, 12
TOKENS = np.random.default_rng(5).integers(0, 512, size=(BATCH, SEQ)).astype(np.int32)


def _teacher_config(layers=2) -> LlamaConfig:
    hf = fx.base_config("tiny-llama")
    return LlamaConfig.from_hf_dict({**hf, "num_hidden_layers": layers})


def _student_config(teacher: LlamaConfig) -> LlambaConfig:
    """As many mixer heads as attention heads (stage 1 compares them one to one), two B/C groups."""
    return LlambaConfig(vocab_size=teacher.vocab_size, hidden_size=teacher.hidden_size,
                        intermediate_size=teacher.intermediate_size, num_hidden_layers=teacher.num_hidden_layers,
                        tie_word_embeddings=False, d_state=6, n_v_heads=teacher.num_attention_heads, n_qk_heads=2,
                        expand=1, chunk_size=8, pad_vocab_size_multiple=8)


def _randomized(params, seed):
    """Every leaf drawn so that each term matters: norms and skips away from 1, biases away from 0."""
    flat = traverse_util.flatten_dict(params)
    rng = np.random.default_rng(seed)
    out = {}
    for path, value in flat.items():
        shape, name = value.shape, path[-1]
        if name == "kernel" and path[-2] == "conv1d":
            new = rng.standard_normal(shape) * 0.6
        elif name == "kernel":
            new = rng.standard_normal(shape) / np.sqrt(shape[-2])
        elif name == "weight":
            new = 1.0 + 0.3 * rng.standard_normal(shape)
        elif name == "D":
            new = 1.0 + 0.5 * rng.standard_normal(shape)
        elif name == "z_bias":
            new = 0.5 + rng.standard_normal(shape)
        else:  # embeddings, biases
            new = rng.standard_normal(shape) * (1.0 if name == "embedding" else 0.3)
        out[path] = jnp.asarray(new, jnp.float32)
    return traverse_util.unflatten_dict(out)


def _models(layers=2):
    t_cfg = _teacher_config(layers)
    s_cfg = _student_config(t_cfg)
    teacher, student = build_model(t_cfg), build_model(s_cfg)
    t_params = _randomized(init_params(t_cfg, jax.random.key(0)), 1)
    s_params = _randomized(init_params(s_cfg, jax.random.key(0)), 2)
    return teacher, student, t_params, s_params


# ---- The reference, float64 ----------------------------------------------------------------------------------

def _rmsnorm(x, w, eps):
    return w * x / jnp.sqrt(jnp.mean(x * x, -1, keepdims=True) + eps)


def _silu(x):
    return x / (1 + jnp.exp(-x))


def _layer(params, i):
    return jax.tree.map(lambda p: p[i], params)


def reference_teacher(cfg: LlamaConfig, params, tokens):
    """u_0 ... u_L and each layer's attention probabilities [b, heads, T, T]."""
    h, kv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    b, t = tokens.shape
    inv_freq = 1.0 / cfg.rope.theta ** (np.arange(0, hd, 2) / hd)
    angles = np.arange(t)[:, None] * inv_freq[None]
    cos, sin = np.cos(np.concatenate([angles] * 2, -1)), np.sin(np.concatenate([angles] * 2, -1))

    def rope(x):  # [b, t, heads, hd], rotate-half
        rotated = jnp.concatenate([-x[..., hd // 2:], x[..., :hd // 2]], -1)
        return x * cos[None, :, None] + rotated * sin[None, :, None]

    x = params["model"]["embed_tokens"]["embedding"][tokens]
    inputs, probs = [], []
    for i in range(cfg.num_hidden_layers):
        p = _layer(params["model"]["layers"], i)
        inputs.append(x)
        a = _rmsnorm(x, p["input_layernorm"]["weight"], cfg.rms_norm_eps)
        att = p["self_attn"]
        q = rope((a @ att["q_proj"]["kernel"]).reshape(b, t, h, hd))
        k = rope((a @ att["k_proj"]["kernel"]).reshape(b, t, kv, hd))
        v = (a @ att["v_proj"]["kernel"]).reshape(b, t, kv, hd)
        group = np.arange(h) // (h // kv)  # the KV head each query head reads
        scores = jnp.einsum("bqhd,bshd->bhqs", q, k[:, :, group]) / np.sqrt(hd)
        scores = jnp.where(np.tril(np.ones((t, t), bool)), scores, -np.inf)
        pr = jnp.exp(scores - scores.max(-1, keepdims=True))
        pr = pr / pr.sum(-1, keepdims=True)
        probs.append(pr)
        x = x + jnp.einsum("bhqs,bshd->bqhd", pr, v[:, :, group]).reshape(b, t, h * hd) @ att["o_proj"]["kernel"]
        m = _rmsnorm(x, p["post_attention_layernorm"]["weight"], cfg.rms_norm_eps)
        mlp = p["mlp"]
        x = x + (_silu(m @ mlp["gate_proj"]["kernel"]) * (m @ mlp["up_proj"]["kernel"])) @ mlp["down_proj"]["kernel"]
    inputs.append(x)
    return inputs, probs


def reference_mixer(cfg: LlambaConfig, p, u):
    """The mixing matrix with D on its diagonal [b, H, T, T], and the mixer's output, for the normed input u."""
    b, t, _ = u.shape
    h, g, n, hd = cfg.n_v_heads, cfg.n_qk_heads, cfg.d_state, cfg.head_dim
    proj = u @ p["in_proj"]["kernel"]
    channels = cfg.conv_channels
    xbc, z, ell = proj[..., :channels], proj[..., channels:channels + cfg.d_inner], proj[..., channels + cfg.d_inner:]
    kernel = p["conv1d"]["kernel"][:, 0, :]  # [K, C], tap K-1 the current token
    k = kernel.shape[0]
    padded = jnp.concatenate([jnp.zeros((b, k - 1, channels)), xbc], 1)
    conv = sum(padded[:, j:j + t] * kernel[j] for j in range(k)) + p["conv1d"]["bias"]
    x = conv[..., :cfg.d_inner].reshape(b, t, h, hd)
    B = conv[..., cfg.d_inner:cfg.d_inner + g * n].reshape(b, t, g, n)
    C = conv[..., cfg.d_inner + g * n:].reshape(b, t, g, n)
    group = np.arange(h) // (h // g)
    log_a = -jnp.log1p(jnp.exp(ell))  # log sigmoid(-l), [b, t, h]
    cum = jnp.cumsum(log_a, 1)
    decay = jnp.exp(cum[:, :, None, :] - cum[:, None, :, :])  # [b, t, s, h]: prod_{s<r<=t} a_r
    cb = jnp.einsum("btgn,bsgn->btsg", C, B)[..., group]
    m = jnp.where(np.tril(np.ones((t, t), bool))[None, :, :, None], cb * decay, 0.0)
    m = m + np.eye(t)[None, :, :, None] * p["D"]
    m = m.transpose(0, 3, 1, 2)  # [b, h, t, s]
    y = jnp.einsum("bhts,bshp->bthp", m, x).reshape(b, t, cfg.d_inner)
    out = (y * _silu(z + p["z_bias"])) @ p["out_proj"]["kernel"]
    return m, out


def reference_stage1(t_cfg, s_cfg, t_params, s_params, tokens):
    inputs, probs = reference_teacher(t_cfg, t_params, tokens)
    total = 0.0
    for i in range(s_cfg.num_hidden_layers):
        p = _layer(s_params["backbone"]["layers"], i)
        m, _ = reference_mixer(s_cfg, p["mixer"], _rmsnorm(inputs[i], p["input_layernorm"]["weight"], BLOCK_NORM_EPS))
        total = total + jnp.mean(jnp.sqrt(jnp.sum((m - probs[i]) ** 2, axis=(-2, -1))))
    return total


def reference_stage2(t_cfg, s_cfg, t_params, s_params, tokens):
    inputs, _ = reference_teacher(t_cfg, t_params, tokens)
    total = 0.0
    for i in range(s_cfg.num_hidden_layers):
        p = _layer(s_params["backbone"]["layers"], i)
        u = inputs[i]
        _, mixed = reference_mixer(s_cfg, p["mixer"], _rmsnorm(u, p["input_layernorm"]["weight"], BLOCK_NORM_EPS))
        x = u + mixed
        a = _rmsnorm(x, p["post_attention_layernorm"]["weight"], BLOCK_NORM_EPS)
        mlp = p["mlp"]
        x = x + (_silu(a @ mlp["gate_proj"]["kernel"]) * (a @ mlp["up_proj"]["kernel"])) @ mlp["down_proj"]["kernel"]
        total = total + jnp.mean(jnp.sqrt(jnp.sum((x - inputs[i + 1]) ** 2, -1)))
    return total


# ---- The tests ------------------------------------------------------------------------------------------------

def _kept_mean_loss(objective, t_params, s_params, tokens):
    targets = jax.lax.stop_gradient(objective.targets(t_params, tokens))
    sums = objective.sums({"params": s_params}, t_params, tokens, targets)
    return sums["loss"] / sums[objective.count]


@pytest.mark.parametrize("stage", ["matrix", "hidden"])
def test_stage_loss_and_gradients_equal_the_float64_definition(stage):
    teacher, student, t_params, s_params = _models()
    objective_class, reference = {"matrix": (MatrixOrientation, reference_stage1),
                                  "hidden": (HiddenAlignment, reference_stage2)}[stage]
    objective = objective_class(teacher, student)
    value, grads = jax.jit(jax.value_and_grad(lambda s: _kept_mean_loss(objective, t_params, s, TOKENS)))(s_params)
    with jax.enable_x64(True):
        t64, s64 = (jax.tree.map(lambda x: np.asarray(x, np.float64), p) for p in (t_params, s_params))
        ref_value, ref_grads = jax.jit(jax.value_and_grad(
            lambda s: reference(teacher.config, student.config, t64, s, TOKENS)))(s64)
        ref_value, ref_grads = float(ref_value), jax.tree.map(np.asarray, ref_grads)
    assert float(value) == pytest.approx(ref_value, rel=2e-5)
    assert ref_value > 1.0  # the student is far from the teacher: every term counts
    flat, ref_flat = traverse_util.flatten_dict(grads), traverse_util.flatten_dict(ref_grads)
    for path, ref in ref_flat.items():
        scale = np.abs(ref).max()
        np.testing.assert_allclose(np.asarray(flat[path]), ref, atol=2e-4 * max(scale, 1e-3), err_msg=str(path))
    moving = {"/".join(p[2:]) for p, g in ref_flat.items() if np.abs(g).max() > 0}
    if stage == "matrix":  # what shapes the matrices: in_proj, the convolution, D and the norm before the mixer
        assert moving == {"input_layernorm/weight", "mixer/in_proj/kernel", "mixer/conv1d/kernel",
                          "mixer/conv1d/bias", "mixer/D"}
    else:  # every block parameter; the embedding, final norm and head are not used
        assert moving == {"/".join(p[2:]) for p in ref_flat if p[1] == "layers"}


def test_matrix_orientation_memory_does_not_grow_with_depth():
    """One layer's [batch, heads, T, T] matrices at a time: going from 2 to 6 layers adds less temporary memory than
    one such matrix (the 4 more layers' [T, d] inputs), where keeping every layer's would add 4 x several."""
    seq, temp = 128, {}
    tokens = jnp.zeros((1, seq), jnp.int32)
    for layers in (2, 6):
        teacher, student, t_params, s_params = _models(layers)
        objective = MatrixOrientation(teacher, student)
        fn = jax.jit(jax.grad(lambda s, t=t_params, o=objective: _kept_mean_loss(o, t, s, tokens)))
        temp[layers] = fn.lower(s_params).compile().memory_analysis().temp_size_in_bytes
    one_matrix = 1 * student.config.n_v_heads * seq * seq * 4
    assert temp[6] - temp[2] < one_matrix, (temp, one_matrix)


def test_stage_optimizer_moves_only_what_has_a_gradient():
    """A stage's AdamW is optax.adamw (no clipping by default) on the leaves the objective reaches; a leaf outside
    its graph (stage 1: out_proj, z_bias, the MLPs) is not decayed either, as PyTorch's AdamW skips it."""
    teacher, student, t_params, s_params = _models()
    objective = MatrixOrientation(teacher, student)
    grads = jax.grad(lambda s: _kept_mean_loss(objective, t_params, s, TOKENS))(s_params)
    optimizer = stage_optimizer(optax.constant_schedule(1e-2), weight_decay=0.1, clip=0.0)
    updates, _ = optimizer.update(grads, optimizer.init(s_params), s_params)
    adamw = optax.adamw(1e-2, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1)
    expected, _ = adamw.update(grads, adamw.init(s_params), s_params)
    flat_grads, flat_expected = traverse_util.flatten_dict(grads), traverse_util.flatten_dict(expected)
    still = set()
    for path, update in traverse_util.flatten_dict(updates).items():
        if np.any(np.asarray(flat_grads[path]) != 0):
            np.testing.assert_allclose(update, flat_expected[path], rtol=1e-6, atol=1e-9, err_msg=str(path))
        else:
            assert np.all(np.asarray(update) == 0), path
            still.add("/".join(path[2:]))
    assert {"mixer/out_proj/kernel", "mixer/z_bias", "mlp/down_proj/kernel"} <= still
