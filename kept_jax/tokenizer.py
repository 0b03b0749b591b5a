"""A checkpoint's own tokenizer: `tokenizer.json` (tokenizers) or SentencePiece `tokenizer.model` as Orion ships it."""

from __future__ import annotations

import os
from typing import Callable

from kept_jax.errors import KeptError
from kept_jax.fileio import read_optional_json


class Tokenizer:
    """`encode(text, special)`: the ids, with the tokenizer's own BOS/EOS template when `special`."""

    def __init__(self, encode: Callable[[str, bool], list[int]], source: str,
                 decode: Callable[[list[int]], str] | None = None):
        self._encode = encode
        self._decode = decode
        self.source = source

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """The ids of `text`; without `add_special_tokens`, the text's own tokens only (no BOS/EOS added), as
        lm-eval scores a context and its continuation."""
        return list(self._encode(text, add_special_tokens))

    def decode(self, ids: list[int]) -> str:
        """Text of `ids`, special tokens (BOS, EOS, ...) left out."""
        return self._decode(list(ids))


def special_token_flags(model_dir: str, architecture: str) -> tuple[bool, bool]:
    """(add_bos, add_eos) of a bare SentencePiece model: `tokenizer_config.json`'s, else the architecture's own
    tokenizer's defaults (LlamaTokenizer adds BOS, OrionTokenizer does not; neither adds EOS)."""
    config = read_optional_json(os.path.join(model_dir, "tokenizer_config.json"))
    return bool(config.get("add_bos_token", architecture == "llama")), bool(config.get("add_eos_token", False))


def load_tokenizer(model_dir: str, architecture: str,
                   missing_fix: str = "pass token ids with --tokens instead") -> Tokenizer:
    """`tokenizer.json` wins when both are present: it carries the BOS/EOS template itself.

    A bare SentencePiece model adds BOS and EOS as `special_token_flags` says.
    """
    json_path = os.path.join(model_dir, "tokenizer.json")
    sp_path = os.path.join(model_dir, "tokenizer.model")
    if os.path.isfile(json_path):
        from tokenizers import Tokenizer as HFTokenizer

        try:
            tok = HFTokenizer.from_file(json_path)
        except Exception as e:
            raise KeptError(f"cannot read {json_path}: {e}; the tokenizer file is corrupt") from None
        return Tokenizer(lambda text, special: tok.encode(text, add_special_tokens=special).ids, json_path,
                         lambda ids: tok.decode(ids, skip_special_tokens=True))
    if os.path.isfile(sp_path):
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor()
        try:
            sp.Load(sp_path)
        except (OSError, RuntimeError) as e:
            raise KeptError(f"cannot read {sp_path}: {e}; the tokenizer file is corrupt") from None
        add_bos, add_eos = special_token_flags(model_dir, architecture)
        return Tokenizer(lambda text, special: sp.Encode(text, add_bos=add_bos and special, add_eos=add_eos and special),
                         sp_path, sp.Decode)
    raise KeptError(f"{model_dir!r} has no tokenizer (tokenizer.json or tokenizer.model); {missing_fix}")


def chat_template(files_dir: str) -> str | None:
    """The chat template of a tokenizer directory: `tokenizer_config.json`'s `chat_template` (a string, or the
    'default' of a list of named ones) or `chat_template.jinja` (how Transformers v5 saves it); None without one."""
    config = read_optional_json(os.path.join(files_dir, "tokenizer_config.json"))
    template = config.get("chat_template")
    if isinstance(template, list):
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"),
                        None)
    jinja = os.path.join(files_dir, "chat_template.jinja")
    if not template and os.path.isfile(jinja):
        with open(jinja, encoding="utf-8") as f:
            template = f.read()
    return template if isinstance(template, str) and template.strip() else None


def chat_ids(files_dir: str, conversations: list[list[dict[str, str]]]) -> tuple[list[list[int]], int | None]:
    """Each conversation's token ids with the assistant's turn opened, as Transformers' `apply_chat_template` makes
    them from this directory's tokenizer files (the template's Jinja, its special tokens, nothing added beyond what
    the template writes), and the id of the tokenizer's end-of-sequence token (where the template ends a turn)."""
    tokenizer = _chat_tokenizer(files_dir)
    ids = [_render(tokenizer, files_dir, c, True, tokenize=True, return_dict=True)["input_ids"] for c in conversations]
    return ids, tokenizer.eos_token_id


def chat_text(files_dir: str, conversation: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
    """The conversation as the template writes it, as text (what lm-eval's `--apply_chat_template` scores)."""
    return _render(_chat_tokenizer(files_dir), files_dir, conversation, add_generation_prompt, tokenize=False)


def _chat_tokenizer(files_dir: str):
    from transformers import AutoTokenizer, PretrainedConfig

    # An empty config: the tokenizer files alone decide, whatever model config.json describes.
    return AutoTokenizer.from_pretrained(files_dir, config=PretrainedConfig(), trust_remote_code=False)


def _render(tokenizer, files_dir: str, conversation, add_generation_prompt: bool, **kwargs):
    try:
        return tokenizer.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt, **kwargs)
    except Exception as e:  # jinja2's errors and a template's own raise_exception
        raise KeptError(f"the chat template in {files_dir} fails on this conversation: {type(e).__name__}: {e}") from None
