"""GGUF files (llama.cpp's single-file format) read as if they were Hugging Face Llama directories.

The `gguf` package, maintained with llama.cpp, parses the file and dequantizes its blocks in NumPy. This module maps
llama.cpp's conventions back to Hugging Face's:

- the metadata (`llama.block_count`, `llama.rope.freq_base`, ...) becomes a Llama `config.json` dict;
- `blk.N.attn_q.weight`, ... become `model.layers.N.self_attn.q_proj.weight`, ..., dequantized to float32, with the
  rows of Q and K (and of their biases) put back in rotate-half order: llama.cpp's converter interleaves the two
  rotary halves of each head, as its rotary kernel expects;
- the vocabulary (`tokenizer.ggml.*`) becomes tokenizer files in a private directory (`GGUFFile.files_dir`):
  a byte-level BPE `tokenizer.json` built with `tokenizers` (its pre-tokenizer chosen by `tokenizer.ggml.pre`, as
  llama.cpp chooses it), or a SentencePiece `tokenizer.model` rebuilt from the pieces, scores and types (converted to
  `tokenizer.json` and checked like an Orion tokenizer), plus `tokenizer_config.json` (special tokens, BOS/EOS
  flags, the chat template) and `generation_config.json`. Everything downstream reads those files as it reads an
  HF directory's.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import weakref
from typing import Any

import numpy as np

from kept_jax.errors import KeptError
from kept_jax.fileio import owned_temp_path

MAGIC = b"GGUF"
GGUF_STAGING = "kept_jax-gguf-"  # the temporary folder's prefix of a GGUF's tokenizer files (swept when left)
# What kept_jax dequantizes (through the `gguf` package); each is checked against Transformers' own dequantizer.
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
# llama.cpp tensor name -> HF name; `{i}` is the layer.
LAYER_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.bias": "self_attn.o_proj.bias",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "ffn_gate.bias": "mlp.gate_proj.bias",
    "ffn_up.bias": "mlp.up_proj.bias",
    "ffn_down.bias": "mlp.down_proj.bias",
}
GLOBAL_TENSORS = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                  "output.weight": "lm_head.weight"}
_LAYER_NAME = re.compile(r"blk\.(\d+)\.(.+)")

# Byte-level BPE pre-tokenizers by `tokenizer.ggml.pre`, as llama.cpp's llama-vocab.cpp splits text for each:
# (regexes applied in turn before the byte-level mapping, ignore_merges). A name not here is refused: splitting text
# another way than the vocabulary was trained on gives the model token sequences it never saw.
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3_SPLIT = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
BPE_PRE_TOKENIZERS: dict[str, tuple[tuple[str, ...], bool]] = {
    "gpt-2": ((_GPT2_SPLIT,), False),
    **{name: ((r"\p{N}", _GPT2_SPLIT), False)
       for name in ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b")},
    **{name: ((_LLAMA3_SPLIT,), True) for name in ("llama3", "llama-v3", "llama-bpe", "falcon3")},
}
SENTENCEPIECE_BYTE_TYPE = 6  # llama.cpp numbers token types as SentencePiece does: 1 normal ... 6 byte


def is_gguf(path: str) -> bool:
    """True for a file that starts with GGUF's magic bytes."""
    if not os.path.isfile(path):
        return False
    with open(path, "rb") as f:
        return f.read(4) == MAGIC


def _float(value: Any) -> float:
    """A float32 metadata value written as the shortest decimal that rounds to it (1e-05, not 9.99999974e-06)."""
    return float(str(np.float32(value)))


