"""`python -m kept_jax.convert --to llamba`: a Llama teacher -> a Llamba student without training, and its dry run at
the published 1B/3B/8B shapes."""

import json
import os

import numpy as np
import pytest

from bridge.checkpoint import load_checkpoint
from bridge.hf_import import CheckpointReader
from kept_jax import convert, score
from kept_jax.models import LlambaConfig
from kept_jax.models.llamba import DiscreteMamba2
from tests import fixtures as fx

SMALL = ["--eval-tokens", "1024", "--seq-len", "128"]


@pytest.fixture(scope="module")
def exports(llama_checkpoint, tmp_path_factory) -> dict[str, str]:
    """The tiny Llama converted with each mixer init: {init: directory}."""
    out = {}
    for init in ("mohawk", "attention"):
        out[init] = str(tmp_path_factory.mktemp("llamba") / init)
        assert convert.main(["--to", "llamba", "--source", llama_checkpoint[0], "--out", out[init],
                             "--mixer-init", init, *SMALL]) == 0
    return out


@pytest.fixture(params=["mohawk", "attention"])
def converted(request, exports, llama_checkpoint):
    return request.param, llama_checkpoint[0], exports[request.param]


def _tensors(directory):
    reader = CheckpointReader(directory)
    return {name: reader.read(name) for name in reader.names()}


def test_the_export_is_a_llamba_with_the_teachers_shared_weights(converted):
    init, source, out = converted
    hf = json.load(open(os.path.join(out, "config.json")))
    assert hf["model_type"] == "llamba" and hf["ssm_cfg"]["n_v_heads"] == 4
    assert hf["tie_embeddings"] is False and hf["vocab_size"] == 512
    teacher, student = _tensors(source), _tensors(out)
    copied = {"backbone.embedding.weight": "model.embed_tokens.weight", "lm_head.weight": "lm_head.weight",
              "backbone.final_layernorm.weight": "model.norm.weight"}
    for i in range(2):
        for name in ("input_layernorm.weight", "post_attention_layernorm.weight", "mlp.gate_proj.weight",
                     "mlp.up_proj.weight", "mlp.down_proj.weight"):
            copied[f"backbone.layers.{i}.{name}"] = f"model.layers.{i}.{name}"
    for target, source_name in copied.items():
        np.testing.assert_array_equal(student[target], teacher[source_name], err_msg=target)
    assert not any("self_attn" in name for name in student)
    # The tokenizer is the teacher's, byte for byte.
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert open(os.path.join(out, name), "rb").read() == open(os.path.join(source, name), "rb").read()


def test_the_mixers_start_as_the_recipe_says(converted):
    init, source, out = converted
    config, _, _ = load_checkpoint(out)
    teacher, student = _tensors(source), _tensors(out)
    d_inner, gn, conv = config.d_inner, config.n_qk_heads * config.d_state, config.conv_channels
    for i in range(config.num_hidden_layers):
        mixer = f"backbone.layers.{i}.mixer."
        in_proj = student[mixer + "in_proj.weight"]
        assert np.all(in_proj[conv:conv + d_inner] == 0)  # z rows: the gate is silu(z_bias) = 1
        z_bias = student[mixer + "z_bias"].astype(np.float64)
        np.testing.assert_allclose(z_bias / (1 + np.exp(-z_bias)), 1.0, rtol=1e-6)
        kernel = student[mixer + "conv1d.weight"]
        assert np.all(kernel[:, 0, -1] == 1) and np.all(kernel[:, 0, :-1] == 0)
        assert np.all(student[mixer + "conv1d.bias"] == 0)
        assert np.all(student[mixer + "D"] == 1)
        ell = in_proj[conv + d_inner:]
        assert ell.std() > 0.05  # default init, not zeros
        attn = f"model.layers.{i}.self_attn."
        if init == "attention":  # tiny Llama: 4 query heads, 2 KV heads of 16
            repeat = lambda w: np.repeat(w.reshape(2, 16, -1), 2, axis=0).reshape(64, -1)  # noqa: E731
            np.testing.assert_array_equal(in_proj[:d_inner], repeat(teacher[attn + "v_proj.weight"]))
            np.testing.assert_array_equal(in_proj[d_inner:d_inner + gn], repeat(teacher[attn + "k_proj.weight"]))
            np.testing.assert_array_equal(in_proj[d_inner + gn:conv], teacher[attn + "q_proj.weight"])
            np.testing.assert_array_equal(student[mixer + "out_proj.weight"], teacher[attn + "o_proj.weight"])
        else:
            bound = config.hidden_size ** -0.5
            assert np.abs(in_proj[:conv]).max() <= bound and in_proj[:conv].std() > bound / 3


