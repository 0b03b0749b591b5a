"""The grain data pipeline: sources, packing, determinism, resumable position, host slices and bad data."""

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kept_jax import data
from kept_jax.errors import KeptError
from kept_jax.train_config import load_config

EOS = 0


def encode(text: str) -> list[int]:
    """A byte-level stand-in for the teacher's tokenizer (ids 1..256)."""
    return [b + 1 for b in text.encode("utf-8")]


TOKENIZE = data.Tokenize(encode, EOS)


def write_jsonl(path, texts, field="text"):
    with open(path, "w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({field: t, "id": len(t)}) + "\n")
    return str(path)


def docs(tmp_path, name, count, field="text"):
    return write_jsonl(tmp_path / name, [f"{name} document {i} " * (i % 5 + 1) for i in range(count)], field)


def test_sources_of_every_format_read_the_same_documents(tmp_path):
    texts = ["first document", "", "second one", "third, with ünïcode"]
    jsonl = write_jsonl(tmp_path / "a.jsonl", texts, field="body")
    pq.write_table(pa.table({"content": texts}), tmp_path / "a.parquet")
    for i, t in enumerate(texts):
        (tmp_path / f"part{i}.txt").write_text(t, encoding="utf-8")
    expected = [t for t in texts if t]  # empty documents are skipped
    assert list(data.Documents(data.SourceConfig(jsonl, field="body"))) == expected
    assert list(data.Documents(data.SourceConfig(str(tmp_path / "a.parquet"), field="content"))) == expected
    assert list(data.Documents(data.SourceConfig(str(tmp_path / "part*.txt")))) == expected


def test_packing_concatenates_documents_with_eos_and_cuts_whole_rows():
    rows = data.first_rows(["ab", "cde", "f"], TOKENIZE, seq_len=3, count=10)
    stream = [98, 99, EOS, 100, 101, 102, EOS, 103, EOS]
    np.testing.assert_array_equal(rows, np.asarray(stream).reshape(3, 3))
    rows = data.first_rows(["ab", "cde", "fg"], TOKENIZE, seq_len=3, count=10)
    assert rows.shape == (3, 3)  # the 10th token would start a padded row: dropped


def test_tokenizer_template_is_kept_and_eos_not_doubled():
    with_bos_eos = data.Tokenize(lambda t: [1] + encode(t) + [2], eos_id=2)
    np.testing.assert_array_equal(with_bos_eos.map("a")["tokens"], [1, 98, 2])
    np.testing.assert_array_equal(data.Tokenize(lambda t: [1] + encode(t), eos_id=2).map("a")["tokens"], [1, 98, 2])


def first_batches(ds, n):
    it = iter(ds)
    return [next(it) for _ in range(n)]


def packed(tmp_path, name, count):
    return data.pack_rows(data.Documents(data.SourceConfig(docs(tmp_path, name, count))), TOKENIZE, 16)


def test_rows_are_packed_once_into_a_memory_mapped_file_and_reused(tmp_path):
    source = data.Documents(data.SourceConfig(docs(tmp_path, "a.jsonl", 40)))
    path = str(tmp_path / "cache" / "train-0.rows")
    rows = data.pack_rows(source, TOKENIZE, 16, path)
    assert isinstance(rows, np.memmap) and rows.dtype == np.int32
    np.testing.assert_array_equal(rows, data.first_rows(source, TOKENIZE, 16, count=10**9))
    np.testing.assert_array_equal(rows, data.pack_rows(source, TOKENIZE, 16))  # the same rows in memory

    def never(text):
        raise AssertionError("the documents were tokenized again")

    again = data.pack_rows(source, data.Tokenize(never, EOS), 16, path)  # reused as written: no tokenizing
    np.testing.assert_array_equal(again, rows)
    with pytest.raises(AssertionError, match="tokenized again"):  # another row length packs afresh
        data.pack_rows(source, data.Tokenize(never, EOS), 8, path)
    os.remove(path + ".json")  # a file whose index was never written (a crash mid-pack) is packed again
    with pytest.raises(AssertionError, match="tokenized again"):
        data.pack_rows(source, data.Tokenize(never, EOS), 16, path)


def test_rows_are_shuffled_globally_and_differently_every_epoch():
    n = 64
    rows = np.arange(n * 4, dtype=np.int32).reshape(n, 4)  # row i starts with 4 i
    seen = np.concatenate(first_batches(data.train_dataset([rows], [1.0], 1, seed=3), 3 * n))
    order = [(seen[k * n : (k + 1) * n, 0] // 4).tolist() for k in range(3)]
    for epoch in order:  # every packed row exactly once per epoch
        assert sorted(epoch) == list(range(n))
    assert order[0] != order[1] != order[2] and order[0] != list(range(n))
    # Globally: the first rows of an epoch come from all over the packed set, not from a few documents.
    assert max(order[0][:8]) - min(order[0][:8]) > n // 2


def test_shuffle_is_deterministic_by_seed(tmp_path):
    rows = [packed(tmp_path, "a.jsonl", 40)]
    same = [first_batches(data.train_dataset(rows, [1.0], 4, seed=0), 6) for _ in range(2)]
    other = first_batches(data.train_dataset(rows, [1.0], 4, seed=1), 6)
    assert all(np.array_equal(a, b) for a, b in zip(*same))
    assert not all(np.array_equal(a, b) for a, b in zip(same[0], other))


def test_iterator_position_restores_exactly(tmp_path):
    rows = [packed(tmp_path, "a.jsonl", 15)]
    ds = data.train_dataset(rows, [1.0], 4, seed=0)
    it = iter(ds)
    for _ in range(7):
        next(it)
    state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
    expected = [next(it) for _ in range(20)]  # crosses an epoch boundary
    assert 7 * 4 < len(rows[0]) < 27 * 4
    resumed = iter(ds)
    resumed.set_state(state)
    assert all(np.array_equal(a, b) for a, b in zip(expected, [next(resumed) for _ in range(20)]))


def test_mixture_follows_weights(tmp_path):
    a = data.Documents(data.SourceConfig(write_jsonl(tmp_path / "a.jsonl", ["a"] * 50)))
    b = data.Documents(data.SourceConfig(write_jsonl(tmp_path / "b.jsonl", ["b"] * 50)))
    sources = [data.pack_rows(docs, TOKENIZE, 2) for docs in (a, b)]
    rows = np.concatenate(first_batches(data.train_dataset(sources, [3.0, 1.0], 10, seed=0), 40))
    share_a = np.mean(rows[:, 0] == encode("a")[0])
    assert share_a == pytest.approx(0.75, abs=0.03)


def test_hosts_read_disjoint_halves(tmp_path):
    texts = [f"doc{i:03d}" for i in range(64)]
    source = [data.pack_rows(data.Documents(data.SourceConfig(write_jsonl(tmp_path / "a.jsonl", texts))), TOKENIZE, 7)]
    seen = []
    for host in range(2):
        ds = data.train_dataset(source, [1.0], 2, seed=0, process_index=host, process_count=2)
        rows = np.concatenate(first_batches(ds, 32))  # 32 rows of 7: one 6-byte document + EOS each
        seen.append({bytes(int(t) - 1 for t in row[:-1]).decode() for row in rows})
    assert len(seen[0]) == len(seen[1]) == 32 and not seen[0] & seen[1]
    with pytest.raises(KeptError, match="does not split over 3 hosts"):
        data.train_dataset(source, [1.0], 4, seed=0, process_index=0, process_count=3)


def test_heldout_split_is_disjoint_and_seeded(tmp_path):
    cfg, _ = load_config(None, [f"data.train={docs(tmp_path, 'a.jsonl', 50)}", "data.eval=split",
                                "data.eval_fraction=0.1"])
    (train,), _, held = data.open_sources(cfg.data, seed=0)
    assert len(held) == 5 and len(train) == 45 and not set(held) & set(train)
    assert list(data.open_sources(cfg.data, seed=0)[2]) == list(held)
    assert list(data.open_sources(cfg.data, seed=1)[2]) != list(held)


def test_config_accepts_paths_and_weighted_sources(tmp_path):
    a, b = docs(tmp_path, "a.jsonl", 3), docs(tmp_path, "b.jsonl", 3, field="content")
    cfg, _ = load_config(None, [f"data.train=[{a}, {{path: {b}, field: content, weight: 2}}]"])
    train, weights, _ = data.open_sources(cfg.data, seed=0)
    assert [len(t) for t in train] == [3, 3] and weights == [1.0, 2.0]


@pytest.mark.parametrize("make, message", [
    (lambda p: str(p / "missing.jsonl"), r"missing.jsonl' does not exist"),
    (lambda p: str(p / "nothing*.jsonl"), "matches no file"),
    (lambda p: write_jsonl(p / "empty.jsonl", ["", "  "]), "holds no text"),
    (lambda p: write_jsonl(p / "f.jsonl", ["ok", "fine"], field="body"), r"f.jsonl:1: no string field 'text' "
                                                                          r"\(found: body, id\)"),
    (lambda p: (p / "j.jsonl").write_text('{"text": "ok"}\n\n{"text": 3\n') and str(p / "j.jsonl"),
     r"j.jsonl:3: not a JSON object"),
    (lambda p: (p / "b.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "\xff\xfe"}\n') and str(p / "b.jsonl"),
     r"b.jsonl:2: invalid UTF-8 at byte 10"),
    (lambda p: (p / "t.txt").write_bytes(b"fine\nline two \xc3\x28\n") and str(p / "t.txt"),
     r"t.txt:2: invalid UTF-8 at byte 9"),
    (lambda p: pq.write_table(pa.table({"body": ["x"]}), p / "q.parquet") or str(p / "q.parquet"),
     r"q.parquet has no column 'text' \(columns: body\)"),
    (lambda p: (p / "bad.parquet").write_bytes(b"PAR1 not really") and str(p / "bad.parquet"),
     "is not a readable Parquet file"),
])
def test_bad_data_is_reported_with_file_and_line(tmp_path, make, message):
    with pytest.raises(KeptError, match=message):
        data.Documents(data.SourceConfig(make(tmp_path)))
