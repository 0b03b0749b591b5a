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
    assert "model_type" not in hf and hf["ssm_cfg"]["n_v_heads"] == 4
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


def _official_llamba_loader():
    """A PyTorch module with the official `LlambaLMHeadModel`'s constructor signature, config handling and
    parameter names and shapes (cartesia-ai/edge, cartesia_pytorch/Llamba, written from its source; the real one
    needs mamba_ssm's GPU kernels), loaded the way the official class is: huggingface_hub's PyTorchModelHubMixin."""
    import torch
    from huggingface_hub import PyTorchModelHubMixin
    from torch import nn
    from transformers import PretrainedConfig

    class LlambaConfig(PretrainedConfig):  # the official signature: config.json's keys arrive as keyword arguments
        model_type = "llamba"

        def __init__(self, vocab_size, d_model, tie_embeddings=False, pad_vocab_size_multiple=8, lm_head_bias=False,
                     n_layer=32, resid_dropout=0.0, norm_epsilon=1e-5, mlp_cfg=None, ssm_cfg=None, **kwargs):
            super().__init__(**kwargs)
            self.vocab_size, self.d_model, self.tie_embeddings = vocab_size, d_model, tie_embeddings
            self.pad_vocab_size_multiple, self.lm_head_bias, self.n_layer = pad_vocab_size_multiple, lm_head_bias, n_layer
            self.resid_dropout, self.norm_epsilon, self.mlp_cfg, self.ssm_cfg = resid_dropout, norm_epsilon, mlp_cfg, ssm_cfg

    def mixer(d, d_state=64, n_qk_heads=32, n_v_heads=32, d_conv=4, expand=1, activation="identity", bias=False,
              conv_bias=True, chunk_size=128, dtype=None, **kwargs):
        m, d_inner = nn.Module(), expand * d
        conv_dim = d_inner + 2 * n_qk_heads * d_state
        m.in_proj = nn.Linear(d, 2 * d_inner + 2 * n_qk_heads * d_state + n_v_heads, bias=bias, dtype=dtype)
        m.z_bias = nn.Parameter(torch.zeros(d_inner, dtype=dtype))
        m.conv1d = nn.Conv1d(conv_dim, conv_dim, d_conv, groups=conv_dim, padding=d_conv - 1, bias=conv_bias,
                             dtype=dtype)
        m.D = nn.Parameter(torch.ones(n_v_heads, dtype=dtype))
        m.out_proj = nn.Linear(d_inner, d, bias=bias, dtype=dtype)
        return m

    def norm(d, dtype):
        m = nn.Module()
        m.weight = nn.Parameter(torch.ones(d, dtype=dtype))
        return m

    class LlambaLMHeadModel(nn.Module, PyTorchModelHubMixin):
        def __init__(self, config, initializer_cfg=None, device=None, dtype=None, **kwargs):
            super().__init__()
            if not isinstance(config, LlambaConfig):
                config = LlambaConfig(**config)
            self.config, self.received_dtype = config, dtype
            d, m = config.d_model, config.pad_vocab_size_multiple
            vocab = -(-config.vocab_size // m) * m
            self.backbone = nn.Module()
            self.backbone.embedding = nn.Embedding(vocab, d, dtype=dtype)
            self.backbone.layers = nn.ModuleList()
            for _ in range(config.n_layer):
                block = nn.Module()
                block.mixer = mixer(d, **config.ssm_cfg, dtype=dtype)
                block.input_layernorm, block.post_attention_layernorm = norm(d, dtype), norm(d, dtype)
                block.mlp = nn.Module()
                f, bias = config.mlp_cfg["intermediate_size"], config.mlp_cfg["bias"]
                block.mlp.gate_proj = nn.Linear(d, f, bias=bias, dtype=dtype)
                block.mlp.up_proj = nn.Linear(d, f, bias=bias, dtype=dtype)
                block.mlp.down_proj = nn.Linear(f, d, bias=bias, dtype=dtype)
                self.backbone.layers.append(block)
            self.backbone.final_layernorm = norm(d, dtype)
            if not config.tie_embeddings:
                self.lm_head = nn.Linear(d, vocab, bias=config.lm_head_bias, dtype=dtype)

    return LlambaLMHeadModel


def test_the_official_loader_opens_the_export_strictly(converted, capfd):
    """config.json holds the published fields and token ids only, so that no key lands on a constructor parameter of
    the official class (a "dtype" key became its dtype argument and broke the load); one model.safetensors, which is
    all the mixin reads; and Transformers' AutoTokenizer opens the directory without a warning about its type."""
    from transformers import AutoTokenizer

    _, _, out = converted
    assert set(json.load(open(os.path.join(out, "config.json")))) == {
        "vocab_size", "d_model", "n_layer", "tie_embeddings", "pad_vocab_size_multiple", "lm_head_bias",
        "norm_epsilon", "resid_dropout", "mlp_cfg", "ssm_cfg", "bos_token_id", "eos_token_id", "pad_token_id"}
    model = _official_llamba_loader().from_pretrained(out, strict=True)
    assert model.received_dtype is None
    tensors = _tensors(out)
    for name, value in model.state_dict().items():
        np.testing.assert_array_equal(value.numpy(), tensors[name], err_msg=name)
    capfd.readouterr()
    AutoTokenizer.from_pretrained(out)
    assert "to instantiate a model of type" not in capfd.readouterr().err


def test_an_export_with_a_dtype_key_breaks_the_official_loader(converted, tmp_path):
    """The loader above is the official one's: it fails as the official class failed on kept_jax's old exports."""
    import shutil

    _, _, out = converted
    old = str(tmp_path / "old")
    shutil.copytree(out, old)
    hf = json.load(open(os.path.join(old, "config.json")))
    json.dump({**hf, "dtype": "bfloat16"}, open(os.path.join(old, "config.json"), "w"))
    with pytest.raises(TypeError, match="must be torch.dtype, not str"):
        _official_llamba_loader().from_pretrained(old, strict=True)


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


def test_a_teacher_with_attention_biases_is_refused_for_what_kept_jax_lacks():
    from kept_jax.errors import KeptError
    from kept_jax.mapping.llamba_init import llamba_config_for
    from kept_jax.models import config_from_hf

    teacher = config_from_hf({**fx.base_config("tiny-llama"), "attention_bias": True})
    with pytest.raises(KeptError, match=r"attention biases \(attention_bias=true\)\. The official Llamba code can "
                                        r"hold them \(ssm_cfg\.bias=true"):
        llamba_config_for(teacher, "mohawk")
