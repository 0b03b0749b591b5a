"""`python -m kept_jax.convert --to hybrid`: a Llama into a Mamba-2/attention hybrid (kept_jax/mapping/hybrid_init.py).

An all-attention hybrid is its Llama (to fp32 rounding), the attention init reads q/k/v/o head by head as
documented, `auto:N`'s fast leave-one-out measurement equals converting and scoring each one-layer hybrid, and every
option a user can get wrong is refused in one line before any work.
"""

import json
import os

import numpy as np
import pytest

from bridge.checkpoint import load_checkpoint
from bridge.hf_import import ArrayReader, params_from_reader
from kept_jax import convert
from kept_jax.convert import run_mapping, source_tensor_reader
from kept_jax.errors import KeptError
from kept_jax.mapping.hybrid_init import evenly_spaced, parse_attention_layers
from kept_jax.mapping.layer_choice import leave_one_out_kl, most_costly
from kept_jax.mapping.students import student_config, student_mapping
from kept_jax.metrics import batches_of, compare
from kept_jax.models import build_model


def _convert(source, out, *flags):
    assert convert.main(["--to", "hybrid", "--source", source, "--out", str(out), "--eval-tokens", "2048",
                         "--seq-len", "64", *flags]) == 0
    return json.load(open(os.path.join(out, "conversion_report.json")))


def test_an_all_attention_hybrid_is_its_llama(llama_bpe_checkpoint, tmp_path):
    report = _convert(llama_bpe_checkpoint[0], tmp_path / "all", "--attention-layers", "all")
    metrics = report["strategies"]["mamba2"]  # the default init (no layer has one here)
    # The same weights; the MLP's gate and up as one product of twice the width round apart from the Llama's two in
    # fp32 (7.6e-10 here, 0 on SmolLM2-135M; a layer left out or mis-copied costs nats).
    assert metrics["kl"] <= 1e-9 and metrics["agreement"] == 1.0
    assert report["attention_layers"] == [0, 1]
    config, _, _ = load_checkpoint(str(tmp_path / "all"))
    assert config.architecture == "granitemoehybrid" and config.layer_types == ("attention", "attention")


