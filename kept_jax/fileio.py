"""Small file-system helpers shared by every command: outputs appear whole or not at all.

`atomic_output_dir` and `atomic_file` write beside the destination and rename at the end, so an interrupted command
leaves either the old output or none; `check_output_dir` refuses a destination before any expensive work.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from typing import Any, Iterator

from kept_jax.errors import KeptError


def read_text(path: str, what: str) -> str:
    """The UTF-8 text of a file a user named with the flag `what`; each way it can fail is one clear message."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        raise KeptError(f"{what} {path!r} does not exist") from None
    except UnicodeDecodeError as e:
        raise KeptError(f"{what} {path!r} is not UTF-8 text (byte {e.start}); convert it to UTF-8") from None
    except IsADirectoryError:
        raise KeptError(f"{what} {path!r} is a directory; pass a text file") from None
    except PermissionError:
        raise KeptError(f"{what} {path!r} cannot be read (permission denied)") from None


def read_optional_json(path: str) -> dict:
    """A checkpoint's optional JSON side file (`tokenizer_config.json`, `generation_config.json`): {} when absent."""
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise KeptError(f"{path} is not valid JSON ({e}); fix or remove it") from None


def check_output_dir(out_dir: str, force: bool) -> None:
    """Refuses a non-empty output directory unless forced; call before any expensive work."""
    if os.path.isfile(out_dir):
        raise KeptError(f"output {out_dir!r} is a file; choose a directory path")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not force:
        raise KeptError(f"output directory {out_dir!r} exists and is not empty; choose another path or pass --force")
    parent = os.path.dirname(os.path.abspath(out_dir))
    if not os.path.isdir(parent):
        raise KeptError(f"the parent of the output directory, {parent!r}, does not exist; create it first")


@contextlib.contextmanager
def atomic_output_dir(out_dir: str, force: bool) -> Iterator[str]:
    """Yields a temporary directory beside `out_dir`; on success it replaces `out_dir`, on failure it vanishes."""
    check_output_dir(out_dir, force)
    out_dir = os.path.abspath(out_dir)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=os.path.dirname(out_dir))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; the result should look like any other directory
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if os.path.exists(out_dir):
        trash = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.old-", dir=os.path.dirname(out_dir))
        os.replace(out_dir, os.path.join(trash, "old"))
        os.replace(tmp, out_dir)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, out_dir)


@contextlib.contextmanager
def atomic_file(path: str, mode: str = "w") -> Iterator[Any]:
    """An open file at a temporary path beside `path`, renamed to `path` when the block succeeds, removed if not.

    Readers see the old file or the whole new one, never a half-written one (a summary, a log rewrite, a plot).
    """
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.tmp-", dir=os.path.dirname(os.path.abspath(path)))
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; the result should look like any other file
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask
