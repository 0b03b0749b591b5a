"""Tiny Hugging Face checkpoints made with Transformers, and an independent PyTorch Orion reference.

Orion's reference is Transformers' Llama with every RMSNorm replaced by `torch.nn.LayerNorm` carrying weight and
bias: the same modules Orion's own modeling code uses. Weights are rescaled so that logits are far from flat
(random init with std 0.02 would hide layout bugs).

`python -m tests.fixtures OUT_DIR` writes `OUT_DIR/orion` and `OUT_DIR/llama`, each with a tokenizer, for trying
`python -m kept_jax.score` by hand.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import shutil
import sys
import tempfile
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import (GraniteMoeHybridConfig, GraniteMoeHybridForCausalLM, LlamaConfig, LlamaForCausalLM,
                          LlamaTokenizer)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL_CONFIGS = os.path.join(REPO, "configs", "models")


def base_config(name: str = "tiny-llama") -> dict[str, Any]:
    """A tiny HF config dict from `configs/models/<name>.json`."""
    with open(os.path.join(MODEL_CONFIGS, f"{name}.json"), encoding="utf-8") as f:
        return json.load(f)


def _llama_config(hf: dict[str, Any]) -> LlamaConfig:
    hf = {k: v for k, v in hf.items() if k not in ("model_type", "architectures", "max_sequence_length")}
    config = LlamaConfig(**hf)
    config._attn_implementation = "eager"
    return config


@torch.no_grad()
def _rescale(model: nn.Module, seed: int, head_scale: float = 4.0) -> None:
    """Weights with unit-scale activations and logits of std ~head_scale; norms and biases far from 1 and 0."""
    g = torch.Generator().manual_seed(seed)

    def normal(t, std, mean=0.0):
        t.copy_(torch.randn(t.shape, generator=g) * std + mean)

    for name, p in model.named_parameters():
        if "embed_tokens" in name:
            normal(p, 1.0)
        elif name.startswith("lm_head"):
            normal(p, head_scale / math.sqrt(p.shape[1]))
        elif "norm" in name:
            normal(p, 0.3, mean=1.0 if name.endswith("weight") else 0.0)
        elif name.endswith("bias") or p.ndim == 1:
            normal(p, 0.3)
        else:  # linear weights [out, in]
            normal(p, 1.0 / math.sqrt(p.shape[1]))


def make_llama(hf: dict[str, Any], seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(_llama_config(hf)).eval()
    _rescale(model, seed)
    return model


def make_orion_reference(hf: dict[str, Any], seed: int = 0) -> LlamaForCausalLM:
    """Transformers' Llama modules with each RMSNorm replaced by `torch.nn.LayerNorm` (weight and bias)."""
    torch.manual_seed(seed)
    config = _llama_config(hf)
    model = LlamaForCausalLM(config)
    d, eps = config.hidden_size, config.rms_norm_eps
    for layer in model.model.layers:
        layer.input_layernorm = nn.LayerNorm(d, eps=eps)
        layer.post_attention_layernorm = nn.LayerNorm(d, eps=eps)
    model.model.norm = nn.LayerNorm(d, eps=eps)
    model.eval()
    _rescale(model, seed)
    return model


def make_hybrid(hf: dict[str, Any], seed: int = 0) -> GraniteMoeHybridForCausalLM:
    """Transformers' GraniteMoeHybrid (eager attention, its PyTorch Mamba-2 path), weights rescaled as `_rescale`
    does, and the Mamba-2 parameters spread as trained ones are: decays A = 1..16 at random, D and dt_bias around
    their inits, convolution taps of unit-scale outputs."""
    torch.manual_seed(seed)
    config = GraniteMoeHybridConfig(**{k: v for k, v in hf.items() if k not in ("model_type", "architectures")})
    config._attn_implementation = "eager"
    model = GraniteMoeHybridForCausalLM(config).eval()
    _rescale(model, seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("A_log"):
                p.copy_(torch.log(1 + 15 * torch.rand(p.shape, generator=g)))
            elif name.endswith(".D"):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
            elif name.endswith("dt_bias"):
                p.copy_(torch.randn(p.shape, generator=g))
            elif name.endswith("conv1d.weight"):
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))
    return model