def test_the_attention_init_reads_each_head(llama_bpe_checkpoint):
    """x <- W_V (each attention head's KV head, for both of its Mamba-2 heads), B <- mean W_K, C <- mean W_Q over a
    group's heads, out_proj <- W_O split between a head's two Mamba-2 heads, z and dt rows left at their init."""
    teacher, params, _ = load_checkpoint(llama_bpe_checkpoint[0])
    read = source_tensor_reader(llama_bpe_checkpoint[0])
    for groups in (1, 4):
        student = student_config("hybrid", teacher, "attention", None, (0,), groups)
        tensors, _ = run_mapping(student_mapping(teacher, student, "attention"), read, "float32")
        wq, wk, wv, wo = (read(f"model.layers.1.self_attn.{p}_proj.weight") for p in "qkvo")
        in_proj = tensors["model.layers.1.mamba.in_proj.weight"]
        inner, gn, hd = student.d_inner, groups * student.mamba_d_state, teacher.head_dim
        heads, kv = teacher.num_attention_heads, teacher.num_key_value_heads
        x = in_proj[inner:2 * inner].reshape(student.mamba_n_heads, hd, -1)
        for j in range(student.mamba_n_heads):  # mamba head j reads attention head j // 2, of KV head (j // 2) // 2
            kv_head = (j // 2) // (heads // kv)
            np.testing.assert_array_equal(x[j], wv.reshape(kv, hd, -1)[kv_head])
        keys = np.repeat(wk.reshape(kv, hd, -1), heads // kv, axis=0)
        b = in_proj[2 * inner:2 * inner + gn].reshape(groups, hd, -1)
        c = in_proj[2 * inner + gn:2 * inner + 2 * gn].reshape(groups, hd, -1)
        means = [w.astype(np.float64).reshape(groups, -1, hd, w.shape[-1]).mean(1) for w in (keys, wq)]
        np.testing.assert_allclose(b, means[0], rtol=0, atol=1e-7)  # float64 means, stored in float32
        np.testing.assert_allclose(c, means[1], rtol=0, atol=1e-7)
        out = tensors["model.layers.1.mamba.out_proj.weight"].reshape(-1, student.mamba_n_heads, hd)
        np.testing.assert_allclose(out[:, 0::2] + out[:, 1::2], wo.reshape(-1, heads, hd), rtol=0, atol=1e-7)
        np.testing.assert_array_equal(tensors["model.layers.0.self_attn.q_proj.weight"],
                                      read("model.layers.0.self_attn.q_proj.weight"))
        gate_up = tensors["model.layers.1.shared_mlp.input_linear.weight"]
        np.testing.assert_array_equal(gate_up, np.concatenate([read("model.layers.1.mlp.gate_proj.weight"),
                                                               read("model.layers.1.mlp.up_proj.weight")]))


def test_leave_one_out_equals_scoring_each_one_layer_hybrid(llama_bpe_checkpoint):
    """The one compiled program with the replaced layer picked at run time gives, for each layer, the KL of the
    hybrid whose only Mamba-2 layer it is, converted and scored as `convert` scores any student."""
    source = llama_bpe_checkpoint[0]
    teacher, params, _ = load_checkpoint(source)
    read = source_tensor_reader(source)
    rows = np.random.default_rng(0).integers(0, teacher.vocab_size, size=(4, 48)).astype(np.int32)
    mamba = student_config("hybrid", teacher, "attention", None, ())
    tensors, _ = run_mapping(student_mapping(teacher, mamba, "attention"), read, "float32")
    mamba_params, _, _ = params_from_reader(ArrayReader(tensors), mamba)
    fast = leave_one_out_kl(teacher, params, mamba, mamba_params, batches_of(rows, 2))
    for layer in range(teacher.num_hidden_layers):
        kept = tuple(i for i in range(teacher.num_hidden_layers) if i != layer)
        one = student_config("hybrid", teacher, "attention", None, kept)
        tensors, _ = run_mapping(student_mapping(teacher, one, "attention"), read, "float32")
        one_params, _, _ = params_from_reader(ArrayReader(tensors), one)
        slow = compare(build_model(teacher), params, build_model(one), one_params, batches_of(rows, 2))["kl"]
        assert fast[layer] == pytest.approx(slow, rel=1e-4), layer
    assert fast.min() > 0
    assert most_costly(np.array([0.5, 2.0, 2.0, 0.1]), 2) == (1, 2)
    assert most_costly(np.array([3.0, 1.0, 2.0]), 1) == (0,)


def test_auto_keeps_the_costliest_layer(llama_bpe_checkpoint, tmp_path):
    report = _convert(llama_bpe_checkpoint[0], tmp_path / "auto", "--attention-layers", "auto:1",
                      "--calib-tokens", "1024")
    costs = report["layer_choice"]["kl_when_replaced_alone"]
    assert len(costs) == 2 and report["attention_layers"] == [int(np.argmax(costs))]


@pytest.mark.parametrize("spec, layers, expected", [
    ("all", 4, (0, 1, 2, 3)), ("none", 4, ()), ("every:2", 5, (0, 2, 4)), ("3,1,3", 4, (1, 3)), ("auto:2", 4, 2),
])
def test_attention_layer_specs(spec, layers, expected):
    assert parse_attention_layers(spec, layers) == expected


def test_auto_plans_with_evenly_spaced_layers():
    assert evenly_spaced(8, 30) == (0, 4, 8, 12, 17, 21, 25, 29)
    assert evenly_spaced(1, 30) == (0,)


@pytest.mark.parametrize("flags, message", [
    (["--attention-layers", "4,9"], "layer 9 does not exist; the teacher has layers 0 to 1"),
    (["--attention-layers", "every:0"], "every:K needs K >= 1"),
    (["--attention-layers", "auto:3"], "auto:N needs 1 <= N <= 2"),
    (["--attention-layers", "half"], "is not a list of layers (0,8,16), every:K, auto:N, all or none"),
    (["--mixer-init", "mohawk"], "'mohawk' is not an init of a hybrid student; choose mamba2 or attention"),
    (["--mamba-groups", "0"], "--mamba-groups must be positive"),
    (["--mamba-groups", "3"], "mamba_n_heads (8) must be a multiple of mamba_n_groups (3)"),
    (["--calib-tokens", "512"], "--to hybrid reads calibration text only to choose the attention layers"),
    (["--opm", "exact"], "--opm does not apply to --to hybrid"),
])
def test_user_errors_get_one_line_before_any_work(flags, message, llama_bpe_checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    assert convert.main(["--to", "hybrid", "--source", llama_bpe_checkpoint[0], "--out", str(out), *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not out.exists()


def test_other_targets_refuse_hybrid_options(llama_bpe_checkpoint, tmp_path, capsys):
    assert convert.main(["--to", "llamba", "--source", llama_bpe_checkpoint[0], "--out", str(tmp_path / "o"),
                         "--attention-layers", "0"]) == 2
    assert "--attention-layers does not apply to --to llamba; it is for --to hybrid" in capsys.readouterr().err


def test_the_dry_run_plans_a_hybrid(capsys):
    assert convert.main(["--to", "hybrid", "--source", "configs/models/smollm2-135m-instruct.json", "--dry-run",
                         "--attention-layers", "auto:8"]) == 0
    out = capsys.readouterr().out
    assert "8 evenly spaced ones" in out and "attention layers: 0, 4, 8, 12, 17, 21, 25, 29" in out
    assert "every tensor covered" in out
