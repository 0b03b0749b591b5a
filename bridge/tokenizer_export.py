"""Tokenizer files for an exported directory: converted from an Orion source's SentencePiece model, or copied.

`tokenizer.json` is built by Transformers' converter and given the SentencePiece-exact pipeline of the model's own
normalizer spec, as Transformers' SentencePiece converters do: its precompiled character map (e.g. `nmt_nfkc`),
`remove_extra_whitespaces` (leading and trailing spaces dropped, runs of spaces made one), the dummy-prefix "▁"
when `add_dummy_prefix`, and spaces -> "▁"; no pre-tokenizer. `tokenizer_config.json` names
`PreTrainedTokenizerFast`, so that `AutoTokenizer` uses that pipeline as written (Transformers v5's `LlamaTokenizer`
would rebuild it with a Metaspace pre-tokenizer and no character map); the ids then equal SentencePiece's on every
text, through `tokenizers` and through Transformers v4 and v5.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

from kept_jax.errors import KeptError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "chat_template.json")


def copy_tokenizer(source_dir: str, out_dir: str) -> list[str]:
    """Copies the source's Hugging Face tokenizer files as they are (a Llama teacher's, for its Llamba student)."""
    if not os.path.isfile(os.path.join(source_dir, "tokenizer.json")):
        raise KeptError(f"source {source_dir!r} has no tokenizer.json to give the exported model")
    copied = [name for name in TOKENIZER_FILES if os.path.isfile(os.path.join(source_dir, name))]
    for name in copied:
        shutil.copy(os.path.join(source_dir, name), out_dir)
    return copied


def export_tokenizer(source_dir: str, out_dir: str, architecture: str) -> None:
    """Writes tokenizer.json, tokenizer.model, tokenizer_config.json and special_tokens_map.json into `out_dir`."""
    sp_path = os.path.join(source_dir, "tokenizer.model")
    if not os.path.isfile(sp_path):
        if os.path.isfile(os.path.join(source_dir, "tokenizer.json")):
            copy_tokenizer(source_dir, out_dir)
            return
        raise KeptError(f"source {source_dir!r} has no tokenizer.model or tokenizer.json to export")

    import sentencepiece as spm
    from tokenizers import Regex, decoders, normalizers
    from transformers import LlamaTokenizer

    from kept_jax.tokenizer import special_token_flags

    sp = spm.SentencePieceProcessor(model_file=sp_path)
    add_bos, add_eos = special_token_flags(source_dir, architecture)
    spec = _normalizer_spec(sp_path)
    add_prefix = spec.add_dummy_prefix
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(sp_path, tmp)
        tokenizer = LlamaTokenizer.from_pretrained(
            tmp, add_bos_token=add_bos, add_eos_token=add_eos, add_prefix_space=add_prefix, legacy=True
        )
    backend = tokenizer.backend_tokenizer
    steps = [normalizers.Precompiled(spec.precompiled_charsmap)] if spec.precompiled_charsmap else []
    if spec.remove_extra_whitespaces:  # only " ", as SentencePiece does (Strip would also take tabs and newlines)
        steps += [normalizers.Replace(Regex(r"\A +| +\z"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
    if add_prefix:
        steps.append(normalizers.Prepend("▁"))
    backend.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", "▁")])
    backend.pre_tokenizer = None
    decode = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    backend.decoder = decoders.Sequence(decode + ([decoders.Strip(" ", 1, 0)] if add_prefix else []))
    tokenizer.save_pretrained(out_dir)
    shutil.copy(sp_path, out_dir)

    special = {
        "bos_token": sp.id_to_piece(sp.bos_id()) if sp.bos_id() >= 0 else None,
        "eos_token": sp.id_to_piece(sp.eos_id()) if sp.eos_id() >= 0 else None,
        "unk_token": sp.id_to_piece(sp.unk_id()),
    }
    special = {k: v for k, v in special.items() if v is not None}
    config_path = os.path.join(out_dir, "tokenizer_config.json")
    with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    for key in ("is_local", "local_files_only"):
        config.pop(key, None)
    config.update(special, tokenizer_class="PreTrainedTokenizerFast", add_bos_token=add_bos, add_eos_token=add_eos,
                  add_prefix_space=add_prefix, legacy=True)
    with open(config_path, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, ensure_ascii=False)
    with open(os.path.join(out_dir, "special_tokens_map.json"), "w", encoding="utf-8") as f:
        json.dump(special, f, indent=2, ensure_ascii=False)


def _normalizer_spec(sp_path: str):
    """The SentencePiece model's own normalizer settings (Orion-style models may turn the dummy prefix off)."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    with open(sp_path, "rb") as f:
        proto.ParseFromString(f.read())
    return proto.normalizer_spec


# Text where SentencePiece normalizers differ (spaces at the ends and in runs, tabs, newlines, NFKC-folded and
# non-ASCII characters), checked with held-out documents.
TOKENIZER_PROBES = ("  leading and trailing  ", "two  spaces\tand a tab\nnew line", "x    y", " ", "\u3000wide space",
                    "ｆｕｌｌ ｗｉｄｔｈ ① ﬁ Ⅻ ㎏", "café naïve 日本語 🙂", "a\u00a0b", "x = 1234567.89")


def check_tokenizer(source_dir: str, out_dir: str) -> None:
    """The exported tokenizer gives the source tokenizer's ids, through `tokenizers` and Transformers'
    `AutoTokenizer`, on held-out text and `TOKENIZER_PROBES`; otherwise the export fails naming the first text and
    ids that differ."""
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    from kept_jax import corpus
    from kept_jax.tokenizer import load_tokenizer

    source = load_tokenizer(source_dir, "orion")  # tokenizer_config.json's BOS/EOS flags, else Orion's (none)
    exported = Tokenizer.from_file(os.path.join(out_dir, "tokenizer.json"))
    auto = AutoTokenizer.from_pretrained(out_dir, trust_remote_code=False)
    samples = [text[:4000] for text in corpus.read_documents(corpus.HELDOUT)[:3]] + list(TOKENIZER_PROBES)
    for text in samples:
        want = source.encode(text)
        for name, got in (("tokenizer.json", exported.encode(text).ids), ("AutoTokenizer", auto(text).input_ids)):
            if got != want:
                at = next((i for i, (a, b) in enumerate(zip(want, got)) if a != b), min(len(want), len(got)))
                raise KeptError(
                    f"the exported tokenizer does not reproduce the source's ids: on {text[:80]!r} the source gives "
                    f"{want[max(0, at - 2) : at + 6]} and {name} gives {got[max(0, at - 2) : at + 6]} from token {at}: "
                    "kept_jax does not convert this tokenizer.model's normalizer yet; please report it with the file")