def save_llama(model: LlamaForCausalLM, out_dir: str, **save_kwargs) -> str:
    model.save_pretrained(out_dir, **save_kwargs)
    return out_dir


def save_orion(model: LlamaForCausalLM, out_dir: str, **save_kwargs) -> str:
    """Saves with Transformers, then makes config.json Orion's (model_type 'orion', its architecture name)."""
    model.save_pretrained(out_dir, **save_kwargs)
    path = os.path.join(out_dir, "config.json")
    with open(path, encoding="utf-8") as f:
        hf = json.load(f)
    hf.update(model_type="orion", architectures=["OrionForCausalLM"], max_sequence_length=hf["max_position_embeddings"])
    with open(path, "w", encoding="utf-8") as f:
        json.dump(hf, f, indent=2)
    return out_dir


@torch.no_grad()
def torch_logits(model: LlamaForCausalLM, tokens) -> torch.Tensor:
    """fp32 logits [batch, seq, vocab] of a PyTorch model on int tokens."""
    ids = torch.as_tensor(tokens, dtype=torch.long)
    return model(input_ids=ids).logits.float()


# ---- Tokenizers -----------------------------------------------------------------------------------


def docstring_corpus() -> str:
    """Docstrings of a few standard-library modules: license-clean text that every Python install has."""
    import argparse as m1, collections as m2, json as m3, re as m4, string as m5, textwrap as m6

    docs = []
    for module in (m1, m2, m3, m4, m5, m6):
        for _, obj in inspect.getmembers(module):
            doc = inspect.getdoc(obj)
            if doc:
                docs.append(doc)
    return "\n".join(docs)


def train_sentencepiece(out_dir: str, vocab_size: int = 512, normalization: str = "identity",
                        remove_extra_whitespaces: bool = False) -> str:
    """A SentencePiece BPE `tokenizer.model` as Orion ships it (unk 0, bos 1, eos 2, byte fallback); other models
    normalize (`nmt_nfkc`, `remove_extra_whitespaces`)."""
    import sentencepiece as spm

    os.makedirs(out_dir, exist_ok=True)
    lines = [line for line in docstring_corpus().splitlines() if line.strip()]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_prefix=os.path.join(out_dir, "tokenizer"),
        vocab_size=vocab_size,
        model_type="bpe",
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        byte_fallback=True,
        character_coverage=0.9995,
        normalization_rule_name=normalization,
        remove_extra_whitespaces=remove_extra_whitespaces,
        num_threads=1,
        minloglevel=2,
    )
    os.remove(os.path.join(out_dir, "tokenizer.vocab"))
    return os.path.join(out_dir, "tokenizer.model")


