"""Llamba: the mixer's three forms agree (values and gradients), the model matches a float64 oracle written here from
the math, token by token, and checkpoints read what the reference writes (round trips: tests/test_export.py).

Transformers has no Llamba class and the reference code needs GPU kernels, so `oracle_logits`
(bridge/llamba_oracle.py, which the training job also runs on its export) is the independent implementation: plain
NumPy, one token at a time, reading the HF-named tensors of the checkpoint kept_jax imports.
"""

import json
import math
import os
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from bridge.checkpoint import load_checkpoint
from bridge.llamba_oracle import oracle_logits
from kept_jax.errors import KeptError
from kept_jax.models import LlambaConfig, build_model, config_from_hf
from kept_jax.models.llamba import DiscreteMamba2
from tests import fixtures as fx

FP32_RELATIVE = 1e-5

# configs/models/tiny-llamba.json: tied, G = 2 < H = 4, expand 2, a vocabulary that pads (500 -> 504). Its variant:
# untied, one B/C group, silu after the convolution, no conv bias, MLP biases. Sequences of 21 tokens, chunks of 8.
UNTIED = dict(vocab_size=512, tie_embeddings=False, norm_epsilon=1e-6,
              mlp_cfg={"intermediate_size": 40, "bias": True, "act_fn": "silu"},
              ssm_cfg={"d_state": 6, "n_v_heads": 4, "n_qk_heads": 1, "expand": 1, "chunk_size": 8,
                       "activation": "silu", "bias": False, "d_conv": 3, "conv_bias": False})
CASES = {"tied-grouped-expand2": {}, "untied-one-group-silu": UNTIED}
TOKENS = np.random.default_rng(3).integers(0, 500, size=(2, 21))


def _hf_config(case):
    return {**fx.base_config("tiny-llamba"), **CASES[case]}


def random_tensors(hf: dict, seed: int = 0) -> dict[str, np.ndarray]:
    """HF-named fp32 tensors scaled so that every term matters: logits of std ~4, decays spread over (0, 1), gates
    and skips far from their neutral values."""
    rng = np.random.default_rng(seed)
    ssm, mlp = hf["ssm_cfg"], hf["mlp_cfg"]
    d, f = hf["d_model"], mlp["intermediate_size"]
    h, g, n, k = ssm["n_v_heads"], ssm["n_qk_heads"], ssm["d_state"], ssm["d_conv"]
    d_inner = ssm["expand"] * d
    channels = d_inner + 2 * g * n
    vocab = -(-hf["vocab_size"] // hf["pad_vocab_size_multiple"]) * hf["pad_vocab_size_multiple"]

    def normal(shape, std, mean=0.0):
        return (rng.standard_normal(shape) * std + mean).astype(np.float32)

    # A tied embedding is also the head: its scale sets the logits' (std ~4).
    embedding_std = 4 * d ** -0.5 if hf["tie_embeddings"] else 1.0
    t = {"backbone.embedding.weight": normal((vocab, d), embedding_std),
         "backbone.final_layernorm.weight": normal(d, 0.3, 1.0)}
    for i in range(hf["n_layer"]):
        p = f"backbone.layers.{i}."
        in_proj = normal((channels + d_inner + h, d), d ** -0.5)
        in_proj[channels + d_inner:] *= 1.5  # l: softplus(l) from ~0.2 to ~3, so a Delta-scaled input is visibly off
        t.update({
            p + "input_layernorm.weight": normal(d, 0.3, 1.0),
            p + "post_attention_layernorm.weight": normal(d, 0.3, 1.0),
            p + "mixer.in_proj.weight": in_proj, p + "mixer.z_bias": normal(d_inner, 1.0, 0.5),
            p + "mixer.conv1d.weight": normal((channels, 1, k), 0.6), p + "mixer.D": normal(h, 0.5, 1.0),
            p + "mixer.out_proj.weight": normal((d, d_inner), d_inner ** -0.5),
            p + "mlp.gate_proj.weight": normal((f, d), d ** -0.5), p + "mlp.up_proj.weight": normal((f, d), d ** -0.5),
            p + "mlp.down_proj.weight": normal((d, f), f ** -0.5),
        })
        if ssm["conv_bias"]:
            t[p + "mixer.conv1d.bias"] = normal(channels, 0.5)
        if mlp["bias"]:
            t.update({p + "mlp.gate_proj.bias": normal(f, 0.3), p + "mlp.up_proj.bias": normal(f, 0.3),
                      p + "mlp.down_proj.bias": normal(d, 0.3)})
    if not hf["tie_embeddings"]:
        t["lm_head.weight"] = normal((vocab, d), 4 * d ** -0.5)
    return t


def write_checkpoint(directory, hf: dict, tensors: dict[str, np.ndarray]) -> str:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(hf))
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    return str(directory)


