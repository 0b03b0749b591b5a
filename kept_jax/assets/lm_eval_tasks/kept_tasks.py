"""Offline lm-eval tasks from the text kept_jax ships (the embedded corpus's held-out split: 10 Python documentation
pages, never trained on), for machines without a dataset hub. Loaded by the YAML files beside this one through
lm-eval's `custom_dataset`."""

import json
import os
import random
import re

import datasets

HELDOUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "corpus", "heldout.jsonl")
PAGE_CHARS = 2000  # of each page: enough for several windows of a small model, cheap on a CPU
CHOICES = 4
ITEMS_PER_PAGE = 5


def _pages() -> list[dict]:
    with open(HELDOUT, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def heldout_pages(**kwargs) -> datasets.DatasetDict:
    """kept_heldout: the first PAGE_CHARS characters of each held-out page, scored as one document each."""
    rows = [{"module": p["module"], "text": p["text"][:PAGE_CHARS]} for p in _pages()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def page_results(doc, results):
    (loglikelihood,) = results
    words, size = len(re.split(r"\s+", doc["text"])), len(doc["text"].encode("utf-8"))
    return {"word_perplexity": (loglikelihood, words), "byte_perplexity": (loglikelihood, size),
            "bits_per_byte": (loglikelihood, size)}


def _lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if 20 <= len(line.strip()) <= 100]


def next_line_items(**kwargs) -> datasets.DatasetDict:
    """kept_next_line: three lines of a page, then which of four lines comes next on it: the true one or a line from
    another page (fixed seed: the same items everywhere)."""
    rng = random.Random(0)
    pages = [_lines(p["text"]) for p in _pages()]
    rows = []
    for index, lines in enumerate(pages):
        others = [line for j, other in enumerate(pages) if j != index for line in other]
        for position in sorted(rng.sample(range(3, len(lines)), min(ITEMS_PER_PAGE, len(lines) - 3))):
            choices = [lines[position], *rng.sample(others, CHOICES - 1)]
            rng.shuffle(choices)
            rows.append({"context": "\n".join(lines[position - 3:position]), "choices": choices,
                         "label": choices.index(lines[position])})
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
