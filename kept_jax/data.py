"""Training and evaluation data with grain: text, JSONL and Parquet sources -> tokens -> packed fixed-length rows.

    documents (per source, random access) -> tokenize (the teacher's tokenizer; EOS closes every document)
      -> concat-then-split packing, once, into a memory-mapped file of rows (`pack_rows`)
      -> rows shuffled globally by seed, reshuffled every epoch -> mix by weight -> this host's slice -> batches

Every file is indexed and validated when the pipeline is built, so a bad line fails the job before any training,
with the file and line named. The training iterator is a grain `DatasetIterator`: its position is saved in every
checkpoint (`grain.checkpoint.CheckpointSave`) and restored on resume, so no row is lost or repeated.
"""

from __future__ import annotations

import glob
import json
import os
from typing import Callable, Sequence

import grain
import numpy as np

from kept_jax.errors import KeptError
from kept_jax.fileio import atomic_file, json_line, read_optional_json
from kept_jax.train_config import SourceConfig

CORPUS_DIR = os.path.join(os.path.dirname(__file__), "assets", "corpus")
EMBEDDED = {"embedded": os.path.join(CORPUS_DIR, "train.jsonl"),
            "embedded-heldout": os.path.join(CORPUS_DIR, "heldout.jsonl")}
FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".txt": "text", ".text": "text", ".md": "text"}


