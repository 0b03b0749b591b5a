"""`convert --to mlx`: the export that Cartesia's on-device runtime (cartesia-mlx) loads, checked by that runtime.

The runtime is the independent implementation: its own config tree, module tree, QuantizedLinear and generation
loop, run on MLX's Linux CPU wheels. It needs `mlx` (the test extra installs it) and `cartesia-mlx` installed
without its pins (`pip install --no-deps cartesia-mlx==0.0.2`: it pins mlx 0.22.1 and numpy<2, which these tests do
not need); the three Metal kernels it imports from `cartesia_metal` (Apple only) are replaced by
tests/cartesia_metal_substitute.py, which is checked against kept_jax's mixer first. Without either package the
runtime tests skip and say which to install; the refusals below run regardless.
"""

import json
import os

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from bridge.checkpoint import load_checkpoint
from bridge.mlx_export import WEIGHTS_FILE, planned_bytes, tensor_plan
from kept_jax import convert
from kept_jax.metrics import score, summarize
from kept_jax.models import build_model
from tests import fixtures as fx
from tests.test_llamba import random_tensors, write_checkpoint

RUNTIME_RELATIVE = 1e-3  # of the logit scale (max |logit|), as the issue asks; measured ~2e-6
VOCAB = 600  # the byte-level BPE fixture's
# Shapes the runtime can express (one B/C per head, norm epsilon 1e-5), wide enough for groups of 32 and 64. The
# second case: untied head, silu after the convolution, no convolution bias, MLP biases, a shorter window.
BASE = {**fx.base_config("tiny-llamba"), "vocab_size": VOCAB, "d_model": 64,
        "mlp_cfg": {"intermediate_size": 128, "bias": False, "act_fn": "silu"},
        "ssm_cfg": {"d_state": 8, "n_v_heads": 4, "n_qk_heads": 4, "expand": 2, "chunk_size": 8,
                    "activation": "identity", "bias": False, "d_conv": 4, "conv_bias": True}}
CASES = {"tied": BASE,
         "untied-silu-biases": {**BASE, "tie_embeddings": False,
                                "mlp_cfg": {**BASE["mlp_cfg"], "bias": True},
                                "ssm_cfg": {**BASE["ssm_cfg"], "activation": "silu", "d_conv": 3,
                                            "conv_bias": False}}}
TOKENS = np.random.default_rng(3).integers(0, VOCAB, size=(2, 21)).astype(np.int32)
PROMPTS = ["def main():", "import numpy as np", "The history of", "for i in range(", "class Tokenizer:"]


def _llamba_dir(directory, hf: dict) -> str:
    """A Llamba checkpoint of random weights that bfloat16 holds exactly (so a 16-bit export loses nothing and
    the comparison is of the implementations), with the byte-level BPE tokenizer."""
    tensors = {k: v.astype(ml_dtypes.bfloat16).astype(np.float32) for k, v in random_tensors(hf).items()}
    path = write_checkpoint(directory, hf, tensors)
    fx.add_byte_level_tokenizer(path, VOCAB)
    return path


@pytest.fixture(scope="module", params=list(CASES))
def llamba(request, tmp_path_factory) -> str:
    return _llamba_dir(tmp_path_factory.mktemp("llamba") / request.param, CASES[request.param])


@pytest.fixture(scope="module")
def runtime():
    """cartesia_mlx with the substitute kernels, or a skip naming what to install."""
    pytest.importorskip("mlx.core", reason="mlx is not installed: pip install 'mlx[cpu]>=0.22' (the test extra has it)")
    from tests import cartesia_metal_substitute

    cartesia_metal_substitute.install()
    return pytest.importorskip("cartesia_mlx", reason="cartesia-mlx is not installed: pip install --no-deps "
                               "cartesia-mlx==0.0.2")


def _export(source: str, out: str, *flags: str) -> str:
    assert convert.main(["--to", "mlx", "--source", source, "--out", out, *flags]) == 0
    return os.path.join(out, WEIGHTS_FILE)


def _kept_jax_logits(path: str, tokens=TOKENS) -> np.ndarray:
    config, params, _ = load_checkpoint(path)
    return np.asarray(build_model(config).apply({"params": params}, jnp.asarray(tokens)))[..., :VOCAB]


def _runtime_logits(model, tokens=TOKENS) -> np.ndarray:
    """The runtime's full forward: its own embedding, layers and head."""
    import mlx.core as mx

    hidden, _ = model.model(model.embedding.encode(mx.array(tokens)))
    return np.array(model.head(hidden).astype(mx.float32))[..., :VOCAB]


def _relative(ours, reference) -> float:
    return float(np.abs(ours - reference).max() / np.abs(reference).max())


def test_the_substitute_kernels_compute_kept_jaxs_mixer(runtime):
    """The stand-ins, called as LlambaSSD calls them, against kept_jax's convolution and recurrence; the runtime's
    own pure-MLX prefill (`ssd_forward`) hands its state on to the stand-in step."""
    import jax
    import mlx.core as mx
    from cartesia_mlx.layers.ssd.ops import ssd_forward

    from kept_jax.models import ssd
    from tests.cartesia_metal_substitute import conv1d_forward, conv1d_update, ssd_update

    rng = np.random.default_rng(0)
    b, t, channels, k, h, p, n, split = 2, 11, 6, 4, 4, 3, 5, 7
    x, weight, bias = (rng.standard_normal(s).astype(np.float32) for s in ((b, t, channels), (channels, k),
                                                                          (channels,)))
    reference, _ = ssd.causal_conv(jnp.asarray(x), jnp.asarray(weight.T[:, None, :]), jnp.asarray(bias))
    empty = mx.zeros((b, channels, k - 1))
    first, state = conv1d_forward(mx.array(x[:, :split]), mx.array(weight), mx.array(bias), empty)
    rest = []
    for i in range(split, t):
        y, state = conv1d_update(mx.array(x[:, i]), mx.array(weight), mx.array(bias), state)
        rest.append(np.array(y))
    ours = np.concatenate([np.array(first), np.stack(rest, 1)], 1)
    assert _relative(ours, np.asarray(reference)) < 1e-6

    xs, ell = rng.standard_normal((b, t, h, p)).astype(np.float32), rng.standard_normal((b, t, h)).astype(np.float32)
    B, C = (rng.standard_normal((b, t, h, n)).astype(np.float32) for _ in range(2))
    reference, _ = ssd.ssd_recurrent(jnp.asarray(xs), jnp.asarray(B), jnp.asarray(C),
                                     -jax.nn.softplus(jnp.asarray(ell)))
    dt = np.log1p(np.exp(ell))[..., None]  # the runtime divides x by softplus(l); the kernel multiplies it back
    zeros = mx.zeros((h,))
    first, state = ssd_forward(mx.array(xs[:, :split] / dt[:, :split]), mx.array(ell[:, :split]), -mx.ones((h,)),
                               mx.array(B[:, :split]), mx.array(C[:, :split]), zeros, zeros, dt_min=0,
                               dt_max=float("inf"))
    rest = []
    for i in range(split, t):
        y, state = ssd_update(mx.array(xs[:, i] / dt[:, i]), mx.array(ell[:, i]), None, mx.array(B[:, i]),
                              mx.array(C[:, i]), zeros, None, dt_min=0, dt_max=float("inf"), state=state,
                              softplus=True, flip_A_sign=True)
        rest.append(np.array(y))
    ours = np.concatenate([np.array(first).reshape(b, split, h, p), np.stack(rest, 1)], 1)
    assert _relative(ours, np.asarray(reference)) < 1e-5


def test_the_runtime_reads_the_16_bit_export_as_kept_jax_computes_it(runtime, llamba, tmp_path):
    """Every position of a full forward, and the runtime's own prefill + step decoding, against kept_jax."""
    import mlx.core as mx

    model = runtime.from_pretrained(_export(llamba, str(tmp_path / "mlx"), "--bits", "16"))
    model.set_dtype(mx.float32)
    reference = _kept_jax_logits(llamba)
    assert _relative(_runtime_logits(model), reference) < RUNTIME_RELATIVE
    logits, state = model.prefill(mx.array(TOKENS[:, :5]))
    steps = [np.array(logits)]
    for i in range(5, TOKENS.shape[1]):
        logits, state = model.step(mx.array(TOKENS[:, i]), state)
        steps.append(np.array(logits))
    assert _relative(np.stack(steps, 1)[..., :VOCAB], reference[:, 4:]) < RUNTIME_RELATIVE


def test_the_runtimes_greedy_generation_equals_kept_jaxs(runtime, llamba, tmp_path):
    """Five prompts through the runtime's tokenizer (the copied tokenizer files) and its own generation loop
    (min_p = 1 keeps only the most likely token: its greedy), against kept_jax's greedy decoding."""
    import mlx.core as mx

    from kept_jax.decoding import Generator

    model = runtime.from_pretrained(_export(llamba, str(tmp_path / "mlx"), "--bits", "16"))
    model.set_dtype(mx.float32)
    config, params, _ = load_checkpoint(llamba)
    generator = Generator(config)
    params = generator.prepare(params)
    for prompt in PROMPTS:
        ids = model.tokenizer.tokenize([prompt])[0]
        theirs = list(model.generate_tokens(mx.array(ids), max_tokens=12, min_p=1.0))
        ours = generator.generate(params, [ids], 12).tokens[0]
        assert theirs == ours, prompt


def _dequantized_checkpoint(weights_file: str, source: str, out, group_size: int, bits: int) -> str:
    """A kept_jax checkpoint of the weights the runtime holds: each quantized layer dequantized by MLX, in fp32 as the
    runtime computes after `set_dtype(float32)` (dequantizing in the scales' bf16 would round the weights again)."""
    import mlx.core as mx

    config, _, _ = load_checkpoint(source)
    arrays = mx.load(weights_file)
    tensors = {}
    for name, hf_name, quantized in tensor_plan(config, quantize_head=False):
        if hf_name is None or hf_name in tensors:  # the runtime's zero conv bias; the tied head's copy
            continue
        if f"{name}.scales" in arrays:
            value = mx.dequantize(arrays[f"{name}.weight"], arrays[f"{name}.scales"].astype(mx.float32),
                                  arrays[f"{name}.biases"].astype(mx.float32), group_size=group_size, bits=bits)
        else:
            value = arrays[f"{name}.weight"] if f"{name}.weight" in arrays else arrays[name]
            if name.endswith("conv_weight"):
                value = value[:, None, :]
        tensors[hf_name] = np.array(value.astype(mx.float32))
    with open(os.path.join(source, "config.json"), encoding="utf-8") as f:
        return write_checkpoint(out, json.load(f), tensors)


@pytest.mark.parametrize("bits, group_size", [(4, 32), (8, 64)])
def test_a_quantized_export_is_its_dequantized_weights_and_costs_little(runtime, llamba, tmp_path, bits,
                                                                        group_size):
    """The runtime's quantized model computes what kept_jax computes on MLX's dequantized weights (the packing,
    scales and biases are read as written), and its KL from the 16-bit model is reported beside kept_jax's own
    quantization at the same bits (generate --quantize) on the same tokens."""
    import mlx.core as mx

    from kept_jax.quantize import quantize_params

    weights = _export(llamba, str(tmp_path / "mlx"), "--bits", str(bits), "--group-size", str(group_size))
    model = runtime.from_pretrained(weights)
    model.set_dtype(mx.float32)
    ours = _runtime_logits(model)
    dequantized = _dequantized_checkpoint(weights, llamba, tmp_path / "dequantized", group_size, bits)
    assert _relative(ours, _kept_jax_logits(dequantized)) < RUNTIME_RELATIVE
    assert sum(a.nbytes for a in mx.load(weights).values()) == planned_bytes(
        load_checkpoint(llamba)[0], bits, group_size, False)

    reference = _kept_jax_logits(llamba)
    config, params, _ = load_checkpoint(llamba)
    scheme = f"int{bits}"
    kept = np.asarray(build_model(config).apply({"params": quantize_params(config, params, scheme, group_size)},
                                                jnp.asarray(TOKENS)))[..., :VOCAB]
    kl = {name: float(summarize(score(jnp.asarray(reference), jnp.asarray(logits), jnp.asarray(TOKENS)))["kl"])
          for name, logits in (("cartesia-mlx", ours), (f"kept_jax {scheme}", kept))}
    print(f"KL(16-bit || quantized) per token, {bits}-bit, groups of {group_size}: {kl}")
    # MLX's affine groups (a scale and an offset per group) should cost no more than kept_jax's symmetric scheme.
    assert 0 < kl["cartesia-mlx"] < 2 * kl[f"kept_jax {scheme}"]


@pytest.mark.parametrize("change, flags, message", [
    ({"ssm_cfg": {**BASE["ssm_cfg"], "n_qk_heads": 2}}, [], "one B and C per head"),
    ({"norm_epsilon": 1e-6}, [], "epsilon 1e-05"),
    ({}, ["--group-size", "128"], "--group-size 128 does not divide the input size 64"),
    ({}, ["--mixer-init", "attention"], "--mixer-init does not apply to --to mlx; it is for --to llamba"),
    ({}, ["--eval-tokens", "64"], "--eval-tokens does not apply to --to mlx; it is for --to llama and --to llamba"),
])
def test_what_the_runtime_cannot_express_is_refused(tmp_path, capsys, change, flags, message):
    source = write_checkpoint(tmp_path / "llamba", {**BASE, **change}, {})  # refused before any tensor is read
    fx.add_byte_level_tokenizer(source, VOCAB)
    out = tmp_path / "out"
    assert convert.main(["--to", "mlx", "--source", source, "--out", str(out), *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and not out.exists()


def test_sources_and_outputs_it_cannot_use_are_refused(tmp_path, capsys, llama_checkpoint):
    assert convert.main(["--to", "mlx", "--source", llama_checkpoint[0], "--out", str(tmp_path / "a")]) == 2
    assert "--to mlx converts Llamba checkpoints" in capsys.readouterr().err
    assert convert.main(["--to", "llamba", "--bits", "4", "--source", llama_checkpoint[0],
                         "--out", str(tmp_path / "b")]) == 2
    assert "--bits does not apply to --to llamba; it is for --to mlx" in capsys.readouterr().err
    source = write_checkpoint(tmp_path / "llamba", BASE, {})
    fx.add_byte_level_tokenizer(source, VOCAB)
    (tmp_path / "file").write_text("not a directory")
    assert convert.main(["--to", "mlx", "--source", source, "--out", str(tmp_path / "file" / "out")]) == 2
    assert "which is a regular file" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["file", "llamba"]


def test_dry_run_plans_the_published_1b_at_4_bits(capsys):
    assert convert.main(["--to", "mlx", "--dry-run", "--source",
                         os.path.join(fx.MODEL_CONFIGS, "llamba-1b.json")]) == 0
    out = capsys.readouterr().out
    assert "cartesia-mlx Llamba" in out and "MiB at 4 bits" in out
