"""Byte-level BPE tokenizers (tokenizer.json, as SmolLM and Llama 3 ship them) through every command, against
Transformers' AutoTokenizer on the same files. The MOHAWK job test (tests/test_mohawk_job.py) runs both recipes'
conversions, the distillation and the export on a byte-level Orion."""

import json
import os

import pytest
import torch
from transformers import AutoTokenizer

from bridge.checkpoint import load_checkpoint_tokenizer
from kept_jax import convert, corpus, generate, score

PROBES = ("In 2024, 12345 apples cost $3.50.", "  two  spaces\tand a tab\nnew line", "café naïve 日本語 🙂",
          "ends with <|im_end|> inside", "x = 1234567.89")


def _texts() -> list[str]:
    return [doc[:3000] for doc in corpus.read_documents(corpus.HELDOUT)[:4]] + list(PROBES)


@pytest.mark.parametrize("which", ["llama", "orion"])
def test_ids_equal_transformers(which, llama_bpe_checkpoint, orion_bpe_checkpoint):
    path = (llama_bpe_checkpoint if which == "llama" else orion_bpe_checkpoint)[0]
    ours = load_checkpoint_tokenizer(path, which)
    reference = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    for text in _texts():
        assert ours.encode(text) == reference(text).input_ids, text


def test_score_equals_transformers_nll(llama_bpe_checkpoint, capsys):
    path, model = llama_bpe_checkpoint
    text = corpus.read_documents(corpus.HELDOUT)[0][:800]
    ids = AutoTokenizer.from_pretrained(path)(text).input_ids
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    nll = float(torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ids[1:])))
    assert score.main(["--model", path, "--text", text]) == 0
    out = capsys.readouterr().out
    assert f"tokens:     {len(ids)} " in out
    assert abs(float(out.split("mean NLL:")[1].split()[0]) - nll) < 1e-4


def test_exports_carry_the_tokenizer_and_its_chat_template(orion_bpe_checkpoint, llama_bpe_checkpoint, tmp_path):
    """KEPT (Orion -> Llama) and Llamba exports of byte-level checkpoints: the tokenizer files and the chat
    template come along, and AutoTokenizer on the export gives the source's ids and chat prompts."""
    exports = {"llama": str(tmp_path / "llama"), "llamba": str(tmp_path / "llamba")}
    assert convert.main(["--source", orion_bpe_checkpoint[0], "--out", exports["llama"], "--calib-tokens", "1024",
                         "--eval-tokens", "1024"]) == 0
    assert convert.main(["--to", "llamba", "--source", llama_bpe_checkpoint[0], "--out", exports["llamba"],
                         "--eval-tokens", "1024"]) == 0
    messages = [{"role": "user", "content": "Return the object."}]
    for source, out in ((orion_bpe_checkpoint[0], exports["llama"]), (llama_bpe_checkpoint[0], exports["llamba"])):
        reference, exported = AutoTokenizer.from_pretrained(source), AutoTokenizer.from_pretrained(out)
        for text in _texts():
            assert exported(text).input_ids == reference(text).input_ids
        assert exported.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == \
            reference.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert json.load(open(os.path.join(exports["llama"], "tokenizer_config.json")))["tokenizer_class"] == "GPT2Tokenizer"


def test_chat_answers_equal_transformers_generate(llama_bpe_checkpoint, capsys):
    path, model = llama_bpe_checkpoint
    tokenizer = AutoTokenizer.from_pretrained(path)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "NAME"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    ids = ids["input_ids"]
    eos = tokenizer.eos_token_id
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=10, do_sample=False, eos_token_id=eos, pad_token_id=eos)
    expected = tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)
    argv = ["--model", path, "--chat", "--system", "Be brief.", "--prompt", "NAME", "--max-new-tokens", "10"]
    assert generate.main(argv) == 0
    assert capsys.readouterr().out == expected + "\n"
