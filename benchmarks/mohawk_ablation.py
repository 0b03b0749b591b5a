"""Which MOHAWK stages help, at equal total tokens: a Llamba or hybrid job's three stages against the same budget
spent on stages 2+3 and on stage 3 alone, the student's two mixer inits, a second split of the budget between the
stages, and the reference's learning rates.

    python -m benchmarks.mohawk_ablation [--config configs/smollm2-llamba.yaml] [--tokens N] [--eval-every N]
                                         [--out DIR] [--only NAME ...] [key=value ...]

Each variant is the real job (`python -m kept_jax.train`, in-process) on the config's teacher and data, with its own
`stages:` (RECIPE: split 1 : 4 : 16, or as the variant changes it) and the command line's `key=value` overrides
(e.g. data.seq_len=128), on `--tokens` in all (default 16,384). Held-out KL(teacher || student), agreement and the
stage-2 hidden-state distance come from the job's metrics.jsonl, at init, every `--eval-every` steps and at the end
of every stage. Results go to benchmarks/results/mohawk_ablation-<config>-<device>-<date>.json (rewritten after each
variant, so a stopped run keeps what it measured) with a plot of KL and hidden-state distance against tokens.
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

CONFIG = os.path.join(CONFIG_DIR, "smollm2-llamba.yaml")
# The three stages the variants take or leave: objective -> (name, share of the budget, peak LR). Shares 1 : 4 : 16;
# learning rates for budgets of tens of thousands of tokens.
RECIPE = {"matrix": ("matrix", 1 / 21, 1e-3), "hidden": ("hidden", 4 / 21, 1e-3), "kl": ("kd", 16 / 21, 3e-4)}
# Each stage's trainable set, by student: stage 1 the new mixers, stage 2 the layers (it runs only those replaced).
TRAINABLE = {"llamba": {"matrix": "[mixer/]", "hidden": "[backbone/layers/]", "kl": "all"},
             "hybrid": {"matrix": "[mamba/]", "hidden": "[model/layers/]", "kl": "all"}}
REFERENCE_LRS = {"matrix": 1e-4, "hidden": 1e-4, "kl": 5e-5}  # goombalab/mohawk's Llamba configs (stage 3: 1e-5-5e-5)
SECOND_SPLIT = {"matrix": 0.03, "hidden": 0.05, "kl": 0.92}  # Phi-Mamba's (80M / 160M / 2.76B tokens)


def variants(config: str, total: int) -> dict[str, list[str]]:
    """name -> overrides of `config`'s stages: `total` tokens in all, split in whole steps so that every variant
    trains exactly as many; a variant without a stage gives its share to the next stage that remains."""
    from kept_jax.mapping.students import MIXER_INITS

    cfg, _ = load_config(config)
    per_step = cfg.data.tokens_per_step
    trainable = TRAINABLE[cfg.student]
    first, second = MIXER_INITS[cfg.student]
    steps = max(3, total // per_step)
    share = {objective: r[1] for objective, r in RECIPE.items()}

    def stages(split: dict[str, float], lrs: dict[str, float] | None = None):
        specs, left = [], steps
        for objective in (o for o in RECIPE if o in split):
            name, _, lr = RECIPE[objective]
            n = left if objective == "kl" else max(1, round(steps * split[objective]))
            left -= n
            lr = (lrs or {}).get(objective, lr)
            specs.append(f"{{name: {name}, objective: {objective}, tokens: {n * per_step}, lr: {lr}, "
                         f"trainable: {trainable[objective]}}}")
        return "stages=[" + ", ".join(specs) + "]"

    return {
        f"1+2+3 ({first} init)": [stages(share), f"mixer_init={first}"],
        f"1+2+3 ({second} init)": [stages(share), f"mixer_init={second}"],
        "2+3": [stages({"hidden": share["matrix"] + share["hidden"], "kl": share["kl"]}), f"mixer_init={first}"],
        f"2+3 ({second} init)": [stages({"hidden": share["matrix"] + share["hidden"], "kl": share["kl"]}),
                                 f"mixer_init={second}"],
        "3 only": [stages({"kl": 1.0}), f"mixer_init={first}"],
        "1+2+3 (3/5/92 split)": [stages(SECOND_SPLIT), f"mixer_init={first}"],
        "1+2+3 (reference LRs)": [stages(share, REFERENCE_LRS), f"mixer_init={first}"],
    }


def run_variant(name: str, out: str, argv: list[str]) -> tuple[dict, float | None]:
    """One variant: `python -m kept_jax.train argv` in-process into `out`; its summary.json and its wall time, None
    when it resumed a stopped run in `out` (its time would not be whole)."""
    from kept_jax import train

    resumed = os.path.isdir(os.path.join(out, "checkpoints"))
    print(f"== {name}", file=sys.stderr, flush=True)
    if train.main(["--out", out, *argv]) != 0:
        raise SystemExit(f"variant {name!r} failed; see {out}")
    with open(os.path.join(out, "summary.json"), encoding="utf-8") as f:
        summary = json.load(f)
    return summary, None if resumed else summary["seconds_this_process"]


def _curve(run_dir: str) -> list[dict]:
    from kept_jax.runlog import read_metrics

    return [{k: r.get(k) for k in ("stage", "step", "tokens", "kl", "agreement", "hidden", "student_nll")}
            for r in read_metrics(run_dir) if r["split"] == "eval"]


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_kl, ax_hidden) = plt.subplots(1, 2, figsize=(12, 4.5), constrained_layout=True)
    for name, row in result["variants"].items():
        tokens = [p["tokens"] for p in row["curve"]]
        line, = ax_kl.plot(tokens, [p["kl"] for p in row["curve"]], "-o", ms=3, label=name)
        ax_hidden.plot(tokens, [p["hidden"] for p in row["curve"]], "-o", ms=3, color=line.get_color(), label=name)
    ax_kl.set(xlabel="training tokens", ylabel="held-out KL(teacher || student), nats/token", yscale="log")
    ax_hidden.set(xlabel="training tokens", ylabel="held-out hidden-state distance (sum over layers)", yscale="log")
    for ax in (ax_kl, ax_hidden):
        ax.grid(alpha=0.3)
    ax_kl.legend(fontsize=8)
    env = result["environment"]
    fig.suptitle(f"MOHAWK ablation, {os.path.basename(result['config'])}, {result['tokens']:,} tokens per variant "
                 f"({env['device']}, {env['date']})")
    fig.savefig(path, dpi=110)
    plt.close(fig)


@cli_entry
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.mohawk_ablation", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=CONFIG, help="the Llamba or hybrid job (default: configs/smollm2-llamba.yaml)")
    p.add_argument("--tokens", type=int, default=16384, help="training tokens per variant (default: 16,384)")
    p.add_argument("--eval-every", type=int, default=0, help="held-out evaluation every N steps as well")
    p.add_argument("--out", help="where the runs go (default: a temporary directory)")
    p.add_argument("--only", nargs="*", help="run only these variants")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for every variant")
    args = p.parse_intermixed_args(argv)
    root = args.out or tempfile.mkdtemp(prefix="mohawk_ablation-")
    every = [f"train.eval_every={args.eval_every}"] if args.eval_every else []
    stem = "mohawk_ablation-" + os.path.splitext(os.path.basename(args.config))[0]
    chosen = variants(args.config, args.tokens)
    result = {"environment": environment(), "config": os.path.relpath(args.config), "tokens": None, "variants": {}}
    for name, overrides in chosen.items():
        if args.only and name not in args.only:
            continue
        out = os.path.join(root, name.replace(" ", "_").replace("(", "").replace(")", "").replace("+", "-")
                           .replace("/", "-"))
        s, seconds = run_variant(name, out, ["--config", args.config, *overrides, "verify=false", *every,
                                             *args.overrides])
        result["tokens"] = s["tokens"]
        result["variants"][name] = {
            "overrides": overrides + args.overrides, "tokens": s["tokens"], "kl_init": s["kl_init"],
            "kl_final": s["kl_final"],
            "agreement_final": s["agreement_final"], "student_ppl_final": s["student_ppl_final"],
            "teacher_ppl": s["teacher_ppl"], "hidden_init": s.get("hidden_init"),
            "stages": [{k: st[k] for k in ("name", "tokens", "kl", "agreement", "hidden", "loss_first", "loss_last")}
                       for st in s["stages"]],
            "curve": _curve(out), "seconds": seconds}
        path = write_result(stem, result)
        plot(result, path.replace(".json", ".png"))
    print(f"\n{'variant':<26}{'tokens':>9}{'KL init':>10}{'KL final':>10}{'agree':>8}{'ppl':>9}{'hidden':>9}"
          f"{'s':>6}")
    for name, r in result["variants"].items():
        hidden = r["stages"][-1]["hidden"]
        print(f"{name:<26}{r['tokens']:>9,}{r['kl_init']:>10.4f}{r['kl_final']:>10.4f}{r['agreement_final']:>8.2%}"
              f"{r['student_ppl_final']:>9.2f}{hidden:>9.4g}{r['seconds'] or float('nan'):>6.0f}")
    print(f"\nresults: {path} (+ .png)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
