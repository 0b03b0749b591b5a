"""ModelConfig reads what Transformers writes, in both rope forms, and refuses what it cannot run."""

import json

import pytest
from transformers import LlamaConfig

from bridge.checkpoint import load_config
from kept_jax.models import config_from_hf
from kept_jax.models.layers import RopeConfig
from kept_jax.errors import KeptError

ROPES = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "factor": 3.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64},
}
SIZES = dict(vocab_size=100, hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=6)


@pytest.mark.parametrize("rope", ROPES)
def test_reads_transformers_config_json(rope, tmp_path):
    hf = LlamaConfig(**SIZES, num_key_value_heads=2, rope_theta=5e5, rope_scaling=ROPES[rope] and dict(ROPES[rope]), attention_bias=True,
                     tie_word_embeddings=True, rms_norm_eps=1e-5, max_position_embeddings=256)
    hf.save_pretrained(tmp_path)
    config = load_config(tmp_path)
    assert (config.architecture, config.num_key_value_heads, config.head_dim) == ("llama", 2, 8)
    assert config.rope.type == rope and config.rope.theta == 5e5
    assert config.attention_bias and not config.mlp_bias and config.tie_word_embeddings
    assert config.rms_norm_eps == 1e-5 and config.max_position_embeddings == 256
    if rope != "default":
        assert config.rope.factor == ROPES[rope]["factor"]


@pytest.mark.parametrize("rope", ROPES)
def test_v5_and_older_rope_forms_agree(rope):
    base = dict(model_type="llama", **SIZES)
    v5 = {**base, "rope_parameters": {"rope_type": "default", "rope_theta": 5e7, **(ROPES[rope] or {})}}
    old = {**base, "rope_theta": 5e7, "rope_scaling": ROPES[rope] and {
        ("type" if k == "rope_type" else k): v for k, v in ROPES[rope].items()}}
    assert config_from_hf(v5).rope == config_from_hf(old).rope


@pytest.mark.parametrize("rope", ROPES)
def test_round_trip_writes_both_rope_forms(rope):
    config = config_from_hf({"model_type": "orion", **SIZES, "rope_theta": 5e7, "rope_scaling": ROPES[rope]})
    hf = json.loads(json.dumps(config.to_hf_dict()))
    assert hf["rope_theta"] == 5e7 and hf["rope_parameters"]["rope_theta"] == 5e7
    assert hf.get("rope_scaling") == (None if rope == "default" else hf["rope_parameters"])
    assert config_from_hf(hf) == config
    assert config_from_hf({k: v for k, v in hf.items() if k not in ("rope_theta", "rope_scaling")}) == config


def test_orion_layernorm_eps_comes_from_rms_norm_eps():
    assert config_from_hf({"model_type": "orion", **SIZES, "rms_norm_eps": 1e-5}).rms_norm_eps == 1e-5
    assert config_from_hf({"model_type": "orion", **SIZES}).norm == "layernorm"


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "unsupported rope type 'yarn'"),
        ({"rope_scaling": {"type": "longrope", "factor": 4.0}}, "unsupported rope type 'longrope'"),
        ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4}, "rope_theta": 5e7}, "disagrees with itself"),
        ({"rope_parameters": {"rope_type": "linear", "factor": 2.0}, "rope_scaling": {"type": "dynamic", "factor": 2.0}},
         "disagrees with itself"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "needs low_freq_factor, high_freq_factor"),
        ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
        ({"sliding_window": 4096}, "sliding_window=4096"),
        ({"partial_rotary_factor": 0.5}, "partial_rotary_factor=0.5"),
        ({"rms_norm_epsilon": 1e-6}, "did you mean 'rms_norm_eps'"),
        ({"num_hiden_layers": 3}, "did you mean 'num_hidden_layers'"),
        ({"quantization_config": {"quant_method": "gptq"}}, "quantization_config (gptq)"),
        ({"model_type": "mistral"}, "model_type 'mistral'"),
        ({"num_key_value_heads": 4}, "must be a multiple of num_key_value_heads"),
        ({"hidden_size": 50}, "not divisible by num_attention_heads"),
    ],
)
def test_rejects_what_would_change_the_math(changes, message):
    with pytest.raises(KeptError) as info:
        config_from_hf({"model_type": "llama", **SIZES, **changes})
    assert message in str(info.value)


# Keys of real config.json files that only describe: Transformers 5.24's for a model loaded from GGUF, an Orion
# checkpoint's, other tools'.
METADATA = {"_model_name_or_path": "Smollm2 135M 8k Lc100K Mix1 Ep2", "unk_token_id": 0, "transformers_version": "5.24.0",
            "max_sequence_length": 4096, "qk_layernorm": True, "auto_map": {"AutoConfig": "x.Config"},
            "some_future_key": [1, 2]}


@pytest.mark.parametrize("key", METADATA)
def test_keys_the_reference_does_not_read_are_metadata(key):
    plain = config_from_hf({"model_type": "llama", **SIZES})
    assert config_from_hf({"model_type": "llama", **SIZES, key: METADATA[key]}) == plain


def test_every_key_of_transformers_llama_is_read_fixed_or_without_effect():
    """The rule's list of keys that change the math is Transformers' LlamaConfig's own: a key Transformers adds there
    fails this test until kept_jax reads it, refuses it, or says why it has no effect."""
    import dataclasses

    from transformers import PreTrainedConfig

    from kept_jax.models.llama import FIXED_HF_KEYS, NO_EFFECT_HF_KEYS, READ_HF_KEYS

    own = {f.name for f in dataclasses.fields(LlamaConfig)} - {f.name for f in dataclasses.fields(PreTrainedConfig)}
    assert own and own - READ_HF_KEYS - set(FIXED_HF_KEYS) - NO_EFFECT_HF_KEYS == set()


def test_runtime_choices_are_validated():
    config = config_from_hf({"model_type": "llama", **SIZES})
    with pytest.raises(KeptError, match="did you mean 'save-dots'"):
        config.replace(remat_policy="save_dots")
    with pytest.raises(KeptError, match="compute_dtype"):
        config.replace(compute_dtype="float64")


def test_llama3_original_length_defaults_to_max_positions_like_transformers():
    rope = config_from_hf({
        "model_type": "llama", **SIZES, "max_position_embeddings": 4096,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}}).rope
    assert rope == RopeConfig("llama3", 10000.0, 8.0, 1.0, 4.0, 4096)


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("arch", ["llama", "orion"])
def test_num_params_matches_the_tensor_table_and_the_model(arch, tied):
    import math

    import jax
    from kept_jax.models.params import abstract_params

    config = config_from_hf({"model_type": arch, **SIZES, "num_key_value_heads": 2, "mlp_bias": True,
                                       "attention_bias": True, "tie_word_embeddings": tied})
    from_table = sum(math.prod(s.hf_shape) for s in config.tensor_table())
    from_model = sum(math.prod(x.shape) for x in jax.tree.leaves(abstract_params(config)))
    assert config.num_params() == from_table == from_model