class GGUFFile:
    """One GGUF file of a Llama-architecture model: its config as a `config.json` dict (`hf`), its tensors under HF
    names (`reader()`), and its tokenizer and generation files (`files_dir`, written on first use)."""

    kind = "GGUF"

    def __init__(self, path: str):
        try:
            import gguf
        except ImportError:
            raise KeptError("reading GGUF files needs the gguf package: pip install gguf") from None
        self.path = path
        try:
            self._reader = gguf.GGUFReader(path)
        except (ValueError, KeyError, IndexError, TypeError, OSError):  # the reader's words are numpy's: not said
            raise KeptError(f"cannot read {path} ({os.path.getsize(path):,} bytes): it is truncated or not a "
                            "complete GGUF file; download it again") from None
        self._values: dict[str, Any] = {}
        self.tensors = {t.name: t for t in self._reader.tensors}
        self._check_complete()
        architecture = self.value("general.architecture")
        if architecture != "llama":
            raise KeptError(f"{path} holds a model of architecture {architecture!r} (general.architecture); kept_jax "
                            "reads GGUF files of Llama-architecture models ('llama': Llama 2 and 3, SmolLM, ...)")
        if (self.value("llama.expert_count") or 0) > 0:
            raise KeptError(f"{path} is a mixture of experts ({self.value('llama.expert_count')} experts); kept_jax "
                            "reads dense Llama models")
        unsupported = {t.tensor_type.name for t in self.tensors.values()} - set(SUPPORTED_TYPES)
        if unsupported:
            first = next(t for t in self.tensors.values() if t.tensor_type.name in unsupported)
            raise KeptError(f"{path}: tensor {first.name} is stored as {first.tensor_type.name}, which kept_jax does "
                            f"not dequantize (it reads {', '.join(SUPPORTED_TYPES)}); use a GGUF quantized with one "
                            "of those")
        self.hf = self._config()
        self._files_dir: str | None = None

    def _check_complete(self) -> None:
        size = os.path.getsize(self.path)
        for t in self.tensors.values():
            if t.data_offset + t.n_bytes > size:
                raise KeptError(f"{self.path} is truncated: tensor {t.name} ends at byte {t.data_offset + t.n_bytes:,} "
                                f"but the file has {size:,} bytes; download it again")

    def value(self, key: str, default: Any = None) -> Any:
        """A metadata value (parsed once: the vocabulary is large), or `default` when the file lacks the key."""
        if key not in self._values:
            field = self._reader.fields.get(key)
            self._values[key] = None if field is None else field.contents()
        return default if self._values[key] is None else self._values[key]

    # ---- config.json ---------------------------------------------------------------------------

    def _require(self, key: str) -> Any:
        value = self.value(key)
        if value is None:
            raise KeptError(f"{self.path} has no {key!r} metadata, which every Llama GGUF carries; the file is "
                            "incomplete or was not written by llama.cpp's converter")
        return value

    def _config(self) -> dict[str, Any]:
        """The metadata as a Llama `config.json` dict; refuses what kept_jax's Llama cannot express."""
        hidden, heads = int(self._require("llama.embedding_length")), int(self._require("llama.attention.head_count"))
        kv_heads = int(self.value("llama.attention.head_count_kv") or heads)
        head_dim = int(self.value("llama.attention.key_length") or hidden // heads)
        value_dim = int(self.value("llama.attention.value_length") or head_dim)
        rotary = int(self.value("llama.rope.dimension_count") or head_dim)
        problems = []
        if value_dim != head_dim:
            problems.append(f"keys of {head_dim} and values of {value_dim} dimensions")
        if rotary != head_dim:
            problems.append(f"rotary embedding on {rotary} of {head_dim} head dimensions")
        if self.value("llama.attention.sliding_window"):
            problems.append(f"a sliding window of {self.value('llama.attention.sliding_window')}")
        if "rope_freqs.weight" in self.tensors:
            problems.append("rotary frequencies rescaled by a rope_freqs tensor (Llama 3.1 and later)")
        scaling = self.value("llama.rope.scaling.type") or "none"
        rope: dict[str, Any] = {"rope_type": "default"}
        if scaling == "linear":
            rope = {"rope_type": "linear", "factor": _float(self._require("llama.rope.scaling.factor"))}
        elif scaling != "none":
            problems.append(f"rope scaling {scaling!r}")
        if problems:
            raise KeptError(f"{self.path} has {'; '.join(problems)}, which kept_jax's Llama does not implement; "
                            "convert the model's Hugging Face checkpoint instead")
        tokens = self.value("tokenizer.ggml.tokens")
        vocab = len(tokens) if tokens else int(self.value("llama.vocab_size") or 0)
        if not vocab and "token_embd.weight" in self.tensors:
            vocab = int(self.tensors["token_embd.weight"].shape[-1])
        eos = [self.value(f"tokenizer.ggml.{name}_token_id") for name in ("eos", "eot", "eom")]
        eos = list(dict.fromkeys(int(i) for i in eos if i is not None))
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": vocab,
            "hidden_size": hidden,
            "intermediate_size": int(self._require("llama.feed_forward_length")),
            "num_hidden_layers": int(self._require("llama.block_count")),
            "num_attention_heads": heads,
            "num_key_value_heads": kv_heads,
            "head_dim": head_dim,
            "max_position_embeddings": int(self.value("llama.context_length") or 4096),
            "rms_norm_eps": _float(self.value("llama.attention.layer_norm_rms_epsilon", 1e-5)),
            "rope_parameters": {**rope, "rope_theta": _float(self.value("llama.rope.freq_base", 10000.0))},
            "attention_bias": "blk.0.attn_q.bias" in self.tensors,
            "mlp_bias": "blk.0.ffn_gate.bias" in self.tensors,
            "tie_word_embeddings": "output.weight" not in self.tensors,
            # Dequantized blocks are exact in float32; bfloat16 would round them.
            "dtype": "bfloat16" if {t.tensor_type.name for t in self.tensors.values()} <= {"BF16", "F32"}
            and any(t.tensor_type.name == "BF16" for t in self.tensors.values()) else "float32",
            "bos_token_id": self.value("tokenizer.ggml.bos_token_id"),
            "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
            "pad_token_id": self.value("tokenizer.ggml.padding_token_id"),
        }

    # ---- Tensors ---------------------------------------------------------------------------------

    def hf_name(self, gguf_name: str) -> str | None:
        if gguf_name in GLOBAL_TENSORS:
            return GLOBAL_TENSORS[gguf_name]
        match = _LAYER_NAME.fullmatch(gguf_name)
        if match and match.group(2) in LAYER_TENSORS:
            return f"model.layers.{match.group(1)}.{LAYER_TENSORS[match.group(2)]}"
        return None

    def reader(self) -> "GGUFTensorReader":
        return GGUFTensorReader(self)

    # ---- Tokenizer and generation files ------------------------------------------------------------

    @property
    def has_tokenizer(self) -> bool:
        return self.value("tokenizer.ggml.tokens") is not None

    @property
    def files_dir(self) -> str:
        """A private directory holding the tokenizer and generation files this GGUF describes (removed at exit)."""
        if self._files_dir is None:
            staging = owned_temp_path(tempfile.gettempdir(), GGUF_STAGING)
            weakref.finalize(self, shutil.rmtree, staging, True)
            if self.has_tokenizer:
                self._write_tokenizer(staging)
            self._write_generation_config(staging)
            self._files_dir = staging
        return self._files_dir

    def _special_tokens(self, tokens: list[str]) -> dict[str, str]:
        named = {"bos_token": "bos", "eos_token": "eos", "unk_token": "unknown", "pad_token": "padding"}
        out = {}
        for key, name in named.items():
            token_id = self.value(f"tokenizer.ggml.{name}_token_id")
            if token_id is not None and 0 <= token_id < len(tokens):
                out[key] = tokens[token_id]
        return out

    def _write_tokenizer(self, out_dir: str) -> None:
        model = self.value("tokenizer.ggml.model")
        tokens = self.value("tokenizer.ggml.tokens")
        types = self.value("tokenizer.ggml.token_type") or [1] * len(tokens)
        special = self._special_tokens(tokens)
        if model == "gpt2":
            add_bos, add_eos = bool(self.value("tokenizer.ggml.add_bos_token", False)), False
            _bpe_tokenizer(tokens, self.value("tokenizer.ggml.merges") or [], types,
                           self.value("tokenizer.ggml.pre", "gpt-2"), special.get("bos_token") if add_bos else None,
                           self.path).save(os.path.join(out_dir, "tokenizer.json"))
        elif model == "llama":
            add_bos = bool(self.value("tokenizer.ggml.add_bos_token", True))
            add_eos = bool(self.value("tokenizer.ggml.add_eos_token", False))
            self._write_sentencepiece(out_dir, tokens, types, add_bos, add_eos)
        else:
            raise KeptError(f"{self.path} has a {model!r} tokenizer (tokenizer.ggml.model); kept_jax reads 'gpt2' "
                            "(byte-level BPE) and 'llama' (SentencePiece) vocabularies")
        config_path = os.path.join(out_dir, "tokenizer_config.json")
        config = {}
        if os.path.isfile(config_path):  # the SentencePiece export wrote one
            with open(config_path, encoding="utf-8") as f:
                config = json.load(f)
        config.update(special, tokenizer_class="PreTrainedTokenizerFast", add_bos_token=add_bos,
                      add_eos_token=add_eos, model_max_length=self.hf["max_position_embeddings"],
                      clean_up_tokenization_spaces=False)
        template = self.value("tokenizer.chat_template")
        if template:
            config["chat_template"] = template
        with open(config_path, "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, ensure_ascii=False)
        with open(os.path.join(out_dir, "special_tokens_map.json"), "w", encoding="utf-8") as f:
            json.dump(special, f, indent=2, ensure_ascii=False)

    def _write_sentencepiece(self, out_dir: str, tokens: list[str], types: list[int], add_bos: bool,
                             add_eos: bool) -> None:
        """The SentencePiece model llama.cpp's converter read (pieces, scores, types; BPE with byte fallback), then
        `tokenizer.json` from it, checked to give SentencePiece's ids."""
        from sentencepiece import sentencepiece_model_pb2 as pb

        from bridge.tokenizer_export import check_tokenizer, export_tokenizer

        scores = self.value("tokenizer.ggml.scores") or [0.0] * len(tokens)
        proto = pb.ModelProto()
        for piece, score, kind in zip(tokens, scores, types):
            entry = proto.pieces.add()
            entry.piece, entry.score, entry.type = piece, float(score), int(kind) or 1
        spec = proto.trainer_spec
        spec.model_type = pb.TrainerSpec.BPE
        spec.vocab_size = len(tokens)
        spec.byte_fallback = any(int(kind) == SENTENCEPIECE_BYTE_TYPE for kind in types)
        for name in ("unk", "bos", "eos", "pad"):
            key = {"unk": "unknown", "pad": "padding"}.get(name, name)
            token_id = self.value(f"tokenizer.ggml.{key}_token_id")
            setattr(spec, f"{name}_id", -1 if token_id is None else int(token_id))
        proto.normalizer_spec.name = "identity"
        proto.normalizer_spec.add_dummy_prefix = bool(self.value("tokenizer.ggml.add_space_prefix", True))
        proto.normalizer_spec.remove_extra_whitespaces = False
        proto.normalizer_spec.escape_whitespaces = True
        with tempfile.TemporaryDirectory() as source:
            with open(os.path.join(source, "tokenizer.model"), "wb") as f:
                f.write(proto.SerializeToString())
            with open(os.path.join(source, "tokenizer_config.json"), "w", encoding="utf-8") as f:
                json.dump({"add_bos_token": add_bos, "add_eos_token": add_eos}, f)
            export_tokenizer(source, out_dir, "llama")
            check_tokenizer(source, out_dir)

    def _write_generation_config(self, out_dir: str) -> None:
        ids = {key: self.hf[key] for key in ("bos_token_id", "eos_token_id", "pad_token_id")
               if self.hf[key] is not None}
        with open(os.path.join(out_dir, "generation_config.json"), "w", encoding="utf-8") as f:
            json.dump(ids, f, indent=2)


def _bpe_tokenizer(tokens: list[str], merges: list[str], types: list[int], pre: str, bos: str | None, path: str):
    """A `tokenizers` byte-level BPE: the file's vocabulary and merges, llama.cpp's pre-tokenizer for `pre`, control
    tokens (type 3) as special tokens, user-defined ones (type 4) matched whole, BOS prepended when the file says."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    if pre not in BPE_PRE_TOKENIZERS:
        raise KeptError(f"{path} uses the BPE pre-tokenizer {pre!r} (tokenizer.ggml.pre), which kept_jax does not "
                        f"know; it knows {', '.join(sorted(BPE_PRE_TOKENIZERS))}. Splitting text another way than the "
                        "vocabulary was trained on would give the model token sequences it never saw")
    splits, ignore_merges = BPE_PRE_TOKENIZERS[pre]
    vocab = {token: i for i, token in enumerate(tokens)}
    pairs = [tuple(merge.split(" ", 1)) for merge in merges]
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=pairs, ignore_merges=ignore_merges, fuse_unk=False))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(split), behavior="isolated") for split in splits]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                  for t, kind in zip(tokens, types) if kind == 3])
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False)
                          for t, kind in zip(tokens, types) if kind == 4])
    if bos is not None:
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, vocab[bos])])
    return tokenizer


class GGUFTensorReader:
    """The CheckpointReader interface over a GGUF file: HF names, HF shapes, float32 arrays (dequantized, Q and K
    rows un-permuted). Tensors the mapping does not know keep their GGUF names, so the import names them."""

    format = "gguf"
    readable_dtypes = frozenset(SUPPORTED_TYPES)
    config_name = "GGUF metadata"

    def __init__(self, source: GGUFFile):
        self.source = source
        self.model_dir = source.path
        self.files = [os.path.basename(source.path)]
        self._gguf_names = {source.hf_name(name) or name: name for name in source.tensors}
        hf = source.hf
        self._heads = {"self_attn.q_proj": hf["num_attention_heads"], "self_attn.k_proj": hf["num_key_value_heads"]}

    def names(self) -> list[str]:
        return list(self._gguf_names)

    def dtype_and_shape(self, name: str) -> tuple[str, tuple[int, ...]]:
        tensor = self.source.tensors[self._gguf_names[name]]
        return tensor.tensor_type.name, tuple(int(n) for n in reversed(tensor.shape.tolist()))

    def read(self, name: str) -> np.ndarray:
        from gguf.quants import dequantize

        tensor = self.source.tensors[self._gguf_names[name]]
        _, shape = self.dtype_and_shape(name)
        value = np.array(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32).reshape(shape)
        heads = next((n for module, n in self._heads.items() if f".{module}." in name), None)
        return value if heads is None else unpermute_rotary_rows(value, heads)

    def where(self, name: str) -> str:
        return f"{self.files[0]} ({self._gguf_names[name]})"

    def release(self) -> None:
        pass


def unpermute_rotary_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """Rows of a Q or K projection (or bias) from llama.cpp's order back to Hugging Face's: within each head, rows
    [r0, r0', r1, r1', ...] (each rotary pair side by side) become [r0, r1, ..., r0', r1', ...] (rotate-half)."""
    rows = weight.shape[0]
    return weight.reshape(heads, rows // heads // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
