"""The embedded corpus: Python standard-library documentation as rendered by `pydoc`, one document per module.

`gather()` rebuilds it from the running interpreter's standard library; the shipped copy in
`kept_jax/assets/corpus/` was gathered from CPython 3.11.7 (PSF License, see ATTRIBUTION.md there).
"""

from __future__ import annotations

import importlib
import json
import os
import re
import sys
from typing import Callable, Sequence

import numpy as np


CORPUS_DIR = os.path.join(os.path.dirname(__file__), "assets", "corpus")
TRAIN = os.path.join(CORPUS_DIR, "train.jsonl")
HELDOUT = os.path.join(CORPUS_DIR, "heldout.jsonl")

# Modules whose import has side effects, needs a display or another platform, or that are not documentation.
_SKIP = {
    "antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "lib2to3", "ensurepip", "venv",
    "pydoc_data", "msilib", "winreg", "winsound", "nt", "msvcrt", "builtins",
}
MAX_CHARS_PER_MODULE = 40_000
HELDOUT_EVERY = 20


def _scrub(line: str) -> str:
    """Machine-specific values in signatures (environment, interpreter path, temp names) -> fixed text."""
    line = re.sub(r"environ\(\{.*?\}\)", "environ({})", line)
    for path in sorted({sys.executable, sys.prefix, sys.exec_prefix, os.path.expanduser("~")}, key=len, reverse=True):
        if len(path) > 1:
            line = line.replace(path, "<python>" if path == sys.executable else "<prefix>")
    return re.sub(r"/tmp/tmp[a-z0-9_]{6,}", "/tmp/tmpXXXXXXXX", line)


def _render(module_name: str) -> str | None:
    import pydoc

    try:
        module = importlib.import_module(module_name)
        text = pydoc.render_doc(module, renderer=pydoc.plaintext)
    except Exception:  # a module that cannot be imported or rendered here is simply not part of the corpus
        return None
    lines = []
    skip_section = False
    for line in text.splitlines():
        if line in ("FILE", "MODULE REFERENCE", "DATA"):  # machine-specific paths, URLs and value reprs (os.environ)
            skip_section = True
            continue
        if skip_section and line and not line.startswith(" "):
            skip_section = False
        if skip_section or re.search(r" at 0x[0-9a-f]+", line):
            continue
        lines.append(_scrub(line.rstrip()))
    text = "\n".join(lines).strip() + "\n"
    if len(text) > MAX_CHARS_PER_MODULE:
        text = text[: text.rfind("\n", 0, MAX_CHARS_PER_MODULE) + 1]
    return text


def gather(out_dir: str = CORPUS_DIR) -> tuple[int, int]:
    """Writes train.jsonl and heldout.jsonl (every 20th module, by name, is held out). Returns their sizes."""
    names = sorted(m for m in sys.stdlib_module_names if not m.startswith("_") and m not in _SKIP)
    # Signatures show defaults such as os.environ: render with an empty environment so that none of it is shipped.
    saved = dict(os.environ)
    os.environ.clear()
    try:
        docs = [(name, text) for name in names if (text := _render(name))]
    finally:
        os.environ.update(saved)
    os.makedirs(out_dir, exist_ok=True)
    sizes = []
    for path, split in ((os.path.join(out_dir, "train.jsonl"), 0), (os.path.join(out_dir, "heldout.jsonl"), 1)):
        chosen = [(n, t) for i, (n, t) in enumerate(docs) if (i % HELDOUT_EVERY == HELDOUT_EVERY - 1) == bool(split)]
        with open(path, "w", encoding="utf-8") as f:
            for name, text in chosen:
                f.write(json.dumps({"module": name, "text": text}, ensure_ascii=False) + "\n")
        sizes.append(sum(len(t) for _, t in chosen))
    return sizes[0], sizes[1]


def read_documents(path: str, field: str = "text") -> list[str]:
    """The non-empty documents of a JSONL file (a text `field` per line), a Parquet column or a text file."""
    from kept_jax.data import Documents
    from kept_jax.train_config import SourceConfig

    return list(Documents(SourceConfig(path, field)))


def token_rows(path: str, encode: Callable[[str], Sequence[int]], seq_len: int, eos_id: int | None) -> np.ndarray:
    """The documents of a file, tokenized with `encode` (EOS after each) and packed into [rows, seq_len] int32."""
    from kept_jax.data import Documents, Tokenize, first_rows
    from kept_jax.train_config import SourceConfig

    return first_rows(Documents(SourceConfig(path)), Tokenize(encode, eos_id), seq_len, count=sys.maxsize)