def _utf8(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise KeptError(f"{where}: invalid UTF-8 at byte {e.start}; convert the file to UTF-8") from None


class _JsonlFile:
    """Byte offsets of a JSONL file's non-blank lines; each line is validated once, here, and re-read on access."""

    def __init__(self, path: str, field: str):
        self.path, self.field = path, field
        offsets, lines = [], []
        with open(path, "rb") as f:
            offset = 0
            for lineno, raw in enumerate(f, start=1):
                if raw.strip():
                    text = self._parse(raw, lineno)
                    if text.strip():
                        offsets.append(offset)
                        lines.append(lineno)
                offset += len(raw)
        self.offsets = np.asarray(offsets, np.int64)
        self.lines = np.asarray(lines, np.int64)

    def _parse(self, raw: bytes, lineno: int) -> str:
        where = f"{self.path}:{lineno}"
        record = json_line(_utf8(raw, where), where)
        if not isinstance(record.get(self.field), str):
            keys = ", ".join(map(str, record))
            raise KeptError(f"{where}: no string field {self.field!r} (found: {keys}); set the source's field")
        return record[self.field]

    def __len__(self) -> int:
        return len(self.offsets)

    def __getitem__(self, i: int) -> str:
        with open(self.path, "rb") as f:
            f.seek(int(self.offsets[i]))
            return self._parse(f.readline(), int(self.lines[i]))


class _TextFile:
    """A plain text file is one document."""

    def __init__(self, path: str):
        self.path = path
        with open(path, "rb") as f:
            raw = f.read()
        for lineno, line in enumerate(raw.split(b"\n"), start=1):
            _utf8(line, f"{path}:{lineno}")
        self.count = 1 if raw.strip() else 0

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> str:
        with open(self.path, encoding="utf-8") as f:
            return f.read()


class _ParquetFile:
    """One named string column of a Parquet file, held in memory as Python strings."""

    def __init__(self, path: str, field: str):
        import pyarrow.parquet as pq

        try:
            schema = pq.read_schema(path)
        except Exception as e:  # pyarrow raises several types for a corrupt or truncated file
            raise KeptError(f"{path} is not a readable Parquet file ({e})") from None
        if field not in schema.names:
            raise KeptError(f"{path} has no column {field!r} (columns: {', '.join(schema.names)}); set the source's field")
        keep = []
        for row, value in enumerate(pq.read_table(path, columns=[field]).column(field).to_pylist()):
            if value is None:
                continue
            if isinstance(value, bytes):
                value = _utf8(value, f"{path}: row {row}")
            if not isinstance(value, str):
                raise KeptError(f"{path}: row {row}: column {field!r} holds {type(value).__name__}, not text")
            if value.strip():
                keep.append(value)
        self.values = keep

    def __len__(self) -> int:
        return len(self.values)

    def __getitem__(self, i: int) -> str:
        return self.values[i]


class _Chain:
    """Documents of several parts (files, sources) as one random-access sequence."""

    def __init__(self, parts):
        self.parts, self.ends = parts, np.cumsum([len(p) for p in parts])

    def __len__(self) -> int:
        return int(self.ends[-1])

    def __getitem__(self, i: int) -> str:
        k = int(np.searchsorted(self.ends, int(i), side="right"))
        return self.parts[k][int(i) - (int(self.ends[k - 1]) if k else 0)]


class Documents(_Chain):
    """The documents of one source (every file its glob matches), as a grain random-access data source."""

    def __init__(self, source: SourceConfig):
        pattern = EMBEDDED.get(source.path, source.path)
        paths = sorted(glob.glob(os.path.expanduser(pattern), recursive=True)) if glob.has_magic(pattern) else [pattern]
        if not paths:
            raise KeptError(f"data source {source.path!r} matches no file; check the path or glob")
        files = []
        for path in paths:
            if not os.path.isfile(path):
                raise KeptError(f"data file {path!r} does not exist; check data.train / data.eval")
            kind = FORMATS.get(os.path.splitext(path)[1].lower(), "text")
            files.append(_JsonlFile(path, source.field) if kind == "jsonl"
                         else _ParquetFile(path, source.field) if kind == "parquet" else _TextFile(path))
        super().__init__(files)
        if len(self) == 0:
            raise KeptError(f"data source {source.path!r} holds no text (every document is empty)")
        self.name = source.path


class _Subset:
    def __init__(self, docs, indices: np.ndarray):
        self.docs, self.indices = docs, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> str:
        return self.docs[self.indices[int(i)]]


def split_heldout(docs: Documents, fraction: float, seed: int) -> tuple[_Subset, _Subset]:
    """(train, held-out): a seeded choice of whole documents, at least one each, so no text is in both."""
    n = len(docs)
    held = min(max(1, round(n * fraction)), n - 1) if n > 1 else 0
    if held == 0:
        raise KeptError(f"data source {docs.name!r} has one document, too few to hold some out; give data.eval")
    order = np.random.default_rng([seed, 0x4E1D]).permutation(n)
    return _Subset(docs, np.sort(order[held:])), _Subset(docs, np.sort(order[:held]))


def _sources(spec) -> tuple[SourceConfig, ...]:
    return (SourceConfig(spec),) if isinstance(spec, str) else spec


def open_sources(data_cfg, seed: int) -> tuple[list, list[float], object]:
    """(training document sources, their weights, held-out documents) for a `DataConfig`.

    `eval: embedded` with the embedded training text is the shipped held-out split; `eval: split` holds out
    `eval_fraction` of every training source's documents, chosen by the seed.
    """
    sources = _sources(data_cfg.train)
    train = [Documents(s) for s in sources]
    weights = [s.weight for s in sources]
    if data_cfg.eval == "split":
        pairs = [split_heldout(docs, data_cfg.eval_fraction, seed) for docs in train]
        return [p[0] for p in pairs], weights, _Chain([p[1] for p in pairs])
    if data_cfg.eval == "embedded":
        return train, weights, Documents(SourceConfig("embedded-heldout"))
    held = [Documents(s) for s in _sources(data_cfg.eval)]
    return train, weights, held[0] if len(held) == 1 else _Chain(held)


class Tokenize(grain.transforms.Map):
    """text -> {"tokens": int32 ids}: the tokenizer's own template (e.g. BOS), then EOS unless it already ends so."""

    def __init__(self, encode: Callable[[str], Sequence[int]], eos_id: int | None):
        self.encode, self.eos_id = encode, eos_id

    def map(self, text: str) -> dict:
        ids = list(self.encode(text))
        if self.eos_id is not None and (not ids or ids[-1] != self.eos_id):
            ids.append(self.eos_id)
        return {"tokens": np.asarray(ids, np.int32)}


def _pack(docs, tokenize: Tokenize, seq_len: int, write: Callable[[np.ndarray], None], max_rows: int | None = None,
          progress=None) -> int:
    """Concat-then-split packing: the documents' tokens in order, cut into whole [n, seq_len] rows handed to `write`;
    the tokens after the last whole row are not used. Returns how many rows were written."""
    carry, written = np.zeros(0, np.int32), 0
    for i in range(len(docs)):
        carry = np.concatenate([carry, tokenize.map(docs[i])["tokens"]])
        n = len(carry) // seq_len if max_rows is None else min(len(carry) // seq_len, max_rows - written)
        if n:
            write(carry[: n * seq_len].reshape(n, seq_len))
            carry, written = carry[n * seq_len :], written + n
        if progress is not None:
            progress.update(1)
        if written == max_rows:
            break
    return written


def pack_rows(docs, tokenize: Tokenize, seq_len: int, path: str | None = None, progress=None) -> np.ndarray:
    """All of `docs` tokenized once and packed into [rows, seq_len] int32 rows: in memory, or with `path` written to
    `path` (raw int32, row after row) and `path.json` (its index) and returned memory-mapped.

    An existing, complete pair for the same `seq_len` is reused as it is, without reading the documents again: a
    resumed run trains on exactly the rows it started with. The index is written last, so a pair cut short by a
    crash is never taken for complete.
    """
    if path is None:
        chunks: list[np.ndarray] = []
        _pack(docs, tokenize, seq_len, chunks.append, progress=progress)
        return np.concatenate(chunks) if chunks else np.zeros((0, seq_len), np.int32)
    index_path = f"{path}.json"
    index = read_optional_json(index_path)
    complete = (index.get("seq_len") == seq_len and os.path.isfile(path)
                and os.path.getsize(path) == index.get("rows", -1) * seq_len * 4)
    if not complete:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with atomic_file(path, "wb") as f:
            rows = _pack(docs, tokenize, seq_len, lambda block: f.write(block.astype("<i4").tobytes()),
                         progress=progress)
        index = {"rows": rows, "seq_len": seq_len, "dtype": "int32", "documents": len(docs),
                 "source": getattr(docs, "name", None)}
        with atomic_file(index_path) as f:
            json.dump(index, f)
    if not index["rows"]:
        return np.zeros((0, seq_len), np.int32)
    return np.memmap(path, np.dtype("<i4"), "r", shape=(index["rows"], seq_len))


def train_dataset(sources: Sequence[np.ndarray], weights: Sequence[float], rows_per_step: int, seed: int,
                  process_index: int = 0, process_count: int = 1) -> grain.IterDataset:
    """Endless [rows_per_step / process_count, seq_len] int32 batches of this host's share of the packed rows.

    Each source's rows (`pack_rows`) are shuffled globally by the seed, and shuffled again differently every epoch;
    sources are mixed by `weights`. Hosts read disjoint rows: every host shuffles the same way and keeps every
    `process_count`-th row.
    """
    if rows_per_step % process_count:
        raise KeptError(f"the global batch ({rows_per_step} rows) does not split over {process_count} hosts")
    parts = [grain.MapDataset.source(rows).seed(seed + i).shuffle().repeat() for i, rows in enumerate(sources)]
    mixed = parts[0] if len(parts) == 1 else grain.MapDataset.mix(parts, list(weights))
    local = mixed[process_index::process_count] if process_count > 1 else mixed
    return local.batch(rows_per_step // process_count, drop_remainder=True).to_iter_dataset()


def first_rows(docs, tokenize: Tokenize, seq_len: int, count: int) -> np.ndarray:
    """The first `count` packed rows of `docs` in order (all of them if the text runs out first), [rows, seq_len]."""
    rows: list[np.ndarray] = []
    _pack(docs, tokenize, seq_len, rows.append, max_rows=count)
    if not rows:
        raise KeptError(f"the text has fewer tokens than one sequence of {seq_len}; give more text")
    return np.concatenate(rows)
