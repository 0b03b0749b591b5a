"""`python -m kept_jax.evaluate`: the same lm-evaluation-harness tasks on a teacher and its student (through
kept_jax.harness), one table side by side:

    python -m kept_jax.evaluate --teacher DIR|FILE.gguf --student DIR [--tasks kept_heldout,kept_next_line]
                                [--dtype float32] [--batch-size 8] [--fsdp 1] [--tensor 1] [--limit N]
                                [--out DIR [--force]]

The default tasks are the offline ones that ship with kept_jax (kept_jax/assets/lm_eval_tasks); on a machine with a
dataset hub any lm-eval task name works (arc_easy, hellaswag, piqa, winogrande, mmlu, ...). `--out` receives
`evaluation.json` and `evaluation.md`. (Teacher vs student on the same tokens, KL and agreement, is
`kept_jax.metrics.compare`.) Every device takes part (`--fsdp`/`--tensor` shard the weights, the rest split the
rows); launched as several processes, the first one runs lm-eval and writes, the others follow (kept_jax.harness).
"""

from __future__ import annotations

DEFAULT_TASKS = "kept_heldout,kept_next_line"


def parse_args(argv):
    from kept_jax.errors import ArgumentParser

    p = ArgumentParser(prog="python -m kept_jax.evaluate",
                       description="lm-evaluation-harness tasks on a teacher and its student, side by side")
    p.add_argument("--teacher", required=True, help="a checkpoint directory or GGUF file")
    p.add_argument("--student", required=True, help="a checkpoint directory or GGUF file")
    p.add_argument("--tasks", default=DEFAULT_TASKS, help=f"comma-separated lm-eval tasks (default {DEFAULT_TASKS})")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--batch-size", type=int, default=8, help="rows per call, over all devices")
    p.add_argument("--fsdp", type=int, default=1, help="mesh ways that shard the weights' hidden dimension")
    p.add_argument("--tensor", type=int, default=1, help="mesh ways that split heads and the MLP (Megatron-style)")
    p.add_argument("--limit", type=int, help="at most this many documents per task")
    p.add_argument("--out", help="directory for evaluation.json and evaluation.md")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")
    args = p.parse_args(argv)
    if min(args.batch_size, args.fsdp, args.tensor) < 1 or (args.limit is not None and args.limit < 1):
        p.error("--batch-size, --fsdp, --tensor and --limit must be positive")
    return args


def run_tasks(checkpoint: str, tasks: list[str], manager, args) -> dict | None:
    """lm-eval's results dict for one checkpoint (kept_jax.harness's model, `manager` finding the tasks); None on a
    process that follows the first one."""
    import lm_eval

    from kept_jax.harness import KeptJaxLM, on_every_host

    model = KeptJaxLM(pretrained=checkpoint, dtype=args.dtype, batch_size=args.batch_size, fsdp=args.fsdp,
                      tensor=args.tensor)
    return on_every_host(lm_eval.simple_evaluate)(model, tasks=tasks, limit=args.limit, task_manager=manager)


def check_tasks(tasks: list[str]):
    """lm-eval missing, or unknown task names, before any model is loaded; else the task manager that finds them."""
    from kept_jax.errors import KeptError
    from kept_jax.harness import KeptJaxLM, task_manager

    if KeptJaxLM is None:  # kept_jax.harness registers it only when lm-eval imports
        raise KeptError("python -m kept_jax.evaluate needs lm-eval: pip install 'kept_jax[eval]'")
    manager = task_manager(tasks)
    known = set(manager.all_tasks)
    missing = [t for t in tasks if t not in known]
    if missing or not tasks:
        raise KeptError(f"Tasks not found: {', '.join(missing) or '(none given)'}; `lm_eval ls tasks` lists lm-eval's, "
                        f"and the offline ones are {DEFAULT_TASKS}")
    return manager


def side_by_side(teacher: dict, student: dict) -> list[dict]:
    """One row per task and metric: both values, both standard errors, student / teacher."""
    rows = []
    for task, metrics in teacher["results"].items():
        for key, value in metrics.items():
            name, _, filt = key.partition(",")
            if name.endswith("_stderr") or not isinstance(value, (int, float)) or name in ("alias", "sample_len"):
                continue
            other = student["results"].get(task, {}).get(key)
            stderr = f"{name}_stderr,{filt}"
            rows.append({"task": task, "metric": name, "teacher": value, "student": other,
                         "teacher_stderr": _number(metrics.get(stderr)),
                         "student_stderr": _number(student["results"].get(task, {}).get(stderr)),
                         "ratio": other / value if other is not None and value else None})
    return rows


def _number(x):
    return x if isinstance(x, (int, float)) else None


def format_rows(rows: list[dict]) -> str:
    def cell(value, stderr=None):
        if value is None:
            return "-"
        return f"{value:.4g}" + (f" ± {stderr:.2g}" if stderr is not None else "")

    lines = ["| task | metric | teacher | student | student / teacher |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['task']} | {r['metric']} | {cell(r['teacher'], r['teacher_stderr'])} | "
                     f"{cell(r['student'], r['student_stderr'])} | {cell(r['ratio'])} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    import datetime
    import importlib.metadata
    import json
    import os

    from kept_jax import lockstep, sharding
    from kept_jax.errors import KeptError, cli_entry
    from kept_jax.fileio import atomic_output_dir, check_output_dir

    @cli_entry
    def _main(argv) -> int:
        args = parse_args(argv)
        from bridge.checkpoint import check_checkpoint

        for path in (args.teacher, args.student):  # both, before the teacher is evaluated
            if not os.path.exists(path):
                raise KeptError(f"{path!r} does not exist; give a checkpoint directory or a GGUF file")
            check_checkpoint(path)
        sharding.initialize_distributed()
        if args.out and lockstep.is_leader():
            check_output_dir(args.out, args.force)
        tasks = [t for t in args.tasks.split(",") if t]
        manager = check_tasks(tasks)
        results = {role: run_tasks(path, tasks, manager, args)
                   for role, path in (("teacher", args.teacher), ("student", args.student))}
        if not lockstep.is_leader():
            return 0
        rows = side_by_side(results["teacher"], results["student"])
        table = format_rows(rows)
        print(f"teacher {args.teacher}\nstudent {args.student}\n\n{table}")
        if args.out:
            with atomic_output_dir(args.out, args.force) as tmp:
                with open(os.path.join(tmp, "evaluation.json"), "w", encoding="utf-8") as f:
                    json.dump({"teacher": args.teacher, "student": args.student, "tasks": tasks, "rows": rows,
                               "limit": args.limit, "dtype": args.dtype, "date": datetime.date.today().isoformat(),
                               "lm_eval": importlib.metadata.version("lm_eval")}, f, indent=1)
                with open(os.path.join(tmp, "evaluation.md"), "w", encoding="utf-8") as f:
                    f.write(f"teacher `{args.teacher}`, student `{args.student}`\n\n{table}\n")
            print(f"\nwrote {args.out}/evaluation.{{json,md}}")
        return 0

    return _main(argv)


if __name__ == "__main__":
    import sys

    sys.exit(main())
