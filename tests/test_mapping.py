"""Mapping completeness, and conversions that must be exact, checked through Transformers' Llama."""

import dataclasses
import json
import os

import numpy as np
import pytest
import torch
from transformers import LlamaForCausalLM

from kept_jax import convert
from kept_jax.mapping import STRATEGIES, MappingError, build_mapping
from kept_jax.mapping.rules import identity
from kept_jax.models import config_from_hf
from tests import fixtures as fx

TOKENS = np.random.default_rng(5).integers(0, 512, size=(2, 32))


@pytest.fixture(scope="module")
def orion_config():
    return config_from_hf(fx.base_config("tiny-orion"))


@pytest.mark.parametrize("strategy", ["copy", "center"])
def test_strategies_without_statistics_are_complete(orion_config, strategy):
    mapping = build_mapping(strategy, orion_config)
    mapping.check()
    assert set(mapping.dropped) == {f"model.layers.{i}.{s}.bias" for i in range(2)
                                    for s in ("input_layernorm", "post_attention_layernorm")} | {"model.norm.bias"}


def test_completeness_errors_are_caught(orion_config):
    base = build_mapping("copy", orion_config)
    missing = dataclasses.replace(base, rules=base.rules[1:])
    with pytest.raises(MappingError, match="no rule produces target 'model.embed_tokens.weight'"):
        missing.check()
    duplicate = dataclasses.replace(base, rules=base.rules + [base.rules[3]])
    with pytest.raises(MappingError, match=f"target '{base.rules[3].target}' is produced by 2 rules"):
        duplicate.check()
    forgotten = dataclasses.replace(base, dropped={k: v for k, v in base.dropped.items() if k != "model.norm.bias"})
    with pytest.raises(MappingError, match="source 'model.norm.bias' is neither used nor dropped"):
        forgotten.check()
    unknown = dataclasses.replace(base, rules=base.rules[:-1] + [identity("lm_head.weight"), identity("lm_head.bias")])
    with pytest.raises(MappingError, match="'lm_head.bias', which the target model does not have"):
        unknown.check()


def _orion_dir(tmp_path, sp_model, edit):
    """A tiny random Orion (rescaled weights, non-trivial gammas/betas/means) with `edit` applied to its torch model."""
    model = fx.make_orion_reference(fx.base_config("tiny-orion"), seed=3)
    with torch.no_grad():
        edit(model)
    path = fx.save_orion(model, str(tmp_path / "orion"))
    fx.add_orion_tokenizer(path, sp_model)
    return path, model


def _convert(source, out, strategy, dtype="float32"):
    rc = convert.main(["--source", source, "--out", out, "--opm", strategy, "--dtype", dtype,
                       "--calib-tokens", "4096", "--eval-tokens", "2048", "--seq-len", "128"])
    assert rc == 0
    with open(os.path.join(out, "conversion_report.json")) as f:
        return json.load(f)


def _kl(p_logits, q_logits):
    lp, lq = torch.log_softmax(p_logits.double(), -1), torch.log_softmax(q_logits.double(), -1)
    return float((lp.exp() * (lp - lq)).sum(-1).mean())


def _zero_norm_biases(model, final=True, layers=True):
    for name, p in model.named_parameters():
        if name.endswith("layernorm.bias") and layers or name == "model.norm.bias" and final:
            p.zero_()


def test_exact_matches_orion_through_transformers_llama(tmp_path, sp_model):
    source, orion = _orion_dir(tmp_path, sp_model, lambda m: m.model.norm.bias.zero_())
    report = _convert(source, str(tmp_path / "llama"), "exact")
    llama = LlamaForCausalLM.from_pretrained(tmp_path / "llama", dtype=torch.float32).eval()
    assert llama.config.attention_bias and llama.config.mlp_bias
    teacher, converted = fx.torch_logits(orion, TOKENS), fx.torch_logits(llama, TOKENS)
    assert teacher.std() > 1.0
    assert _kl(teacher, converted) <= 1e-6
    assert torch.equal(teacher.argmax(-1), converted.argmax(-1))
    assert report["strategies"]["exact"]["kl"] <= 1e-6
    # The same model without recentering and biases is far off: the test can tell.
    copy = _convert(source, str(tmp_path / "copy"), "copy")
    assert copy["strategies"]["copy"]["kl"] > 1e-3


def test_center_is_exact_when_every_beta_is_zero(tmp_path, sp_model):
    source, orion = _orion_dir(tmp_path, sp_model, _zero_norm_biases)
    _convert(source, str(tmp_path / "llama"), "center")
    llama = LlamaForCausalLM.from_pretrained(tmp_path / "llama", dtype=torch.float32).eval()
    assert not llama.config.attention_bias
    teacher, converted = fx.torch_logits(orion, TOKENS), fx.torch_logits(llama, TOKENS)
    assert _kl(teacher, converted) <= 1e-6
    assert torch.equal(teacher.argmax(-1), converted.argmax(-1))
    # Without recentering, the residual mean still separates LayerNorm from RMSNorm.
    assert _convert(source, str(tmp_path / "copy"), "copy")["strategies"]["copy"]["kl"] > 1e-3


def test_predicted_final_beta_cost_matches_measured_kl(tmp_path, sp_model):
    def only_final_beta(model):
        _zero_norm_biases(model, final=False)
        model.model.norm.bias.copy_(torch.randn(model.model.norm.bias.shape, generator=torch.Generator().manual_seed(0)) * 0.05)

    source, _ = _orion_dir(tmp_path, sp_model, only_final_beta)
    report = _convert(source, str(tmp_path / "center"), "center")
    measured, predicted = report["strategies"]["center"]["kl"], report["predicted_final_beta_kl"]
    assert measured > 1e-3  # the fixture's final beta costs something
    assert abs(predicted - measured) <= 0.2 * measured, (predicted, measured)


def test_every_strategy_is_complete_and_reported(tmp_path, orion_checkpoint):
    rc = convert.main(["--source", orion_checkpoint[0], "--out", str(tmp_path / "all"), "--opm", "all",
                       "--dtype", "float32", "--calib-tokens", "4096", "--eval-tokens", "2048", "--seq-len", "128"])
    assert rc == 0
    assert sorted(os.listdir(tmp_path / "all")) == ["conversion_report.json", "conversion_report.md"]
    with open(tmp_path / "all" / "conversion_report.json") as f:
        report = json.load(f)
    kl = {s: report["strategies"][s]["kl"] for s in STRATEGIES}
    # Each step of the ladder helps on a model with non-zero betas and residual means.
    assert kl["exact"] < kl["absorb"] < kl["center-lsq"] < kl["center"]
    assert kl["lsq"] < kl["copy"]
    assert kl["exact"] * 100 < kl["copy"]
