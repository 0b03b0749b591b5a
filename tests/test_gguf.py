"""GGUF files in: kept_jax against Transformers' own GGUF loader (its torch dequantizer and tokenizer builder) on files
written here as llama.cpp's converter writes them (tests/fixtures.py: Q/K rows permuted, llama.cpp's names and
metadata), in every supported storage type, with a byte-level BPE and a SentencePiece vocabulary."""

import json
import os
import shutil

import numpy as np
import pytest
import torch

from bridge import gguf_import
from bridge.checkpoint import load_checkpoint, load_checkpoint_tokenizer, open_checkpoint
from kept_jax import convert, corpus, generate, score
from kept_jax.models import build_model
from kept_jax.tokenizer import load_tokenizer
from tests import fixtures as fx

TINY = {"model_type": "llama", "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "bos_token_id": 1, "eos_token_id": 2}
MATRICES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
# Storage types: (vocabulary, tied, the embedding's and the head's, the matrices' in turn). The K-quant blocks are
# random (gguf cannot write K-quants), so their matrices are not zero-mean: a K-quant embedding would shift every logit
# by the same large amount and leave fp32 cancellation of that size in both implementations.
FILES = {
    "float": ("bpe", False, "BF16", ("F32", "F16", "BF16")),
    "legacy-quants": ("bpe", True, "Q8_0", ("Q8_0", "Q4_0", "Q4_1")),
    "k-quants": ("sentencepiece", True, "F16", ("Q4_K", "Q5_K", "Q6_K", "Q2_K", "Q3_K")),
}
PROBES = ("In 2024, 12345 apples cost $3.50.", "  two  spaces\tand a tab\nnew line", "café naïve 日本語 🙂",
          "ends with <|im_end|> inside", "x = 1234567.89", "VERSION\n    1.0 and |      3-argument")


def _types(outer: str, types: tuple[str, ...]) -> dict[str, str]:
    names = [f"blk.{i}.{m}.weight" for i in range(TINY["num_hidden_layers"]) for m in MATRICES]
    return {"token_embd.weight": outer, "output.weight": outer,
            **{name: types[k % len(types)] for k, name in enumerate(names)}}


@pytest.fixture(scope="module")
def vocabs(tmp_path_factory, sp_model):
    return {"bpe": fx.train_byte_level_bpe(), "sentencepiece": fx.sentencepiece_vocab(sp_model),
            "bpe-gpt2": fx.train_byte_level_bpe(digits=False)}


@pytest.fixture(scope="module")
def gguf_files(tmp_path_factory, vocabs):
    """name -> path of a tiny Llama GGUF as llama.cpp writes one."""
    out = {}
    for name, (vocab, tied, outer, types) in FILES.items():
        folder = tmp_path_factory.mktemp(name)
        hf = {**TINY, "vocab_size": len(vocabs[vocab]["tokens"]), "tie_word_embeddings": tied}
        out[name] = fx.write_gguf(str(folder / "model.gguf"), fx.make_llama(hf, seed=3), vocabs[vocab],
                                  _types(outer, types))
    return out


def _transformers(path: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.split(path)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(folder, gguf_file=name)


def _kept_logits(path: str, ids: list[int]) -> np.ndarray:
    config, params, _ = load_checkpoint(path)
    return np.asarray(build_model(config).apply({"params": params}, np.asarray([ids], np.int32)))[0]


def _relative_error(ours: np.ndarray, reference: np.ndarray) -> float:
    return float(np.abs(ours - reference).max() / np.abs(reference).max())


@pytest.mark.parametrize("name", FILES)
def test_logits_equal_transformers_gguf_load(name, gguf_files, monkeypatch):
    """Dequantization (gguf's NumPy against Transformers' torch), names, layout and the Q/K row order; dropping the
    un-permutation (a deliberate bug) is caught."""
    model, tokenizer = _transformers(gguf_files[name])
    ids = tokenizer(corpus.read_documents(corpus.HELDOUT)[0][:600]).input_ids[:96]
    with torch.no_grad():
        reference = model(torch.tensor([ids])).logits[0].numpy()
    ours = _kept_logits(gguf_files[name], ids)
    assert _relative_error(ours, reference) <= 1e-5
    assert (ours.argmax(-1) == reference.argmax(-1)).all()
    monkeypatch.setattr(gguf_import, "unpermute_rotary_rows", lambda weight, heads: weight)
    assert _relative_error(_kept_logits(gguf_files[name], ids), reference) > 1e-2


def test_config_and_report_from_the_metadata(gguf_files):
    config, _, report = load_checkpoint(gguf_files["legacy-quants"])
    assert (config.architecture, config.num_hidden_layers, config.hidden_size, config.num_key_value_heads) == (
        "llama", 2, 256, 2)
    assert config.tie_word_embeddings and config.rms_norm_eps == 1e-5 and config.max_position_embeddings == 512
    assert config.dtype == "float32" and config.eos_token_id == 2 and config.bos_token_id == 1
    assert report.source_dtypes == {"F32": 5, "Q8_0": 6, "Q4_0": 5, "Q4_1": 4}, report.source_dtypes
    assert not load_checkpoint(gguf_files["float"])[0].tie_word_embeddings


def smollm_pre_tokenizer():
    """The split of SmolLM's own tokenizer.json (llama.cpp's 'smollm'): each digit on its own, then GPT-2's regex on
    the stretches between. Transformers' GGUF loader has no entry for 'smollm' and splits with GPT-2's regex alone,
    which differs on whitespace before a digit ("\\n    1": 'ĊĠĠĠ', 'Ġ', '1' instead of 'ĊĠĠĠĠ', '1')."""
    from tokenizers import pre_tokenizers

    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])