def add_orion_tokenizer(model_dir: str, sp_model: str) -> None:
    shutil.copy(sp_model, os.path.join(model_dir, "tokenizer.model"))
    with open(os.path.join(model_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump({"tokenizer_class": "OrionTokenizer", "add_bos_token": False, "add_eos_token": False}, f)


def add_llama_tokenizer(model_dir: str, sp_model: str) -> None:
    """Transformers converts the SentencePiece model into `tokenizer.json`."""
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(sp_model, os.path.join(tmp, "tokenizer.model"))
        LlamaTokenizer.from_pretrained(tmp).save_pretrained(model_dir)


# ---- GGUF files, written as llama.cpp's converter writes them -------------------------------------

CHATML_TEMPLATE = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
                   "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
                   "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
                   "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
INST_TEMPLATE = ("{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
                 "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% else %}{{ ' ' + message['content'] + eos_token }}"
                 "{% endif %}{% endfor %}")
# Where the float16 scales of a K-quant block are (ggml-common.h's block_q*_K layouts): byte offsets in the block.
K_QUANT_SCALES = {"Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


CHATML_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def byte_level_bpe(vocab_size: int = 600, digits: bool = True):
    """A byte-level BPE `tokenizers.Tokenizer` trained on the docstring corpus with ChatML's special tokens first; with
    `digits`, each digit on its own, as SmolLM's tokenizer.json splits text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                               if digits else byte_level)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=CHATML_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(docstring_corpus().splitlines(), trainer)
    return tokenizer


def add_byte_level_tokenizer(model_dir: str, vocab_size: int) -> None:
    """The tokenizer files a SmolLM-style checkpoint ships: tokenizer.json (byte-level BPE) and tokenizer_config.json
    naming GPT2Tokenizer, with ChatML's tokens and chat template."""
    tokenizer = byte_level_bpe(vocab_size)
    assert tokenizer.get_vocab_size() == vocab_size
    tokenizer.save(os.path.join(model_dir, "tokenizer.json"))
    with open(os.path.join(model_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump({"tokenizer_class": "GPT2Tokenizer", "bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
                   "unk_token": "<|endoftext|>", "pad_token": "<|im_end|>", "add_prefix_space": False,
                   "model_max_length": 2048, "chat_template": CHATML_TEMPLATE}, f, indent=2)


def train_byte_level_bpe(vocab_size: int = 600, digits: bool = True) -> dict[str, Any]:
    """A byte-level BPE vocabulary as GGUF stores one: tokens in the byte alphabet, merges "a b", types."""
    model = json.loads(byte_level_bpe(vocab_size, digits).to_str())["model"]
    tokens = [t for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return {"model": "gpt2", "pre": "smollm" if digits else "gpt-2", "tokens": tokens, "merges": merges,
            "types": [3 if t in CHATML_TOKENS else 1 for t in tokens], "bos": 1, "eos": 2, "unk": 0, "pad": 2,
            "add_bos": False, "chat_template": CHATML_TEMPLATE}


def sentencepiece_vocab(sp_model: str) -> dict[str, Any]:
    """A SentencePiece model's pieces, scores and types as llama.cpp's converter stores them."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    with open(sp_model, "rb") as f:
        proto.ParseFromString(f.read())
    return {"model": "llama", "tokens": [p.piece for p in proto.pieces], "scores": [p.score for p in proto.pieces],
            "types": [p.type for p in proto.pieces], "bos": proto.trainer_spec.bos_id,
            "eos": proto.trainer_spec.eos_id, "unk": proto.trainer_spec.unk_id, "add_bos": True,
            "add_space_prefix": proto.normalizer_spec.add_dummy_prefix, "chat_template": INST_TEMPLATE}


def llama_cpp_permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py permutation of Q and K rows: each head's rotate-half halves interleaved."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _random_k_blocks(rows: int, cols: int, qtype, seed: int, std: float) -> np.ndarray:
    """Valid blocks of a K-quant type (gguf-py cannot quantize to them): random quants and sub-scales, the float16
    super-block scales set so that the dequantized tensor has standard deviation `std`."""
    import gguf

    block_elems, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    raw = np.random.default_rng(seed).integers(0, 256, (rows, cols // block_elems, block_bytes), dtype=np.uint8)

    def set_scales(value: float) -> np.ndarray:
        for offset in K_QUANT_SCALES[qtype.name]:
            raw[..., offset:offset + 2] = np.frombuffer(np.float16(value).tobytes(), np.uint8)
        return raw.reshape(rows, -1)

    unit = gguf.quants.dequantize(set_scales(1.0), qtype)
    return set_scales(std / float(unit.std())).copy()


def write_gguf(path: str, model: LlamaForCausalLM, vocab: dict[str, Any] | None,
               types: dict[str, str] | None = None, default_type: str = "F32", **metadata: Any) -> str:
    """`model` as llama.cpp's converter writes a Llama GGUF: llama.cpp's tensor names, Q/K rows permuted, each
    tensor in `types[gguf_name]` (default `default_type`; K-quants get random valid blocks of the same scale, whose
    values `model` no longer holds), the vocabulary in `vocab` (None: no tokenizer metadata). `metadata` overrides
    keys (`general.architecture`, ...)."""
    import gguf

    cfg = model.config
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    layer = {"input_layernorm.weight": "attn_norm.weight", "self_attn.q_proj.weight": "attn_q.weight",
             "self_attn.k_proj.weight": "attn_k.weight", "self_attn.v_proj.weight": "attn_v.weight",
             "self_attn.o_proj.weight": "attn_output.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
             "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
             "mlp.down_proj.weight": "ffn_down.weight"}
    writer = gguf.GGUFWriter(path, metadata.pop("general.architecture", "llama"))
    keys = {"llama.block_count": cfg.num_hidden_layers, "llama.context_length": cfg.max_position_embeddings,
            "llama.embedding_length": cfg.hidden_size, "llama.feed_forward_length": cfg.intermediate_size,
            "llama.attention.head_count": heads, "llama.attention.head_count_kv": kv_heads,
            "llama.rope.freq_base": float(cfg.rope_parameters["rope_theta"]),
            "llama.attention.layer_norm_rms_epsilon": float(cfg.rms_norm_eps),
            "llama.rope.dimension_count": cfg.head_dim, "llama.vocab_size": cfg.vocab_size, **metadata}
    for key, value in keys.items():
        kind = {int: gguf.GGUFValueType.UINT32, float: gguf.GGUFValueType.FLOAT32}.get(type(value),
                                                                                    gguf.GGUFValueType.STRING)
        writer.add_key_value(key, value, kind)
    if vocab:
        writer.add_tokenizer_model(vocab["model"])
        if "pre" in vocab:
            writer.add_tokenizer_pre(vocab["pre"])
        writer.add_token_list(vocab["tokens"])
        writer.add_token_types(vocab["types"])
        if "merges" in vocab:
            writer.add_token_merges(vocab["merges"])
        if "scores" in vocab:
            writer.add_token_scores(vocab["scores"])
        writer.add_bos_token_id(vocab["bos"])
        writer.add_eos_token_id(vocab["eos"])
        writer.add_unk_token_id(vocab["unk"])
        if "pad" in vocab:
            writer.add_pad_token_id(vocab["pad"])
        writer.add_add_bos_token(vocab["add_bos"])
        if "add_space_prefix" in vocab:
            writer.add_add_space_prefix(vocab["add_space_prefix"])
        if vocab.get("chat_template"):
            writer.add_chat_template(vocab["chat_template"])
    types = types or {}
    for seed, (hf_name, tensor) in enumerate(model.state_dict().items()):
        if hf_name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        if hf_name.startswith("model.layers."):
            i, rest = hf_name.removeprefix("model.layers.").split(".", 1)
            name = f"blk.{i}.{layer[rest]}"
        else:
            name = names[hf_name]
        array = tensor.detach().float().numpy()
        if ".attn_q." in name or ".attn_k." in name:
            array = llama_cpp_permute(array, heads if ".attn_q." in name else kv_heads)
        qtype = gguf.GGMLQuantizationType[types.get(name, default_type if array.ndim == 2 else "F32")]
        if qtype.name in K_QUANT_SCALES:
            data = _random_k_blocks(*array.shape, qtype, seed, float(array.std()))
        elif qtype.name == "F32":
            data = array
        else:
            data = gguf.quants.quantize(array, qtype)
        writer.add_tensor(name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="directory to create; gets orion/ and llama/ inside")
    args = parser.parse_args(argv)
    if os.path.exists(args.out) and os.listdir(args.out):
        print(f"error: {args.out} exists and is not empty; choose a new directory", file=sys.stderr)
        return 2
    sp_model = train_sentencepiece(os.path.join(args.out, "sentencepiece"))
    orion = save_orion(make_orion_reference(base_config("tiny-orion")), os.path.join(args.out, "orion"))
    add_orion_tokenizer(orion, sp_model)
    llama = save_llama(make_llama(base_config("tiny-llama")), os.path.join(args.out, "llama"))
    add_llama_tokenizer(llama, sp_model)
    print(f"wrote {orion} and {llama}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