def _relative_error(ours, reference) -> float:
    return float(np.abs(np.asarray(ours, np.float64) - reference).max() / np.abs(reference).max())


@pytest.fixture(scope="module", params=list(CASES))
def checkpoint(request, tmp_path_factory):
    hf = _hf_config(request.param)
    tensors = random_tensors(hf)
    path = write_checkpoint(tmp_path_factory.mktemp("llamba") / request.param, hf, tensors)
    return hf, tensors, path, oracle_logits(hf, tensors, TOKENS)


# ---- The model against the oracle -----------------------------------------------------------------


@pytest.mark.parametrize("form", ["chunked", "matrix", "recurrent"])
def test_model_matches_the_float64_oracle(checkpoint, form):
    hf, _, path, reference = checkpoint
    config, params, _ = load_checkpoint(path, mixer_form=form)
    logits = build_model(config).apply({"params": params}, jnp.asarray(TOKENS))
    assert logits.shape == reference.shape  # the padded vocabulary
    assert reference.std() > 1.0, "oracle logits are nearly flat; the comparison would prove little"
    assert _relative_error(logits, reference) <= FP32_RELATIVE
    np.testing.assert_array_equal(np.asarray(logits).argmax(-1), reference.argmax(-1))


# Each breaks one term of the oracle, in a copy of its source: (line as written, line broken).
ORACLE_MUTATIONS = {
    "no_D": ('y[head_index] += w[p + "mixer.D"][head_index] * x[head_index]', "pass"),
    "no_z_bias": ('z_bias = w[p + "mixer.z_bias"]', "z_bias = 0.0"),
    "no_conv_bias": ('if ssm["conv_bias"]:', "if False:"),
    # x scaled by softplus(l), as in Mamba-2's discretization
    "delta_input": ("x_in = x[head_index]  #", "x_in = x[head_index] * np.log1p(np.exp(ell[head_index]))  #"),
}


def mutated_oracle(mutation: str):
    """`oracle_logits` from a copy of bridge/llamba_oracle.py with one line broken (the product has no switch)."""
    import inspect

    import bridge.llamba_oracle as oracle

    source = inspect.getsource(oracle)
    line, broken = ORACLE_MUTATIONS[mutation]
    assert source.count(line) == 1, f"the oracle no longer has {line!r}; update ORACLE_MUTATIONS"
    namespace = {"__name__": "mutated_oracle"}
    exec(compile(source.replace(line, broken), "mutated_oracle", "exec"), namespace)
    return namespace["oracle_logits"]


@pytest.mark.parametrize("mutation", sorted(ORACLE_MUTATIONS))
def test_the_oracle_comparison_catches_a_broken_term(mutation):
    """Each term the math has is visible to the comparison above: drop it and the tolerance is missed by far."""
    hf = _hf_config("tied-grouped-expand2")
    tensors = random_tensors(hf)
    config = config_from_hf(hf)
    from bridge.hf_import import ArrayReader, params_from_reader

    params, _, _ = params_from_reader(ArrayReader(tensors), config)
    logits = build_model(config).apply({"params": params}, jnp.asarray(TOKENS[:1]))
    assert _relative_error(logits, oracle_logits(hf, tensors, TOKENS[:1])) <= FP32_RELATIVE
    assert _relative_error(logits, mutated_oracle(mutation)(hf, tensors, TOKENS[:1])) > 100 * FP32_RELATIVE


# ---- The mixer's three forms ----------------------------------------------------------------------


def _mixer():
    """A mixer (G < H, expand 2) with scaled random weights, and an input u [2, T, d]."""
    config = LlambaConfig(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=1, d_state=6,
                          n_v_heads=4, n_qk_heads=2, expand=2, chunk_size=8)
    module = DiscreteMamba2(config)
    u = jnp.asarray(np.random.default_rng(1).standard_normal((2, 21, 16)), jnp.float32)
    params = nn.unbox(module.init(jax.random.key(0), u[:, :2])["params"])
    rng = np.random.default_rng(2)
    def scaled(x):  # vectors ~0.5, matrices and kernels ~1/sqrt(fan-in)
        return jnp.asarray(rng.standard_normal(x.shape) * (0.5 if x.ndim < 2 else x.shape[0] ** -0.5), jnp.float32)

    params = jax.tree.map(scaled, params)
    return config, params, u


def _forward(config, form, params, u):
    return DiscreteMamba2(config.replace(mixer_form=form)).apply({"params": params}, u)


def _values_and_grads(config, form, params, u):
    """The output, and the gradients of a random projection of it with respect to the parameters and the input."""
    weights = jnp.asarray(np.random.default_rng(4).standard_normal((*u.shape[:2], config.hidden_size)), jnp.float32)

    def loss(p, x):
        out = _forward(config, form, p, x)
        return jnp.sum(out * weights), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(params, u)
    return out, grads


def _assert_close(ours, reference, what):
    for path, a, b in zip(jax.tree_util.tree_leaves_with_path(ours), jax.tree.leaves(ours), jax.tree.leaves(reference)):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        assert np.isfinite(a).all(), f"{what} {jax.tree_util.keystr(path[0])}: not finite"
        scale = np.abs(b).max()
        assert np.abs(a - b).max() <= FP32_RELATIVE * scale, (what, jax.tree_util.keystr(path[0]),
                                                              np.abs(a - b).max() / scale)


@pytest.mark.parametrize("length", [21, 5])  # not a multiple of the chunk; shorter than one chunk
def test_three_forms_agree_on_values_and_gradients(length):
    config, params, u = _mixer()
    u = u[:, :length]
    reference = _values_and_grads(config, "recurrent", params, u)
    for form in ("chunked", "matrix"):
        _assert_close(_values_and_grads(config, form, params, u), reference, form)


def test_extreme_decays_stay_finite_and_agree():
    """l = +-200 per head and token (a = e^-200 = 0 and a = 1 exactly): no NaN or Inf, forms and gradients agree."""
    config, params, u = _mixer()
    signs = np.random.default_rng(5).choice([-1.0, 1.0], size=u.shape[:2])
    u = u.at[..., 0].set(jnp.asarray(signs, jnp.float32))
    ell = slice(config.conv_channels + config.d_inner, None)
    kernel = np.zeros((config.hidden_size, config.n_v_heads), np.float32)
    kernel[0] = 200.0 * np.array([1, -1, 1, -1])
    params["in_proj"]["kernel"] = params["in_proj"]["kernel"].at[:, ell].set(kernel)
    _, _, _, _, log_a, _ = DiscreteMamba2(config).apply({"params": params}, u, None, method="_inputs")
    assert set(np.unique(np.round(np.exp(np.asarray(log_a)), 6))) == {0.0, 1.0}  # the test reaches both extremes
    reference = _values_and_grads(config, "recurrent", params, u)
    for form in ("chunked", "matrix"):
        _assert_close(_values_and_grads(config, form, params, u), reference, form)


def test_generation_steps_and_a_prefill_continue_the_sequence():
    """One token at a time from the start, and a prefill of 11 tokens (past a chunk, mid-way through the conv
    window) followed by single steps, give the full forward's outputs."""
    config, params, u = _mixer()
    module = DiscreteMamba2(config)
    full = np.asarray(_forward(config, "chunked", params, u))
    step = jax.jit(lambda state, x: module.apply({"params": params}, x, state, method="extend"))
    for prefill in (0, 11):
        outputs, state = [], None
        if prefill:
            out, state = module.apply({"params": params}, u[:, :prefill], None, method="extend")
            outputs.append(np.asarray(out))
        for t in range(prefill, u.shape[1]):
            out, state = step(state, u[:, t:t + 1])
            outputs.append(np.asarray(out))
        assert _relative_error(np.concatenate(outputs, axis=1), full) <= FP32_RELATIVE, prefill