@pytest.mark.parametrize("vocab", ["bpe", "bpe-gpt2"])
def test_byte_level_ids_equal_transformers(vocab, vocabs, tmp_path):
    """The vocabulary becomes tokenizer files whose ids are Transformers' (held-out text, digits, spaces, special
    tokens), for GPT-2's pre-tokenizer and for SmolLM's (Transformers' tokenizer given SmolLM's split)."""
    hf = {**TINY, "vocab_size": len(vocabs[vocab]["tokens"]), "tie_word_embeddings": True}
    path = fx.write_gguf(str(tmp_path / "m.gguf"), fx.make_llama(hf), vocabs[vocab])
    _, reference = _transformers(path)
    if vocabs[vocab]["pre"] == "smollm":
        reference.backend_tokenizer.pre_tokenizer = smollm_pre_tokenizer()
    ours = load_tokenizer(open_checkpoint(path).files_dir, "llama")
    for text in [doc[:3000] for doc in corpus.read_documents(corpus.HELDOUT)[:4]] + list(PROBES):
        assert ours.encode(text) == reference(text).input_ids, text
        assert ours.decode(ours.encode(text)) == reference.decode(reference(text).input_ids, skip_special_tokens=True)


def test_sentencepiece_ids_equal_sentencepiece_and_transformers(gguf_files, sp_model):
    """The pieces become a SentencePiece model again: its ids are the original model's everywhere, and
    Transformers' on held-out text (Transformers' GGUF Llama tokenizer drops SentencePiece's extra '▁' before
    leading spaces, which llama.cpp and SentencePiece both keep)."""
    import sentencepiece as spm

    original = spm.SentencePieceProcessor(model_file=sp_model)
    _, reference = _transformers(gguf_files["k-quants"])
    ours = load_tokenizer(open_checkpoint(gguf_files["k-quants"]).files_dir, "llama")
    heldout = [doc[:3000] for doc in corpus.read_documents(corpus.HELDOUT)[:4]]
    for text in heldout:
        assert ours.encode(text) == reference(text).input_ids == original.encode(text, add_bos=True)
    for text in PROBES:
        assert ours.encode(text) == original.encode(text, add_bos=True), text


