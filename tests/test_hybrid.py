"""Mamba-2/attention hybrids (kept_jax/models/hybrid.py) against Transformers' GraniteMoeHybridForCausalLM, the
independent implementation: logits of random models covering every option, the Mamba-2 mixer's three forms
(values and gradients), step-by-step decoding against the full forward, greedy generation against Transformers'
`generate`, export round trips that Transformers loads, and mutations of kept_jax's own math that the parity
comparison must catch.
"""

import dataclasses
import inspect
import json
import sys
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, GraniteMoeHybridConfig

import kept_jax.models.hybrid as hybrid
from bridge.checkpoint import load_checkpoint
from bridge.hf_export import write_params
from bridge.hf_import import ArrayReader, params_from_reader
from kept_jax.decoding import Generator
from kept_jax.errors import KeptError
from kept_jax.models import abstract_params, build_model, config_from_hf, init_params
from tests import fixtures as fx
from tests.test_generate import _hf_greedy, _teacher_forced_errors

# Of the logits' largest magnitude (the tests' logits have std ~4). Measured: 2e-6 to 5e-6 with one B/C group; with a
# group per head the gated norm scales each head's 16 channels to unit RMS, so an fp32 cancellation inside one head's
# sum shows: up to 9.5e-5 (Transformers' own fp32 is 6e-4 off its float64 there).
FP32_RELATIVE = 1e-4
SAME_MATH = 1e-5  # kept_jax against itself: forms, decoding
TOKENS = np.random.default_rng(0).integers(0, 512, size=(2, 21))  # 21: not a multiple of the chunk (8)

LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
# configs/models/tiny-hybrid.json (mamba, attention, mamba; GQA 4/2; 8 Mamba-2 heads of 16, d_state 16, one group,
# chunks of 8, untied) and variants that between them take every option at least once.
CASES = {
    "mixed-one-group": {},
    "mixed-group-per-head": {"mamba_n_groups": 8},
    "all-attention-biases": {"layer_types": ["attention"] * 3, "attention_bias": True},
    "all-mamba-proj-bias-no-conv-bias": {"layer_types": ["mamba"] * 3, "mamba_proj_bias": True,
                                         "mamba_conv_bias": False, "mamba_d_conv": 3},
    "tied-multipliers-nope": {"tie_word_embeddings": True, "embedding_multiplier": 2.0, "residual_multiplier": 0.7,
                              "logits_scaling": 3.0, "attention_multiplier": 0.1, "position_embedding_type": "nope"},
    "two-groups-llama3-rope": {"layer_types": ["attention", "mamba", "mamba"], "mamba_n_groups": 2,
                               "rope_parameters": LLAMA3_ROPE, "time_step_limit": [0.05, 2.0]},
}


def hf_config(case: str) -> dict:
    return {**fx.base_config("tiny-hybrid"), **CASES[case]}


def torch_logits(model, tokens, float64: bool = True) -> np.ndarray:
    """Transformers' logits without a cache (its cache needs an attention layer), by default from a float64 copy
    of the model: the fp32 kept_jax is compared with the math, not with Transformers' own fp32 rounding, which the
    gated norm over small groups amplifies (6e-4 against float64 in the group-per-head case; kept_jax 1.2e-4)."""
    import copy

    reference = copy.deepcopy(model).double() if float64 else model
    with torch.no_grad():
        return reference(input_ids=torch.as_tensor(tokens), use_cache=False).logits.double().numpy()


@pytest.fixture(scope="module", params=list(CASES))
def checkpoint(request, tmp_path_factory):
    """(case, Transformers model, its saved directory)."""
    model = fx.make_hybrid(hf_config(request.param), seed=len(request.param))
    path = str(tmp_path_factory.mktemp("hybrid") / request.param)
    model.save_pretrained(path)
    return request.param, model, path


def _logits(config, params, tokens=TOKENS) -> np.ndarray:
    return np.asarray(jax.jit(build_model(config).apply)({"params": params}, jnp.asarray(tokens)))