def test_attention_init_mixes_like_unnormalized_linear_attention(exports, llama_checkpoint):
    """With the attention init, M[t, s] = (q_t . k_s) prod_{s<r<=t} a_r (+1 on the diagonal, D = 1): the teacher's
    attention scores without RoPE, scale or softmax, decayed."""
    config, params, _ = load_checkpoint(exports["attention"], scan_layers=False)
    teacher = _tensors(llama_checkpoint[0])
    mixer = params["backbone"]["layers"]["0"]["mixer"]
    u = np.random.default_rng(0).standard_normal((1, 6, config.hidden_size)).astype(np.float32)
    m = np.asarray(DiscreteMamba2(config).apply({"params": mixer}, u, method="mixing_matrix"))[0].astype(np.float64)
    u64 = u[0].astype(np.float64)
    q = (u64 @ teacher["model.layers.0.self_attn.q_proj.weight"].T).reshape(6, 4, 16)
    k = np.repeat((u64 @ teacher["model.layers.0.self_attn.k_proj.weight"].T).reshape(6, 2, 16), 2, axis=1)
    ell = u64 @ np.asarray(mixer["in_proj"]["kernel"], np.float64)[:, config.conv_channels + config.d_inner:]
    log_a = -np.logaddexp(0.0, ell)  # [T, H]
    decay = np.exp(np.array([[[log_a[s + 1:t + 1, h].sum() if s <= t else -np.inf for s in range(6)]
                              for t in range(6)] for h in range(4)]))
    expected = np.einsum("thd,shd->hts", q, k) * decay + np.eye(6)[None]
    assert np.abs(m - expected).max() <= 1e-5 * np.abs(expected).max()


def test_the_report_gives_kl_at_init_and_score_reads_the_export(converted, capsys):
    init, _, out = converted
    report = json.load(open(os.path.join(out, "conversion_report.json")))
    assert report["to"] == "llamba" and list(report["strategies"]) == [init]
    metrics = report["strategies"][init]
    assert metrics["tokens"] == 1024 - 1024 // 128  # scored positions: each row's last has no next token
    assert 0 < metrics["kl"] < 50 and 0 <= metrics["agreement"] <= 1
    assert "calibration" not in report
    capsys.readouterr()
    assert score.main(["--model", out, "--text", "Return a new list of the items."]) == 0
    printed = capsys.readouterr().out
    assert "(llamba," in printed and "perplexity" in printed


PUBLISHED = {  # teacher config, student config, teacher parameters (Meta's published counts)
    "1b": ("llama-3.2-1b-instruct", "llamba-1b", 1_235_814_400),
    "3b": ("llama-3.2-3b-instruct", "llamba-3b", 3_212_749_824),
    "8b": ("llama-3.1-8b-instruct", "llamba-8b", 8_030_261_248),
}


@pytest.mark.parametrize("size", list(PUBLISHED))
def test_dry_run_plans_the_published_sizes(size, capsys):
    teacher, student, teacher_params = PUBLISHED[size]
    assert convert.main(["--to", "llamba", "--dry-run", "--source", os.path.join(fx.MODEL_CONFIGS, f"{teacher}.json"),
                         "--target-config", os.path.join(fx.MODEL_CONFIGS, f"{student}.json")]) == 0
    printed = capsys.readouterr().out
    with open(os.path.join(fx.MODEL_CONFIGS, f"{student}.json")) as f:
        hf = json.load(f)
    d, layers, v, f_mlp = hf["d_model"], hf["n_layer"], hf["vocab_size"], hf["mlp_cfg"]["intermediate_size"]
    h, n = hf["ssm_cfg"]["n_v_heads"], hf["ssm_cfg"]["d_state"]
    # From the architecture's description: in_proj [d, 2d + 2 h n + h], z_bias d, conv (d + 2hn) x 5, D h,
    # out_proj d x d, MLP 3 d f, two norms; embedding; final norm; the head when untied (8B).
    per_layer = d * (2 * d + 2 * h * n + h) + d + (d + 2 * h * n) * 5 + h + d * d + 3 * d * f_mlp + 2 * d
    student_params = v * d + layers * per_layer + d + (0 if hf["tie_embeddings"] else v * d)
    assert f"{teacher_params:,} parameters" in printed and f"{student_params:,} parameters" in printed
    assert f"{layers * 4} source tensors dropped on purpose; every tensor covered" in printed
    assert isinstance(LlambaConfig.from_hf_dict(hf), LlambaConfig)
