"""Which student a user should distil, at equal tokens: the Llamba recipe, a pure Mamba-2 student and Mamba-2/attention
hybrids with 1/8, 1/4 and 1/2 of the layers kept as attention, evenly spaced (`every:K`) and chosen by measurement
(`auto:N`, the layers whose replacement alone costs the most held-out KL).

    python -m benchmarks.students [--llamba configs/smollm2-llamba.yaml] [--hybrid configs/smollm2-hybrid.yaml]
                                  [--layer-costs DIR/conversion_report.json] [--out DIR] [--only NAME ...]
                                  [key=value ...]

Each variant is the real job (`python -m kept_jax.train`, in-process): the Llamba config as it ships, and the hybrid
config with its `attention_layers` changed; `key=value` overrides apply to every variant (the hybrid's and the
Llamba's budgets are the same as shipped: 77,824 tokens). `--layer-costs` is the report of `python -m kept_jax.convert
--to hybrid --attention-layers auto:N` on the same teacher: its leave-one-out KLs give the auto variants' layers
(without it they are left out). Held-out KL(teacher || student), agreement, perplexities, the chat answers and the
wall time (none when the run resumed a stopped one) come from each job's summary.json. Results go to
benchmarks/results/students-<hybrid config>-<device>-<date>.json (rewritten after each variant) with a plot of
held-out KL against tokens and of the final KL by variant. Decode speed and cache memory of the same shapes:
`python -m benchmarks.generate --shapes smollm2-135m --hybrids every:8,every:4,every:2,none` (docs/hybrid.md).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

from benchmarks.common import environment, result_path, write_result
from benchmarks.mohawk_ablation import _curve, run_variant
from kept_jax.errors import cli_entry
from kept_jax.train_config import CONFIG_DIR

LLAMBA = os.path.join(CONFIG_DIR, "smollm2-llamba.yaml")
HYBRID = os.path.join(CONFIG_DIR, "smollm2-hybrid.yaml")
FRACTIONS = {"1/8": 8, "1/4": 4, "1/2": 2}  # share of the layers kept as attention: every K-th layer


def variants(layers: int, costs: list[float] | None) -> dict[str, tuple[str, list[str]]]:
    """name -> (which config, its overrides), the decisive pair first: the Llamba and the 1/4-attention hybrid."""
    from kept_jax.mapping.layer_choice import most_costly

    out = {"Llamba": ("llamba", [])}
    for fraction in ("1/4", "1/8", "1/2"):
        every = FRACTIONS[fraction]
        out[f"hybrid {fraction} (every:{every})"] = ("hybrid", [f"attention_layers=every:{every}"])
        if costs is not None:
            n = len(range(0, layers, every))  # as many attention layers as the evenly spaced variant
            chosen = ",".join(map(str, most_costly(costs, n)))
            out[f"hybrid {fraction} (auto:{n})"] = ("hybrid", [f"attention_layers=[{chosen}]"])
        if fraction == "1/4":
            out["Mamba-2 (no attention)"] = ("hybrid", ["attention_layers=none"])
    return out


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_curve, ax_bar) = plt.subplots(1, 2, figsize=(13, 4.8), constrained_layout=True)
    names = list(result["variants"])
    for name in names:
        curve = result["variants"][name]["curve"]
        ax_curve.plot([p["tokens"] for p in curve], [p["kl"] for p in curve], "-o", ms=3, label=name)
    ax_curve.set(xlabel="training tokens", ylabel="held-out KL(teacher || student), nats/token", yscale="log")
    ax_curve.grid(alpha=0.3)
    ax_curve.legend(fontsize=7)
    finals = [result["variants"][n]["kl_final"] for n in names]
    ax_bar.barh(range(len(names)), finals)
    ax_bar.set_yticks(range(len(names)), names, fontsize=8)
    ax_bar.invert_yaxis()
    ax_bar.set(xlabel="final held-out KL, nats/token")
    for i, value in enumerate(finals):
        ax_bar.text(value, i, f" {value:.3f}", va="center", fontsize=8)
    env = result["environment"]
    fig.suptitle(f"Students of {result['teacher']} at equal tokens ({env['device']}, {env['date']})")
    fig.savefig(path, dpi=110)
    plt.close(fig)


@cli_entry
def main(argv=None) -> int:
    from kept_jax.train_config import load_config

    p = argparse.ArgumentParser(prog="python -m benchmarks.students", description=__doc__.split("\n\n")[0])
    p.add_argument("--llamba", default=LLAMBA, help="the Llamba job (default: configs/smollm2-llamba.yaml)")
    p.add_argument("--hybrid", default=HYBRID, help="the hybrid job (default: configs/smollm2-hybrid.yaml)")
    p.add_argument("--layer-costs", help="conversion_report.json of convert --to hybrid --attention-layers auto:N")
    p.add_argument("--out", help="where the runs go (default: a temporary directory)")
    p.add_argument("--only", nargs="*", help="run only these variants")
    p.add_argument("--again", action="store_true", help="run the variants today's results file already holds too "
                   "(default: keep them, so that a stopped run goes on where it stopped)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for every variant")
    args = p.parse_intermixed_args(argv)
    root = args.out or tempfile.mkdtemp(prefix="students-")
    configs = {"llamba": args.llamba, "hybrid": args.hybrid}
    hybrid_cfg, _ = load_config(args.hybrid)
    costs = None
    if args.layer_costs:
        with open(args.layer_costs, encoding="utf-8") as f:
            costs = json.load(f)["layer_choice"]["kl_when_replaced_alone"]
    from bridge.checkpoint import load_config as checkpoint_config

    layers = checkpoint_config(hybrid_cfg.source).num_hidden_layers
    stem = "students-" + os.path.splitext(os.path.basename(args.hybrid))[0]
    result = {"environment": environment(), "teacher": hybrid_cfg.source, "configs": configs, "variants": {}}
    path = result_path(stem, result)
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            result["variants"] = json.load(f)["variants"]
    for name, (kind, overrides) in variants(layers, costs).items():
        if args.only and name not in args.only or name in result["variants"] and not args.again:
            continue
        out = os.path.join(root, "".join(c if c.isalnum() else "_" for c in name))
        s, seconds = run_variant(name, out, ["--config", configs[kind], *overrides, *args.overrides])
        result["variants"][name] = {
            "config": os.path.relpath(configs[kind]), "overrides": overrides + args.overrides,
            "student": s.get("student"), "mixer_init": s.get("mixer_init"), "tokens": s["tokens"],
            **{k: s[k] for k in ("kl_init", "kl_final", "agreement_init", "agreement_final", "student_ppl_final",
                                 "teacher_ppl", "tokens_per_s", "verified")},
            "chat": s.get("chat"), "seconds": seconds, "curve": _curve(out)}
        path = write_result(stem, result)
        plot(result, path.replace(".json", ".png"))
    print(f"\n{'variant':<28}{'tokens':>8}{'KL init':>9}{'KL final':>9}{'agree':>8}{'ppl':>8}{'s':>6}")
    for name, r in result["variants"].items():
        print(f"{name:<28}{r['tokens']:>8,}{r['kl_init']:>9.3f}{r['kl_final']:>9.3f}{r['agreement_final']:>8.2%}"
              f"{r['student_ppl_final']:>8.2f}{r['seconds'] or float('nan'):>6.0f}")
    if path:
        print(f"\nresults: {path} (+ .png)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