def _relative_error(ours, ref) -> float:
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def _assert_parity(ours, ref):
    assert ref.std() > 1.0, "fixture logits are nearly flat; parity would prove little"
    assert _relative_error(ours, ref) <= FP32_RELATIVE, _relative_error(ours, ref)
    np.testing.assert_array_equal(ours.argmax(-1), ref.argmax(-1))


@pytest.mark.parametrize("form", ["chunked", "matrix", "recurrent"])
def test_logits_equal_transformers(checkpoint, form):
    case, model, path = checkpoint
    config, params, _ = load_checkpoint(path, mixer_form=form)
    _assert_parity(_logits(config, params), torch_logits(model, TOKENS))


def test_config_reads_what_transformers_wrote(checkpoint):
    case, model, path = checkpoint
    config, _, _ = load_checkpoint(path)
    hf = hf_config(case)
    assert config.layer_types == tuple(hf["layer_types"])  # Transformers wrote linear_attention/full_attention
    assert config.time_step_limit == tuple(hf.get("time_step_limit", (0.0, float("inf"))))  # {"__float__": ...}
    assert config.scan_layers == (len(set(config.layer_types)) == 1)  # two kinds of layer run as a loop
    assert config.num_params() == sum(p.numel() for p in model.parameters()) == sum(
        int(np.prod(x.shape)) for x in jax.tree.leaves(abstract_params(config)))


def test_export_round_trip_is_bit_identical_and_transformers_reads_it(checkpoint, tmp_path):
    case, model, path = checkpoint
    config, params, _ = load_checkpoint(path)
    write_params(str(tmp_path), params, config, "float32")
    written = json.loads((tmp_path / "config.json").read_text())
    assert set(written["layer_types"]) <= {"mamba", "attention"}  # what MLX-LM reads
    assert written["intermediate_size"] == written["shared_intermediate_size"]  # MLX-LM's dense MLP size
    again, loaded, _ = load_checkpoint(str(tmp_path))
    assert again == config
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(loaded)):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path), trust_remote_code=False).eval()
    assert type(reloaded).__name__ == "GraniteMoeHybridForCausalLM"
    _assert_parity(_logits(config, params), torch_logits(reloaded, TOKENS))


def test_config_keys_are_those_transformers_reads():
    """Every GraniteMoeHybridConfig field is read, fixed to a supported value, or of no effect on a dense model."""
    fields = {f.name for f in dataclasses.fields(GraniteMoeHybridConfig)} - {"transformers_version", "architectures"}
    known = hybrid.READ_HF_KEYS | set(hybrid.FIXED_HF_KEYS) | hybrid.NO_EFFECT_HF_KEYS
    assert not {f for f in fields if not f.startswith("_")} - known - {
        "output_hidden_states", "return_dict", "dtype", "chunk_size_feed_forward", "is_encoder_decoder",
        "problem_type", "id2label", "label2id", "tokenizer_class", "prefix", "sep_token_id", "decoder_start_token_id",
        "task_specific_params", "tie_encoder_decoder", "add_cross_attention", "cross_attention_hidden_size",
        "finetuning_task", "output_attentions", "pruned_heads", "torchscript"}


@pytest.mark.parametrize("change, message", [
    ({"num_local_experts": 8}, "mixture-of-experts"),
    ({"num_local_experts": None}, "mixture-of-experts"),
    ({"layer_types": ["mamba", "cross_attention", "mamba"]}, "layer_types must be a list"),
    ({"layer_types": ["mamba"]}, "for each of the 3 layers"),
    ({"mamba_n_heads": 6}, "must equal mamba_expand x hidden_size"),
    ({"mamba_n_groups": 3}, "multiple of mamba_n_groups"),
    ({"position_embedding_type": "alibi"}, "position_embedding_type"),
    ({"time_step_limit": [1.0, 0.5]}, "0 <= low < high"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"mamba_dstate": 8}, "did you mean 'mamba_d_state'"),
    ({"head_dim": 32}, "hidden_size / heads wide"),
])
def test_config_errors_name_the_problem(change, message):
    with pytest.raises(KeptError, match=message):
        config_from_hf({**fx.base_config("tiny-hybrid"), **change})


