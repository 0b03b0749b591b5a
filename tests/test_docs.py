"""The README and docs/ as a user meets them: every link resolves inside the repository (a file that exists, a
heading that exists), the README stays short and shows every main command, each command shown parses (a job's
config loads), and the cheap ones run as written."""

import os
import re

import pytest

from kept_jax.errors import KeptError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = ["README.md"] + sorted(os.path.join("docs", n) for n in os.listdir(os.path.join(ROOT, "docs"))
                               if n.endswith(".md"))
LINK = re.compile(r"\]\(([^)\s]+)\)")


def prose(text: str) -> str:
    """The page without its fenced code blocks (a `# comment` in a shell block is not a heading)."""
    return re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)


def anchor(heading: str) -> str:
    """GitHub's id for a heading: lower case, punctuation other than '-' and '_' dropped, spaces to '-'."""
    text = heading.strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: str) -> set[str]:
    with open(path, encoding="utf-8") as f:
        return {anchor(m) for m in re.findall(r"^#+ (.*)$", prose(f.read()), flags=re.M)}


def links(page: str) -> list[str]:
    with open(os.path.join(ROOT, page), encoding="utf-8") as f:
        return LINK.findall(prose(f.read()))


def test_anchor_follows_github():
    assert anchor("MOHAWK: distill a Llamba, `python -m kept_jax.train --config configs/tiny-llamba.yaml`") == \
        "mohawk-distill-a-llamba-python--m-kept_jaxtrain---config-configstiny-llambayaml"
    assert anchor("Real checkpoints: GGUF files and SmolLM2-135M-Instruct") == \
        "real-checkpoints-gguf-files-and-smollm2-135m-instruct"


@pytest.mark.parametrize("page", PAGES)
def test_every_link_stays_inside_the_repository_and_resolves(page):
    broken = []
    for target in links(page):
        if re.match(r"[a-z]+://", target):
            continue  # a web address (papers, upstream projects) is not a path in the clone
        path, _, fragment = target.partition("#")
        resolved = os.path.normpath(os.path.join(ROOT, os.path.dirname(page), path)) if path else \
            os.path.join(ROOT, page)
        if not resolved.startswith(ROOT + os.sep) or not os.path.exists(resolved):
            broken.append(f"{target}: no such file in the repository")
        elif fragment and fragment not in anchors(resolved):
            broken.append(f"{target}: no heading '{fragment}' in {os.path.relpath(resolved, ROOT)}")
    assert not broken, f"{page}: " + "; ".join(broken)


def test_the_readme_is_short_and_shows_every_main_command():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    assert len(text.splitlines()) <= 250, "the README is the front page; move details to docs/"
    blocks = "\n".join(re.findall(r"^```(?:bash)?\n(.*?)^```", text, flags=re.M | re.S))
    for command in ("kept_jax.train", "kept_jax.train --config configs/tiny-llamba.yaml", "kept_jax.convert",
                    "kept_jax.convert --to llamba", "kept_jax.convert --to mlx", "kept_jax.generate", "kept_jax.score",
                    "kept_jax.evaluate", "kept_jax.harness run"):
        assert f"python -m {command}" in blocks, f"the README shows no example of python -m {command}"


PROGRAMS = ("kept_jax.train", "kept_jax.convert", "kept_jax.generate", "kept_jax.score", "kept_jax.evaluate",
            "bridge.verify")


def shown_commands() -> list[tuple[str, list[str]]]:
    """Every `python -m PROGRAM ...` line of a shell block in the README and docs/ (continuations joined, comments
    and a `$ ` prompt dropped), as (page, argv after the program); usage synopses (with [ ] or |) are left out."""
    return [(page, argv) for page in PAGES for block in shell_blocks(page) for argv in block_commands(block)]


def shell_blocks(page: str) -> list[str]:
    with open(os.path.join(ROOT, page), encoding="utf-8") as f:
        return re.findall(r"^```(?:bash)?\n(.*?)^```", f.read(), flags=re.M | re.S)


def block_commands(block: str) -> list[list[str]]:
    """The `python -m PROGRAM ...` commands of one shell block, in order, as argv after `python -m`."""
    import shlex

    commands = []
    for line in block.replace("\\\n", " ").splitlines():
        line = line.removeprefix("$ ").split("  #")[0].strip()
        if not line.startswith("python -m ") or re.search(r"[\[|]| [A-Z]+(_[A-Z]+)*\b", line):
            continue
        argv = shlex.split(line)[2:]
        if argv[0] in PROGRAMS:
            commands.append([a.replace("$GGUF", "model.gguf") for a in argv])
    return commands


def test_every_command_shown_parses_and_its_config_loads():
    """Each command in the docs has flags its program accepts, and a job's config with its overrides loads."""
    import importlib

    from kept_jax.train_config import load_config

    commands = shown_commands()
    assert len(commands) >= 15, commands  # the extraction found the commands
    for page, argv in commands:
        program = importlib.import_module(argv[0])
        try:
            args = program.parse_args(argv[1:])
        except (SystemExit, KeptError):
            raise AssertionError(f"{page}: python -m {' '.join(argv)}: the program refuses these flags") from None
        if argv[0] == "kept_jax.train":
            load_config(os.path.join(ROOT, args.config) if args.config else None, args.overrides)


def test_the_readmes_convert_block_runs_as_a_chain(tmp_path):
    """Each command after the one that writes what it reads: the README's Convert block, in a scratch directory (the
    embedded model is the default source; the configs are the repository's)."""
    import subprocess
    import sys

    block = next(block_commands(b) for b in shell_blocks("README.md")
                 if b.startswith("python -m kept_jax.convert --out out/tiny-llama"))
    assert len(block) == 3 and block[1][:3] == ["kept_jax.convert", "--to", "llamba"], block
    os.symlink(os.path.join(ROOT, "configs"), tmp_path / "configs")
    env = {**os.environ, "PYTHONPATH": ROOT}
    for argv in block:
        proc = subprocess.run([sys.executable, "-m", *argv], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, (argv, proc.stderr[-2000:])


CHEAP = [  # run as written from the repository root: nothing to download, nothing written, seconds each
    ["kept_jax.score", "--model", "kept_jax/assets/tiny-orion", "--text", "Return a new exception."],
    ["kept_jax.convert", "--source", "configs/models/orion-14b.json", "--opm", "absorb", "--dry-run"],
]


@pytest.mark.parametrize("argv", CHEAP, ids=lambda a: a[0])
def test_the_cheap_commands_run_as_written(argv):
    import subprocess
    import sys

    assert ("README.md", argv) in shown_commands(), "run what the README shows"
    proc = subprocess.run([sys.executable, "-m", *argv], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