def test_convert_writes_a_transformers_llama(gguf_files, tmp_path):
    """`convert --to llama --source MODEL.gguf`: a Hugging Face Llama directory that Transformers loads without
    remote code, with the GGUF's logits, tokenizer, chat template and end token."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source, out = gguf_files["legacy-quants"], str(tmp_path / "llama")
    assert convert.main(["--source", source, "--out", out]) == 0
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json"} <= set(os.listdir(out))
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=False, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(out, trust_remote_code=False)
    _, gguf_tokenizer = _transformers(source)
    text = corpus.read_documents(corpus.HELDOUT)[1][:500]
    ids = tokenizer(text).input_ids
    assert ids == gguf_tokenizer(text).input_ids
    with torch.no_grad():
        exported = model(torch.tensor([ids])).logits[0].numpy()
    assert _relative_error(exported, _kept_logits(source, ids)) <= 1e-5
    messages = [{"role": "user", "content": "Say hi."}]
    assert tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
        gguf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert json.load(open(os.path.join(out, "generation_config.json")))["eos_token_id"] == 2
    report = json.load(open(os.path.join(out, "conversion_report.json")))
    assert report["dtype"] == "float32" and "kl" not in report["strategies"]["copy"]
    assert report["not_evaluated"].startswith("a copy")


def test_score_and_generate_read_gguf(gguf_files, capsys):
    source = gguf_files["float"]
    assert score.main(["--model", source, "--text", "Return the number of items."]) == 0
    assert "perplexity:" in capsys.readouterr().out
    assert generate.main(["--model", source, "--prompt", "Return the", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.strip()


def test_mohawk_job_distills_a_gguf_teacher(gguf_files, tmp_path, capsys):
    """`train` with a GGUF source: the Llama teacher dequantized in memory, a Llamba distilled from it, exported
    with the GGUF's tokenizer and chat template, verified against the float64 oracle; its summary holds the teacher's
    and the student's greedy chat answers."""
    from kept_jax import train
    from tests.test_mohawk_job import TINY_LLAMBA

    source, out = gguf_files["legacy-quants"], str(tmp_path / "run")
    questions = ["Return the object.", "Parse it."]
    assert train.main(["--config", TINY_LLAMBA, "--out", out, f"source={source}",
                       "stages=[{name: kd, objective: kl, tokens: 256, lr: 1.0e-4, trainable: all}]",
                       "data.seq_len=32", "data.batch_size=4", "data.calib_tokens=256", "data.eval_tokens=256",
                       f"chat.questions={json.dumps(questions)}", "chat.max_new_tokens=6"]) == 0
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["verified"] is True and summary["steps"] == 2
    export = os.path.join(out, "export")
    # The summary's chat: what `generate --chat` answers, for the teacher and for the exported student.
    path = tmp_path / "questions.jsonl"
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q}]}) + "\n" for q in questions))
    capsys.readouterr()
    for model, key, extra in ((source, "teacher", []), (export, "student_final", ["--tokenizer", source])):
        assert generate.main(["--model", model, "--file", str(path), "--max-new-tokens", "6", *extra]) == 0
        answers = [json.loads(line)["completion"] for line in capsys.readouterr().out.splitlines()]
        assert [row[key] for row in summary["chat"]] == answers, key
    assert [row["question"] for row in summary["chat"]] == questions
    assert all(isinstance(row["student_init"], str) for row in summary["chat"])
    assert load_checkpoint(export)[0].architecture == "llamba"
    template = json.load(open(os.path.join(open_checkpoint(source).files_dir, "tokenizer_config.json")))
    assert json.load(open(os.path.join(export, "tokenizer_config.json")))["chat_template"] == template["chat_template"]
    text = corpus.read_documents(corpus.HELDOUT)[0][:300]
    assert load_tokenizer(export, "llamba").encode(text) == load_checkpoint_tokenizer(source, "llama").encode(text)


def _greedy_chat(model, tokenizer, messages, max_new: int) -> tuple[list[int], str]:
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    ids = ids["input_ids"]
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=max_new, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.eos_token_id)
    return ids, tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)