# ---- Mutations of kept_jax's own math: the parity comparison must see each ---------------------------

# (line as written in kept_jax/models/hybrid.py, the line broken)
MUTATIONS = {
    "dt_off_the_input": ("ssd.mix(cfg.mixer_form, x * dt[..., None], B, C", "ssd.mix(cfg.mixer_form, x, B, C"),
    "norm_over_the_whole_width": ("self.norm = GatedRMSNorm(cfg.mamba_n_groups,", "self.norm = GatedRMSNorm(1,"),
    "in_proj_split_order": ("z, xbc, dt = jnp.split(self.in_proj(u), [cfg.d_inner, cfg.d_inner + cfg.conv_channels]",
                            "xbc, z, dt = jnp.split(self.in_proj(u), [cfg.conv_channels, cfg.d_inner + cfg.conv_channels]"),
    "no_conv_activation": ("xbc = jax.nn.silu(xbc)", "pass"),
}


def mutated_hybrid(mutation: str, monkeypatch):
    """A copy of kept_jax/models/hybrid.py with one line broken (the product has no switch), as a module."""
    source = inspect.getsource(hybrid)
    line, broken = MUTATIONS[mutation]
    assert source.count(line) == 1, f"hybrid.py no longer has {line!r}; update MUTATIONS"
    module = types.ModuleType("mutated_hybrid")
    monkeypatch.setitem(sys.modules, module.__name__, module)  # dataclasses look their module up
    exec(compile(source.replace(line, broken), module.__name__, "exec"), module.__dict__)
    return module


@pytest.mark.parametrize("mutation", sorted(MUTATIONS))
def test_parity_catches_a_broken_term(mutation, monkeypatch):
    hf = hf_config("mixed-group-per-head")
    model = fx.make_hybrid(hf, seed=1)
    reference = torch_logits(model, TOKENS[:1])
    tensors = {k: v.numpy() for k, v in model.state_dict().items()}
    config = config_from_hf(hf)
    params, _, _ = params_from_reader(ArrayReader(tensors), config)
    _assert_parity(_logits(config, params, TOKENS[:1]), reference)
    broken = mutated_hybrid(mutation, monkeypatch).HybridConfig.from_hf_dict(hf)
    ours = np.asarray(broken.model_class(broken).apply({"params": params}, jnp.asarray(TOKENS[:1])))
    assert _relative_error(ours, reference) > 100 * FP32_RELATIVE


# ---- The Mamba-2 mixer's forms ----------------------------------------------------------------------


def _mixer(groups=2):
    config = config_from_hf({**fx.base_config("tiny-hybrid"), "mamba_n_groups": groups})
    module = hybrid.Mamba2(config)
    u = jnp.asarray(np.random.default_rng(1).standard_normal((2, 21, config.hidden_size)), jnp.float32)
    params = nn.unbox(module.init(jax.random.key(0), u[:, :2])["params"])
    rng = np.random.default_rng(2)

    def scaled(path, x):  # matrices ~1/sqrt(fan-in); the decays of trained models (A 1..16, dt around 0.1 .. 2)
        name = jax.tree_util.keystr(path)
        if "A_log" in name:
            return jnp.log(1 + 15 * jnp.asarray(rng.random(x.shape), jnp.float32))
        scale = 0.5 if x.ndim < 2 else x.shape[0] ** -0.5
        return jnp.asarray(rng.standard_normal(x.shape) * scale + (1.0 if "norm" in name else 0.0), jnp.float32)

    return config, jax.tree_util.tree_map_with_path(scaled, params), u


