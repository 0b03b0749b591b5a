"""Small file-system helpers shared by every command: outputs appear whole or not at all.

`atomic_output_dir` and `atomic_file` write beside the destination and rename at the end, so an interrupted command
leaves either the old output or none; `check_output_dir` refuses a destination before any expensive work.
"""

from __future__ import annotations

import contextlib
import fnmatch
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


def json_line(line: str, where: str) -> dict:
    """One line of a JSONL file as the JSON object it must be (`where`: file and line, for the message)."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise KeptError(f"{where}: not a JSON object ({e.msg}); every line must be one JSON object") from None
    if not isinstance(record, dict):
        raise KeptError(f"{where}: not a JSON object (a {type(record).__name__}); every line must be one JSON object")
    return record


def jsonl_records(path: str, what: str) -> Iterator[tuple[str, dict]]:
    """(where, object) for each non-blank line of a JSONL file a user named with the flag `what`."""
    for number, line in enumerate(read_text(path, what).splitlines(), 1):
        if line.strip():
            where = f"{path}:{number}"
            yield where, json_line(line, where)


def read_optional_json(path: str) -> dict:
    """A checkpoint's optional JSON side file (`tokenizer_config.json`, `generation_config.json`): {} when absent."""
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise KeptError(f"{path} is not valid JSON ({e}); fix or remove it") from None


INTERRUPTED = (".*.tmp-*", ".*.old-*")  # what an atomic write leaves when it is killed
# What kept_jax writes into an output directory (an export, a run directory): `--force` replaces a directory only
# when everything in it matches one of these, so it never deletes a file kept_jax did not write.
OUTPUT_NAMES = (
    "config.json", "generation_config.json", "model.safetensors", "model-*-of-*.safetensors",
    "model.safetensors.index.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json",
    "special_tokens_map.json", "chat_template.jinja", "chat_template.json", "conversion_report.json",
    "conversion_report.md",  # exports
    # run directories
    "metrics.jsonl", "timings.jsonl", "tensorboard", "report.png", "checkpoints", "export", "summary.json",
    "packed_rows", "chat.json",
    *INTERRUPTED,
)


def _writer_is_gone(name: str, prefix: str) -> bool:
    """Whether the process that made `name` (`<prefix><pid>-<random>`, `owned_temp_path`) has ended: a name without
    a pid is an older kept_jax's, whose writer is gone too. A pid now used by another process is taken as alive."""
    pid = name[len(prefix):].split("-", 1)[0]
    if not pid.isdigit():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # another user's live process
        return False
    return False


def sweep_leftovers(parent: str, prefix: str) -> list[str]:
    """Deletes the entries of `parent` named `<prefix>...` whose writer was killed (a kill -9 runs no cleanup) and
    says so on stderr; returns their paths. Only names kept_jax gives (`owned_temp_path`) are ever matched."""
    import sys

    removed = []
    with contextlib.suppress(FileNotFoundError, PermissionError):
        for name in sorted(os.listdir(parent)):
            if name.startswith(prefix) and _writer_is_gone(name, prefix):
                path = os.path.join(parent, name)
                with contextlib.suppress(OSError):
                    shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.unlink(path)
                    removed.append(path)
                    print(f"note: removed {path}, left by an interrupted run", file=sys.stderr)
    return removed


def owned_temp_path(parent: str, prefix: str, directory: bool = True) -> str | tuple[int, str]:
    """A new temporary directory (or, with `directory` False, an open file's (fd, path)) in `parent`, named
    `<prefix><pid>-<random>` so that a later run can tell a killed writer's leftover from a live one's, after
    sweeping such leftovers (`sweep_leftovers`)."""
    sweep_leftovers(parent, prefix)
    named = f"{prefix}{os.getpid()}-"
    return tempfile.mkdtemp(prefix=named, dir=parent) if directory else tempfile.mkstemp(prefix=named, dir=parent)


def foreign_entries(out_dir: str) -> list[str]:
    """The entries of `out_dir` that kept_jax does not write."""
    return sorted(n for n in os.listdir(out_dir) if not any(fnmatch.fnmatch(n, p) for p in OUTPUT_NAMES))


def remove_interrupted_writes(out_dir: str) -> list[str]:
    """Deletes what atomic writes into `out_dir` left when killed (`INTERRUPTED`, names only kept_jax gives);
    returns their names."""
    names = sorted(n for n in os.listdir(out_dir) if any(fnmatch.fnmatch(n, p) for p in INTERRUPTED))
    for name in names:
        path = os.path.join(out_dir, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        else:
            os.unlink(path)
    return names


def check_output_dir(out_dir: str, force: bool, needed_bytes: int = 0, flag: str = "--force") -> None:
    """Refuses, before any expensive work, an output kept_jax cannot or must not write: a non-empty directory
    without `force`, or with `force` one holding files kept_jax did not write; a path that is or is under a
    regular file; a location that is not writable; one without `needed_bytes` free. Missing parent directories are
    not an error: the write creates them, as `mkdir -p` would."""
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise KeptError(f"output {out_dir!r} is a file; choose a directory path")
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        if not force:
            raise KeptError(f"output directory {out_dir!r} exists and is not empty; choose another path or pass "
                            "--force")
        foreign = foreign_entries(out_dir)
        if foreign:
            shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
            raise KeptError(f"{flag} replaces only what kept_jax wrote, and {out_dir!r} also holds {shown}; move "
                            "them away or choose another output path")
    check_location(out_dir, needed_bytes)


def check_location(out_dir: str, needed_bytes: int = 0) -> None:
    """The location checks of `check_output_dir` alone (for a directory that may be resumed into)."""
    out_dir = os.path.abspath(out_dir)
    existing = out_dir
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise KeptError(f"output {out_dir!r} is under {existing!r}, which is a regular file, not a directory; "
                        "choose another path")
    try:  # a file made and dropped there: permissions, a read-only mount, what root may not write either
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise KeptError(f"cannot write to {existing!r} ({os.strerror(e.errno) if e.errno else e}); choose another "
                        "output path") from None
    free = shutil.disk_usage(existing).free
    if free < needed_bytes:
        raise KeptError(f"not enough space on {existing!r}: the output needs about {needed_bytes / 1e9:.2f} GB and "
                        f"{free / 1e9:.2f} GB is free; free some space or choose another output path")


def write_failure_message(error: OSError, path: str) -> str | None:
    """One line for a write that failed for lack of space or permission (a disk that filled up after the check)."""
    import errno

    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"no space left on the device of {path!r}; free some space or choose another output path"
    if error.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return f"cannot write to {path!r} ({os.strerror(error.errno)}); choose another output path"
    return None


@contextlib.contextmanager
def atomic_output_dir(out_dir: str, force: bool) -> Iterator[str]:
    """Yields a temporary directory beside `out_dir`; on success it replaces `out_dir`, on failure it vanishes."""
    check_output_dir(out_dir, force)
    out_dir = os.path.abspath(out_dir)
    os.makedirs(os.path.dirname(out_dir), exist_ok=True)
    tmp = owned_temp_path(os.path.dirname(out_dir), f".{os.path.basename(out_dir)}.tmp-")
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; the result should look like any other directory
    try:
        yield tmp
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and (message := write_failure_message(e, out_dir)):
            raise KeptError(message) from None
        raise
    if os.path.exists(out_dir):
        trash = owned_temp_path(os.path.dirname(out_dir), f".{os.path.basename(out_dir)}.old-")
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
    fd, tmp = owned_temp_path(os.path.dirname(os.path.abspath(path)), f".{os.path.basename(path)}.tmp-",
                              directory=False)
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
