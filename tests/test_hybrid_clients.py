"""A hybrid's export, checked by the runtimes that load GraniteMoeHybrid: MLX-LM (`mlx_lm.load` on MLX's Linux CPU
wheels) gives kept_jax's logits and greedy tokens. Transformers is checked in tests/test_hybrid.py and by every
hybrid job (bridge.verify); llama.cpp, which must be built, in the slow tests of tests/test_llama_cpp.py.

MLX-LM normalizes the Mamba-2 gated norm over the whole inner width, as Transformers does with one B/C group: with
more groups it differs from Transformers and kept_jax, which normalize each group. The second test keeps that
known difference in view (docs/hybrid.md says which clients run what).
"""

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core", reason="MLX (pip install 'mlx[cpu]') runs MLX-LM on Linux")
mlx_lm = pytest.importorskip("mlx_lm", reason="pip install mlx-lm")

import jax  # noqa: E402

from bridge.checkpoint import load_checkpoint  # noqa: E402
from bridge.hf_export import write_params  # noqa: E402
from kept_jax.decoding import Generator  # noqa: E402
from kept_jax.models import build_model  # noqa: E402
from tests import fixtures as fx  # noqa: E402
from tests.test_hybrid import hf_config  # noqa: E402


def _export(tmp_path, groups: int) -> str:
    """A random fp32 hybrid (mamba, attention, mamba) written by kept_jax's export, with a byte-level tokenizer."""
    model = fx.make_hybrid({**hf_config("mixed-one-group"), "mamba_n_groups": groups}, seed=4)
    source = str(tmp_path / "source")
    model.save_pretrained(source)
    config, params, _ = load_checkpoint(source)
    out = tmp_path / "export"
    out.mkdir()
    write_params(str(out), params, config, "float32")
    fx.add_byte_level_tokenizer(str(out), config.vocab_size)
    return str(out)


def _mlx_logits(model, ids: np.ndarray) -> np.ndarray:
    return np.array(model(mx.array(ids)).astype(mx.float32))


def test_mlx_lm_loads_the_export_with_kept_jaxs_logits_and_greedy_tokens(tmp_path):
    path = _export(tmp_path, groups=1)
    model, tokenizer = mlx_lm.load(path)
    model.set_dtype(mx.float32)
    config, params, _ = load_checkpoint(path)
    ids = np.random.default_rng(0).integers(0, config.vocab_size, size=(2, 40)).astype(np.int32)
    ours = np.asarray(jax.jit(build_model(config).apply)({"params": params}, ids))
    assert ours.std() > 1.0
    assert np.abs(_mlx_logits(model, ids) - ours).max() <= 1e-5 * np.abs(ours).max()

    from mlx_lm.generate import generate_step
    from mlx_lm.sample_utils import make_sampler

    prompt = tokenizer.encode("Return a new exception.")
    theirs = [int(t) for (t, _), _ in zip(generate_step(mx.array(prompt), model, max_tokens=24,
                                                        sampler=make_sampler(temp=0.0)), range(24))]
    generator = Generator(config)
    assert generator.generate(generator.prepare(params), [prompt], 24).tokens[0] == theirs


def test_mlx_lm_normalizes_the_gated_norm_over_the_whole_width(tmp_path):
    """With 2 B/C groups MLX-LM's logits leave kept_jax's (and Transformers') by far: docs/hybrid.md tells users
    to keep one group for MLX-LM, which `convert --to hybrid` does by default."""
    path = _export(tmp_path, groups=2)
    model, _ = mlx_lm.load(path)
    model.set_dtype(mx.float32)
    config, params, _ = load_checkpoint(path)
    assert config.mamba_n_groups == 2
    ids = np.random.default_rng(1).integers(0, config.vocab_size, size=(1, 32)).astype(np.int32)
    ours = np.asarray(build_model(config).apply({"params": params}, ids))
    assert np.abs(_mlx_logits(model, ids) - ours).max() > 1e-2 * np.abs(ours).max()