@pytest.mark.parametrize("name", ["legacy-quants", "k-quants"])
def test_chat_prompts_and_greedy_answers_equal_transformers(name, gguf_files, capsys):
    """`generate --chat --system`: the GGUF's chat template rendered and tokenized as Transformers' GGUF tokenizer
    does (ChatML on byte-level BPE; [INST] with a BOS token on SentencePiece), and the same greedy answer."""
    from kept_jax.tokenizer import chat_ids

    source = gguf_files[name]
    model, tokenizer = _transformers(source)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Return the object."}]
    if name == "k-quants":
        messages = messages[1:]  # the [INST] template has no system turn
    reference_ids, answer = _greedy_chat(model, tokenizer, messages, 12)
    ours, _ = chat_ids(open_checkpoint(source).files_dir, [messages])
    if name == "legacy-quants":
        assert ours == [reference_ids]
    else:  # SentencePiece after a special token: llama.cpp's and SentencePiece's '▁', which Transformers drops
        assert load_tokenizer(open_checkpoint(source).files_dir, "llama").decode(ours[0]) == \
            tokenizer.decode(reference_ids, skip_special_tokens=True)
        return
    argv = ["--model", source, "--chat", "--prompt", "Return the object.", "--max-new-tokens", "12",
            "--system", "Be brief."]
    assert generate.main(argv) == 0
    assert capsys.readouterr().out == answer + "\n"


def test_jsonl_conversations_stop_at_the_templates_end_token(gguf_files, tmp_path, capsys):
    source = gguf_files["legacy-quants"]
    model, tokenizer = _transformers(source)
    conversations = [[{"role": "user", "content": text}] for text in ("Return the object.", "NAME", "Parse it.")]
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in conversations))
    assert generate.main(["--model", source, "--file", str(path), "--batch", "2", "--max-new-tokens", "16"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    for row, conversation in zip(rows, conversations):
        ids, answer = _greedy_chat(model, tokenizer, conversation, 16)
        assert row["completion"] == answer
        assert (row["stop"] == "eos") == (row["new_tokens"] < 16)


def _bad_gguf(tmp_path, vocabs, **changes) -> str:
    hf = {**TINY, "vocab_size": len(vocabs["bpe"]["tokens"]), "tie_word_embeddings": True}
    vocab = changes.pop("vocab", vocabs["bpe"])
    return fx.write_gguf(str(tmp_path / "bad.gguf"), fx.make_llama(hf), vocab, **changes)


@pytest.mark.parametrize("case, message", [
    ("architecture", "holds a model of architecture 'qwen2' (general.architecture); kept_jax reads GGUF files of "
                     "Llama-architecture models"),
    ("quantization", "is stored as Q5_0, which kept_jax does not dequantize"),
    ("truncated", "download it again"),
    ("no tokenizer", "has no tokenizer metadata (tokenizer.ggml.tokens); pass token ids with --tokens instead"),
    ("shape", "but GGUF metadata implies"),
    ("pre-tokenizer", "uses the BPE pre-tokenizer 'qwen2' (tokenizer.ggml.pre), which kept_jax does not know"),
])
def test_bad_gguf_files_get_one_message(case, message, tmp_path, vocabs, capsys):
    if case == "architecture":
        path = _bad_gguf(tmp_path, vocabs, **{"general.architecture": "qwen2"})
    elif case == "quantization":
        path = _bad_gguf(tmp_path, vocabs, types={"blk.0.ffn_up.weight": "Q5_0"})
    elif case == "truncated":
        path = _bad_gguf(tmp_path, vocabs)
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) - 4096)
    elif case == "no tokenizer":
        path = _bad_gguf(tmp_path, vocabs, vocab=None)
    elif case == "shape":
        path = _bad_gguf(tmp_path, vocabs, **{"llama.feed_forward_length": 256})
    else:
        path = _bad_gguf(tmp_path, vocabs, vocab={**vocabs["bpe"], "pre": "qwen2"})
    argv = ["--model", path, "--text", "hello there"]
    assert score.main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and message in err, err


def test_a_file_that_is_not_gguf_is_refused(tmp_path, capsys):
    path = tmp_path / "model.bin"
    path.write_bytes(b"not a model")
    assert score.main(["--model", str(path), "--tokens", "1,2"]) == 2
    assert "is neither a Hugging Face checkpoint directory nor a GGUF file" in capsys.readouterr().err


def test_gguf_files_dir_is_removed_with_the_checkpoint(gguf_files, tmp_path):
    copy = str(tmp_path / "copy.gguf")
    shutil.copy(gguf_files["float"], copy)
    checkpoint = gguf_import.GGUFFile(copy)
    files = checkpoint.files_dir
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= set(os.listdir(files))
    del checkpoint
    assert not os.path.exists(files)
