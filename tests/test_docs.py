"""The README and docs/ as a user meets them: every link resolves inside the repository (a file that exists, a
heading that exists), and the README stays short enough to find each main command in it."""

import os
import re

import pytest

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
                    "kept_jax.convert --to llamba", "kept_jax.generate", "kept_jax.score"):
        assert f"python -m {command}" in blocks, f"the README shows no example of python -m {command}"