@pytest.mark.parametrize("form", ["chunked", "recurrent"])
def test_mixing_matrix_is_what_the_mixer_applies(form):
    """MOHAWK's stage-1 matrix is the one the forward computes: y = M x per head (D on the diagonal) gives the
    chunked and the recurrent forward's output, and M is causal."""
    config, params, u = _mixer()
    module = DiscreteMamba2(config)
    m = module.apply({"params": params}, u, method="mixing_matrix")
    x, _, _, z, _, _ = module.apply({"params": params}, u, None, method="_inputs")
    y = jnp.einsum("bhts,bshp->bthp", m, x)
    out = module.apply({"params": params}, y - params["D"][:, None] * x, x, z, method="_output")
    assert _relative_error(out, np.asarray(_forward(config, form, params, u), np.float64)) <= FP32_RELATIVE
    assert np.all(np.asarray(m)[..., np.triu_indices(u.shape[1], 1)[0], np.triu_indices(u.shape[1], 1)[1]] == 0)


# ---- Checkpoints and configs ----------------------------------------------------------------------


def test_published_configs_read_with_the_reference_defaults():
    """A config as the reference saves it: ssm_cfg without d_conv/conv_bias, PretrainedConfig's own keys."""
    with open(os.path.join(fx.MODEL_CONFIGS, "llamba-8b.json")) as f:
        hf = json.load(f)
    del hf["ssm_cfg"]["d_conv"], hf["ssm_cfg"]["conv_bias"]
    hf.update(tie_word_embeddings=True, transformers_version="4.48.0", architectures=None)
    config = config_from_hf(hf)
    assert isinstance(config, LlambaConfig) and config.d_conv == 4 and config.conv_bias
    assert not config.tie_word_embeddings  # tie_embeddings decides, as in the reference
    assert (config.head_dim, config.d_inner, config.padded_vocab_size) == (128, 4096, 128256)


def test_num_params_matches_the_table_the_model_and_the_published_shapes():
    for name, expected in (("llamba-1b", 1_405_159_936), ("llamba-3b", 3_656_994_688), ("llamba-8b", 8_841_204_736)):
        with open(os.path.join(fx.MODEL_CONFIGS, f"{name}.json")) as f:
            config = config_from_hf(json.load(f))
        assert config.num_params() == sum(math.prod(s.hf_shape) for s in config.tensor_table()) == expected, name
    config = config_from_hf(_hf_config("untied-one-group-silu"))
    from kept_jax.models.params import abstract_params

    assert config.num_params() == sum(math.prod(x.shape) for x in jax.tree.leaves(abstract_params(config)))


@pytest.mark.parametrize("change, message", [
    ({"ssm_cfg": {"d_stat": 8}}, "config.json ssm_cfg has 'd_stat' (did you mean 'd_state'?)"),
    ({"norm_epsilo": 1e-6}, "config.json has 'norm_epsilo' (did you mean 'norm_epsilon'?)"),
    ({"lm_head_bias": True}, "lm_head_bias=True; kept_jax supports only False"),
    ({"ssm_cfg": {"bias": True}}, "ssm_cfg.bias=True"),
    ({"ssm_cfg": {"n_v_heads": 4, "n_qk_heads": 3}}, "must be a multiple of ssm_cfg.n_qk_heads"),
    ({"ssm_cfg": {"n_v_heads": 6, "n_qk_heads": 2}}, "must be a multiple of ssm_cfg.n_v_heads"),
    ({"ssm_cfg": {"activation": "relu"}}, "ssm_cfg.activation must be one of identity, silu"),
    ({"mlp_cfg": {"act_fn": "gelu"}}, "mlp_cfg.act_fn='gelu'"),
    ({"d_model": None}, "d_model must be a positive integer"),
])
def test_config_errors_name_the_problem(change, message):
    hf = _hf_config("tied-grouped-expand2")
    for key, value in change.items():
        hf[key] = {**hf[key], **value} if isinstance(value, dict) else value
    with pytest.raises(KeptError, match=re.escape(message)):
        config_from_hf(hf)


def test_missing_tensor_names_the_layout_flags(tmp_path):
    hf = _hf_config("tied-grouped-expand2")
    tensors = random_tensors(hf)
    del tensors["backbone.layers.1.mixer.conv1d.bias"]
    path = write_checkpoint(tmp_path / "ckpt", hf, tensors)
    with pytest.raises(KeptError, match=r"missing 1 tensor\(s\).*backbone.layers.1.mixer.conv1d.bias.*conv_bias=True"):
        load_checkpoint(path)
