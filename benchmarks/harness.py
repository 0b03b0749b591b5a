"""lm-eval requests per second: `--model kept_jax` against lm-eval's own `--model hf` (Transformers, PyTorch) on the
same Llama checkpoint, side by side in one run.

    python -m benchmarks.harness --model DIR [--batch-size 8] [--dtype float32] [--reps 2] [--no-save]

The requests are the offline kept_next_line task's (every context with each of its four choices: `loglikelihood`)
and kept_heldout's pages (`loglikelihood_rolling`, windows of the model's context or 2048). Each model scores them
`--reps` times after a warm-up pass (kept_jax's compilations happen there); the median wall time gives requests/s.
The two models' log-likelihoods are compared as they are timed. Writes
`benchmarks/results/harness-<device>-<date>.json`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

from benchmarks.common import environment, write_result


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.harness", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a Llama checkpoint directory (Transformers loads it too)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--max-length", type=int, default=2048)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--no-save", action="store_true")
    return p.parse_args(argv)


def requests():
    """The offline tasks' requests, as lm-eval builds them."""
    import importlib.util
    import os

    from lm_eval.api.instance import Instance

    from kept_jax.harness import TASKS_DIR

    spec = importlib.util.spec_from_file_location("kept_tasks", os.path.join(TASKS_DIR, "kept_tasks.py"))
    kept_tasks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(kept_tasks)
    items = kept_tasks.next_line_items()["test"]
    pairs = [(item["context"] + "\n", choice) for item in items for choice in item["choices"]]
    pages = [(page["text"],) for page in kept_tasks.heldout_pages()["test"]]
    return ([Instance("loglikelihood", {}, args, i) for i, args in enumerate(pairs)],
            [Instance("loglikelihood_rolling", {}, args, i) for i, args in enumerate(pages)])


def timed(lm, kind: str, batch, reps: int) -> tuple[list, float]:
    call = lm.loglikelihood if kind == "loglikelihood" else lm.loglikelihood_rolling
    results = call(batch)  # warm-up: kept_jax compiles here
    times = []
    for _ in range(reps):
        began = time.perf_counter()
        call(batch)
        times.append(time.perf_counter() - began)
    return results, statistics.median(times)


def run(args) -> dict:
    from lm_eval.models.huggingface import HFLM

    from kept_jax.harness import KeptJaxLM

    models = {"kept_jax": KeptJaxLM(pretrained=args.model, dtype=args.dtype, batch_size=args.batch_size,
                                    max_length=args.max_length),
              "hf": HFLM(pretrained=args.model, dtype=args.dtype, batch_size=args.batch_size,
                         max_length=args.max_length, device="cpu")}
    rows, values = [], {}
    for kind, batch in zip(("loglikelihood", "loglikelihood_rolling"), requests()):
        for name, lm in models.items():
            result, seconds = timed(lm, kind, batch, args.reps)
            values[(kind, name)] = np.asarray([r[0] if isinstance(r, tuple) else r for r in result])
            rows.append({"kind": kind, "impl": name, "requests": len(batch), "seconds": seconds,
                         "requests_per_s": len(batch) / seconds})
            print(json.dumps(rows[-1]), flush=True)
        ours, theirs = values[(kind, "kept_jax")], values[(kind, "hf")]
        rows.append({"kind": kind, "kept_jax_over_hf": rows[-2]["requests_per_s"] / rows[-1]["requests_per_s"],
                     "max_abs_difference": float(np.abs(ours - theirs).max())})
        print(json.dumps(rows[-1]), flush=True)
    result = {"benchmark": "harness", "environment": environment(), "settings": vars(args), "rows": rows}
    if not args.no_save:
        print(f"wrote {write_result('harness', result)}")
    return result


if __name__ == "__main__":
    run(parse_args())
