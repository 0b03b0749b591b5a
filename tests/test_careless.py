"""What a careless user breaks (issue 39): each case is one line on stderr, exit code 2, before any work, nothing
half-written, and what a killed run left is removed by the next one."""

import os
import subprocess
import sys

import pytest

from bridge import gguf_import
from kept_jax import convert
from kept_jax.fileio import sweep_leftovers
from tests.test_gguf import gguf_files, vocabs  # noqa: F401  (module fixtures)


def _dead_pid() -> int:
    """The pid of a process that has ended (a killed writer's)."""
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                           check=True)
    return int(child.stdout)


def test_a_killed_exports_leftover_is_removed_by_the_next_run(gguf_files, tmp_path, capsys):  # noqa: F811
    """`convert --out NAME` killed during its export leaves `.NAME.tmp-*` (152 MB for SmolLM2): the next run removes
    it and says so; a leftover of a live run, or another output's, stays."""
    out = tmp_path / "tiny"
    killed = tmp_path / f".tiny.tmp-{_dead_pid()}-abc123"
    older = tmp_path / ".tiny.tmp-k2j4h5"  # the name an earlier kept_jax gave, without its writer's pid
    live = tmp_path / f".tiny.tmp-{os.getpid()}-def456"
    other = tmp_path / f".other.tmp-{_dead_pid()}-abc123"
    for folder in (killed, older, live, other):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"half")
    assert convert.main(["--source", gguf_files["float"], "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert not killed.exists() and not older.exists() and live.exists() and other.exists()
    assert f"removed {killed}, left by an interrupted run" in err and f"removed {older}" in err
    assert sorted(os.listdir(tmp_path)) == sorted([live.name, other.name, "tiny"])


def test_a_killed_gguf_readers_staging_folder_is_removed_by_the_next_reader(gguf_files, tmp_path, monkeypatch):  # noqa: F811
    """`generate --model X.gguf` killed leaves its tokenizer files in the temporary folder: the next reader of a GGUF
    sweeps such folders whose process has ended."""
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    killed = tmp_path / f"{gguf_import.GGUF_STAGING}{_dead_pid()}-xyz"
    live = tmp_path / f"{gguf_import.GGUF_STAGING}{os.getpid()}-xyz"
    for folder in (killed, live):
        folder.mkdir()
        (folder / "tokenizer.json").write_text("{}")
    files = gguf_import.GGUFFile(gguf_files["float"]).files_dir
    assert not killed.exists() and live.exists() and os.path.dirname(files) == str(tmp_path)


def test_only_kept_jax_names_are_swept(tmp_path):
    (tmp_path / "tiny.tmp-1-x").mkdir()  # not hidden: not a name kept_jax gives
    (tmp_path / ".tiny.tmpfile").write_text("mine")
    assert sweep_leftovers(str(tmp_path), ".tiny.tmp-") == []
    assert sorted(os.listdir(tmp_path)) == [".tiny.tmpfile", "tiny.tmp-1-x"]