def _values_and_grads(config, form, params, u):
    weights = jnp.asarray(np.random.default_rng(4).standard_normal((*u.shape[:2], config.hidden_size)), jnp.float32)

    def loss(p, x):
        out = hybrid.Mamba2(config.replace(mixer_form=form)).apply({"params": p}, x)
        return jnp.sum(out * weights), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(params, u)
    return out, grads


@pytest.mark.parametrize("length", [21, 5])  # not a multiple of the chunk; shorter than one chunk
def test_three_forms_agree_on_values_and_gradients(length):
    config, params, u = _mixer()
    u = u[:, :length]
    reference = _values_and_grads(config, "recurrent", params, u)
    for form in ("chunked", "matrix"):
        ours = _values_and_grads(config, form, params, u)
        for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(reference)):
            a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
            assert np.abs(a - b).max() <= SAME_MATH * np.abs(b).max(), form


def test_mixing_matrix_is_what_the_scan_computes():
    """MOHAWK's stage-1 matrix (dt, decays and D included) applied to x gives the chunked and recurrent outputs
    before the gated norm, and it is causal."""
    config, params, u = _mixer()
    module = hybrid.Mamba2(config)
    m = module.apply({"params": params}, u, method="mixing_matrix")
    x, _, _, z, _, _, _ = module.apply({"params": params}, u, None, method="_inputs")
    y = jnp.einsum("bhts,bshp->bthp", m, x)
    via_matrix = module.apply({"params": params}, y - params["D"][:, None] * x, x, z, method="_output")
    for form in ("chunked", "recurrent"):
        out = hybrid.Mamba2(config.replace(mixer_form=form)).apply({"params": params}, u)
        assert np.abs(np.asarray(via_matrix) - np.asarray(out)).max() <= SAME_MATH * np.abs(np.asarray(out)).max()
    upper = np.triu_indices(u.shape[1], 1)
    assert np.all(np.asarray(m)[..., upper[0], upper[1]] == 0)


# ---- Generation ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["mixed-one-group", "two-groups-llama3-rope"])
def test_decoded_logits_equal_the_full_forward(case, tmp_path):
    """Prefills of 5, 1 and 2 tokens in one right-padded batch, then one token at a time: the attention layers'
    KV caches and the Mamba-2 layers' states (conv window, fp32 state) continue each row as the full forward."""
    model = fx.make_hybrid(hf_config(case), seed=2)
    model.save_pretrained(str(tmp_path))
    config, params, _ = load_checkpoint(str(tmp_path))
    tokens = np.random.default_rng(3).integers(0, config.vocab_size, size=(3, 21)).astype(np.int32)
    errors = _teacher_forced_errors(config, params, tokens, [5, 1, 2])
    assert len(errors) == 1 + 21 - 5 and max(errors) <= SAME_MATH, errors


def test_greedy_generation_equals_transformers_batched_and_alone(tmp_path):
    model = fx.make_hybrid(hf_config("mixed-one-group"), seed=3)
    model.save_pretrained(str(tmp_path))
    config, params, _ = load_checkpoint(str(tmp_path))
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, config.vocab_size, n).tolist() for n in (7, 3, 12)]
    expected = [_hf_greedy(model, p, 10, None) for p in prompts]
    generator = Generator(config)
    params = generator.prepare(params)
    assert generator.generate(params, prompts, 10, steps_per_call=4).tokens == expected
    assert [generator.generate(params, [p], 10, prompt_length=12).tokens[0] for p in prompts] == expected


def test_a_homogeneous_hybrid_scans_its_layers():
    """All Mamba-2: scanned (one stacked block) and unrolled give the same logits."""
    hf = {**fx.base_config("tiny-hybrid"), "layer_types": ["mamba"] * 3}
    scanned = config_from_hf(hf)
    assert scanned.scan_layers
    params = init_params(scanned, jax.random.key(0))
    from kept_jax.models import unstack_layers

    unrolled = scanned.replace(scan_layers=False)
    a, b = _logits(scanned, params), _logits(unrolled, unstack_layers(params))
    assert np.abs(a - b).max() <= SAME_MATH * np.abs(a).max()
