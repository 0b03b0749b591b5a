"""MOHAWK's three stages on the one step: throughput, FLOPs, MFU and compiled memory per stage.

    python -m benchmarks.mohawk_step [--job llamba-1b|smollm2-llamba] [--layers 2] [--seq 512] [--batch 2]
                                     [--reps 3] [--dtype float32]

`--job llamba-1b` (default): the teacher is Llama-3.2-1B's layout (configs/models/llama-3.2-1b-instruct.json) and the
student the published Llamba-1B's, with `--layers` layers (default 2; 16 is the real depth), stages from
configs/llamba-1b.yaml. `--job smollm2-llamba`: SmolLM2-135M-Instruct's layout and its Llamba at full depth (30
layers), stages from configs/smollm2-llamba.yaml (its unrolled layers). Random weights. Each stage is
`kept_jax.xkd.step.make_train_step` with its objective, its trainable set from the job's plan
(`kept_jax.plan.make_plan`) and the shared-buffer split of the mapping: the step the job runs. Median of `--reps`
steps after compilation and one warm-up. FLOPs per token from `kept_jax.flops.stage_flops_per_token`; MFU where the
device's peak is known (GPUs); memory is XLA's `memory_analysis()` of the compiled step. The teacher's side of each
stage (its forward: the layer inputs of stages 1 and 2, the final hidden state of stage 3) is timed alone too, as
its share of the step: what keeping it for reuse could save. Writes
benchmarks/results/mohawk_step[-smollm2-llamba][-bf16]-<device>-<date>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax

from benchmarks.common import environment, median_seconds, write_result
from kept_jax.config import read_config_json
from kept_jax.errors import cli_entry
from kept_jax.flops import peak_flops, stage_flops_per_token
from kept_jax.mapping.llamba_init import build_llamba_mapping
from kept_jax.models import build_model, config_from_hf, init_params
from kept_jax.plan import make_plan
from kept_jax.train_config import CONFIG_DIR, load_config
from kept_jax.xkd.objectives import make_objective
from kept_jax.xkd.step import init_state, make_train_step
from kept_jax.xkd.trainable import split_by_paths

MODELS = os.path.join(CONFIG_DIR, "models")
JOBS = {"llamba-1b": ("llamba-1b.yaml", "llama-3.2-1b-instruct.json", "llamba-1b.json", 2),  # config, teacher,
        "smollm2-llamba": ("smollm2-llamba.yaml", "smollm2-135m-instruct.json", "llamba-smollm2-135m.json", None)}


@cli_entry
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.mohawk_step", description=__doc__.split("\n\n")[0])
    p.add_argument("--job", choices=tuple(JOBS), default="llamba-1b")
    p.add_argument("--layers", type=int, help="cut both models to this many layers (default: 2 for llamba-1b, "
                                              "all for smollm2-llamba)")
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--vocab", type=int, help="a smaller vocabulary than Llama-3's 128256 (tests)")
    p.add_argument("--no-save", action="store_true", help="print the rows as JSON instead of writing a result file")
    args = p.parse_args(argv)

    # The job's own plan (kept_jax.plan) of configs/llamba-1b.yaml, on `--layers` layers, the benchmark's dtype and no
    # remat: its teacher, student and stages (trainable sets, optimizers).
    job_yaml, teacher_file, student_file, default_layers = JOBS[args.job]
    job, _ = load_config(os.path.join(CONFIG_DIR, job_yaml), [
        f"precision.compute={args.dtype}", f"precision.params={args.dtype}", "model.remat=none"])
    vocab = {"vocab_size": args.vocab} if args.vocab else {}
    teacher_json = os.path.join(MODELS, teacher_file)
    teacher_hf, student_hf = read_config_json(teacher_json), read_config_json(os.path.join(MODELS, student_file))
    layers = args.layers or default_layers or teacher_hf["num_hidden_layers"]
    source = config_from_hf({**teacher_hf, "num_hidden_layers": layers, **vocab})
    layout = config_from_hf({**student_hf, "n_layer": layers, **vocab})
    plan = make_plan(job, source, teacher_json, 1, layout)
    teacher_config, student_config = plan.teacher_config, plan.student_config
    teacher, student = build_model(teacher_config), build_model(student_config)
    teacher_params = init_params(teacher_config, jax.random.key(0))
    student_params = init_params(student_config, jax.random.key(1))
    shared = build_llamba_mapping(teacher_config, student_config, "mohawk").shared_with_teacher()
    tokens = jax.random.randint(jax.random.key(2), (1, args.batch, args.seq), 0, teacher_config.vocab_size)
    peak = peak_flops(jax.devices()[0].device_kind, args.dtype)

    rows = []
    for stage in plan.stages:
        split = split_by_paths({"params": student_params}, teacher_params, stage.trainable, shared)
        objective = make_objective(stage.objective, teacher, student, job.loss)
        step = make_train_step(objective, split, stage.optimizer)
        teacher_side = jax.jit(lambda params, tokens, objective=objective: objective.targets(params, tokens[0]))
        state = init_state(split, stage.optimizer)
        compiled = step.lower(state, teacher_params, split.frozen, tokens).compile()
        memory = compiled.memory_analysis()
        trainable_matmul = sum(v.size for k, v in split.trainable.items() if k[-1] == "kernel")
        box = {"state": state}

        def run(box=box, step=step, split=split):
            box["state"], metrics = step(box["state"], teacher_params, split.frozen, tokens)
            jax.block_until_ready(metrics)

        run()  # warm-up
        seconds, times = median_seconds(run, args.reps)
        jax.block_until_ready(teacher_side(teacher_params, tokens))  # compiled
        teacher_seconds, _ = median_seconds(lambda: jax.block_until_ready(teacher_side(teacher_params, tokens)),
                                            args.reps)
        n_tokens = args.batch * args.seq
        flops = stage_flops_per_token(stage.objective, teacher_config, student_config, args.seq, trainable_matmul)
        row = {"stage": stage.name, "objective": stage.objective, "trainable": stage.trainable,
               "trainable_params": int(sum(v.size for v in split.trainable.values())),
               "shared_leaves": len(split.shared), "seconds": seconds, "times": times,
               "teacher_seconds": teacher_seconds, "teacher_share": teacher_seconds / seconds,
               "tokens_per_s": n_tokens / seconds, "flops_per_token": flops,
               "tflops_per_s": flops * n_tokens / seconds / 1e12,
               "mfu": flops * n_tokens / seconds / peak if peak else None,
               "temp_bytes": memory.temp_size_in_bytes, "argument_bytes": memory.argument_size_in_bytes}
        rows.append(row)
        mfu = "n/a" if row["mfu"] is None else f"{row['mfu']:.1%}"
        print(f"{stage.name:<8} {row['tokens_per_s']:>10,.0f} tok/s  {flops / 1e9:>7.2f} GFLOP/token  "
              f"{row['tflops_per_s']:>7.3f} TFLOP/s  MFU {mfu}  temp {row['temp_bytes'] / 2**30:.2f} GiB  "
              f"teacher {row['teacher_share']:.0%} of the step",
              file=sys.stderr)
    result = {"environment": environment(), "job": args.job, "teacher": teacher_file, "student": student_file,
              "layers": layers, "vocab": teacher_config.vocab_size, "seq": args.seq, "batch": args.batch,
              "dtype": args.dtype, "stages": rows}
    if args.no_save:
        print(json.dumps(rows))
        return 0
    stem = "mohawk_step" + ("" if args.job == "llamba-1b" else f"-{args.job}")
    stem += "-bf16" if args.dtype == "bfloat16" else ""
    print(write_result(stem, result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
