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

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, LlamaTokenizer

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
        elif name.endswith("bias"):
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
