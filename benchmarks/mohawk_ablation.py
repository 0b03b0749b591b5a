"""Which MOHAWK stages help, at equal total tokens: the default Llamba job (configs/tiny-llamba.yaml) against the
same budget spent on stages 2+3 and on stage 3 alone, and the attention-based mixer init against MOHAWK's.

    python -m benchmarks.mohawk_ablation [--out DIR] [--only NAME ...]

Each variant is the real job (`python -m kept_jax.train`, in-process) with overrides; the held-out KL(teacher ||
student) and top-1 agreement after every stage come from its summary.json. Results go to
benchmarks/results/mohawk_ablation-<backend>-<date>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

from benchmarks.common import environment, write_result
from kept_jax.errors import cli_entry
from kept_jax.train_config import CONFIG_DIR, load_config

CONFIG = os.path.join(CONFIG_DIR, "tiny-llamba.yaml")


def _stage(name, objective, tokens, lr, trainable):
    patterns = trainable if isinstance(trainable, str) else "[" + ", ".join(trainable) + "]"
    return f"{{name: {name}, objective: {objective}, tokens: {tokens}, lr: {lr}, trainable: {patterns}}}"


def variants() -> dict[str, list[str]]:
    """name -> overrides. The budget of the default job's three stages is moved into the stages that remain."""
    cfg, _ = load_config(CONFIG)
    by_name = {s.name: s for s in cfg.stages}
    total = sum(s.tokens for s in cfg.stages)
    hidden, kd = by_name["hidden"], by_name["kd"]

    def stages(*specs):
        return "stages=[" + ", ".join(_stage(*s) for s in specs) + "]"

    as_is = [(s.name, s.objective, s.tokens, s.lr, s.trainable) for s in cfg.stages]
    return {
        "1+2+3 (mohawk init)": [stages(*as_is)],
        "2+3": [stages(("hidden", "hidden", total - kd.tokens, hidden.lr, hidden.trainable),
                       ("kd", "kl", kd.tokens, kd.lr, kd.trainable))],
        "3 only": [stages(("kd", "kl", total, kd.lr, kd.trainable))],
        "1+2+3 (attention init)": [stages(*as_is), "mixer_init=attention"],
    }


@cli_entry
def main(argv=None) -> int:
    from kept_jax import train

    p = argparse.ArgumentParser(prog="python -m benchmarks.mohawk_ablation", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="where the runs go (default: a temporary directory)")
    p.add_argument("--only", nargs="*", help="run only these variants")
    args = p.parse_args(argv)
    root = args.out or tempfile.mkdtemp(prefix="mohawk_ablation-")
    rows = {}
    for name, overrides in variants().items():
        if args.only and name not in args.only:
            continue
        out = os.path.join(root, name.replace(" ", "_").replace("(", "").replace(")", "").replace("+", "-"))
        print(f"== {name}", file=sys.stderr, flush=True)
        if train.main(["--config", CONFIG, "--out", out, "--restart", *overrides]) != 0:
            raise SystemExit(f"variant {name!r} failed; see {out}")
        with open(os.path.join(out, "summary.json"), encoding="utf-8") as f:
            s = json.load(f)
        rows[name] = {"tokens": s["tokens"], "kl_init": s["kl_init"], "agreement_init": s["agreement_init"],
                      "kl_final": s["kl_final"], "agreement_final": s["agreement_final"],
                      "stages": [{k: st[k] for k in ("name", "tokens", "kl", "agreement", "loss_first", "loss_last")}
                                 for st in s["stages"]],
                      "seconds": s["seconds_this_process"]}
    print(f"\n{'variant':<26}{'tokens':>10}{'KL init':>11}{'KL final':>11}{'agree':>9}  per stage (KL)")
    for name, r in rows.items():
        per_stage = ", ".join(f"{st['name']} {st['kl']:.3f}" for st in r["stages"])
        print(f"{name:<26}{r['tokens']:>10,}{r['kl_init']:>11.4f}{r['kl_final']:>11.4f}{r['agreement_final']:>9.2%}"
              f"  {per_stage}")
    path = write_result("mohawk_ablation", {"environment": environment(), "config": CONFIG, "variants": rows})
    print(f"\nresults: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
