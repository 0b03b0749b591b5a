"""`python -m kept_jax.train [--config FILE] [--out DIR] [--force] [key=value ...]`: the KEPT job, end to end.

Load the Orion teacher -> convert it (NPM + OPM) -> evaluate KL/agreement on held-out text -> distill (XKD), with
checkpoints, periodic evaluation and logs in the run directory -> evaluate again -> export the student as a Hugging
Face Llama directory -> verify it through Transformers -> write `summary.json` and `report.png`. The same command
resumes an interrupted run. `--dry-run` plans the job from shapes alone (kept_jax/dry_run.py). With no arguments it
runs `configs/tiny.yaml`: the embedded tiny Orion on the embedded corpus, a few minutes on a laptop CPU."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time

from kept_jax.errors import KeptError, cli_entry


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m kept_jax.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help="YAML job config (default: configs/tiny.yaml)")
    p.add_argument("--out", help="run directory (default: runs/<config name>)")
    p.add_argument("--force", action="store_true", help="start over in a run directory that holds another run")
    p.add_argument("--dry-run", action="store_true",
                   help="check the job with abstract shapes only (no weights loaded) and print its memory per device")
    p.add_argument("--device-memory", help="with --dry-run: the memory of one device, e.g. 80GB or 141GiB")
    p.add_argument("--devices", type=int, help="with --dry-run: how many devices to plan for (default: the mesh's "
                   "size, or 1 when mesh.data is -1)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. train.steps=200 opm=center-lsq")
    return p.parse_intermixed_args(argv)


def _get(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def _set(tree: dict, path, value) -> dict:
    if len(path) == 1:
        return {**tree, path[0]: value}
    return {**tree, path[0]: _set(tree[path[0]], path[1:], value)}


def _sums_to_metrics(sums: dict) -> dict:
    tokens = max(float(sums["tokens"]), 1.0)
    return {"kl": sums["kl"] / tokens, "agreement": sums["agree"] / tokens, "loss": sums["loss"] / tokens,
            "student_nll": sums["student_nll"] / tokens, "teacher_nll": sums["teacher_nll"] / tokens,
            "tokens": int(tokens)}


def _host_array(x):
    """A (possibly sharded, possibly multi-host) array as one numpy array on this host."""
    import jax
    import numpy as np

    if jax.process_count() > 1 and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


class Job:
    """The pieces of one run, built in order; each stage is a method so that tests can drive them."""

    def __init__(self, cfg):
        self.cfg = cfg

    def prepare(self) -> None:
        import jax

        from bridge.hf_import import ArrayReader, load_hf_checkpoint, params_from_reader
        from kept_jax import data, sharding
        from kept_jax.config import load_hf_config
        from kept_jax.convert import run_mapping, source_tensor_reader
        from kept_jax.evaluate import batches_of
        from kept_jax.mapping import build_mapping, calibrate, outer_sites, target_config
        from kept_jax.models import build_model
        from kept_jax.tokenizer import load_tokenizer
        from kept_jax.xkd.trainable import init_lora, split_student

        cfg, d = self.cfg, self.cfg.data
        source = load_hf_config(cfg.source)
        if source.architecture != "orion":
            raise KeptError(f"source must be an Orion checkpoint; {cfg.source!r} is {source.architecture!r}")
        if cfg.model.attention_impl == "cudnn" and jax.default_backend() != "gpu":
            raise KeptError(f"model.attention_impl=cudnn needs an NVIDIA GPU and JAX runs on {jax.default_backend()}; "
                            f"set model.attention_impl=xla")
        self.mesh = sharding.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
        self.rules = sharding.rules_from(cfg.mesh.rules)
        teacher_rules = sharding.rules_from(cfg.mesh.teacher_rules, dict(self.rules))
        sharding.per_device_batch(d.batch_size, dict(self.mesh.shape))

        # Data: every source is indexed and checked now, before the model is loaded.
        tokenizer = load_tokenizer(cfg.source, "orion")
        self.tokenize = data.Tokenize(tokenizer.encode, source.eos_token_id)
        self.train_docs, self.weights, eval_docs = data.open_sources(d, cfg.train.seed)
        n_calib = -(-d.calib_tokens // d.seq_len)
        n_eval = -(-d.eval_tokens // (d.seq_len * d.batch_size)) * d.batch_size
        heldout = data.first_rows(eval_docs, self.tokenize, d.seq_len, n_calib + n_eval)
        calib_rows = heldout[:n_calib]
        n_eval = (len(heldout) - n_calib) // d.batch_size * d.batch_size  # whole batches, which shard evenly
        if n_eval == 0:
            raise KeptError(f"the held-out text has {len(heldout)} sequences of {d.seq_len} tokens; calibration takes "
                            f"{n_calib} and evaluation needs a batch of {d.batch_size}; lower data.calib_tokens or "
                            f"give more held-out text")
        self.eval_rows = heldout[n_calib : n_calib + n_eval]

        teacher_config, teacher_params, _ = load_hf_checkpoint(cfg.source, **cfg.runtime())
        self.teacher = build_model(teacher_config)
        stats = calibrate(self.teacher, teacher_params, batches_of(calib_rows, d.batch_size),
                          outer_sites=outer_sites(cfg.opm, teacher_config))
        self.mapping = build_mapping(cfg.opm, teacher_config, stats)
        tensors, _ = run_mapping(self.mapping, source_tensor_reader(cfg.source), cfg.precision.params)
        student_config = target_config(teacher_config, cfg.opm).replace(lora_scale=cfg.lora.alpha / cfg.lora.rank)
        student_params, _, _ = params_from_reader(ArrayReader(tensors), student_config)
        del tensors
        self.student = build_model(student_config)
        # Recentering the writers leaves a LayerNorm teacher's function unchanged, so the teacher reads the
        # student's recentered writers: one copy of them instead of two.
        for path in sorted(self.mapping.params_paths(lambda t: t.startswith("recenter"))):
            teacher_params = _set(teacher_params, path, _get(student_params, path))
        variables = {"params": student_params}
        if cfg.trainable == "lora":
            variables["lora"] = init_lora(student_params, cfg.lora.rank, cfg.lora.targets, jax.random.key(cfg.train.seed))
        split = split_student(variables, teacher_params, cfg.trainable)
        if not split.trainable:
            raise KeptError(f"trainable={cfg.trainable!r} selects no parameter of the student; check the patterns")

        # Placement on the mesh. Shared leaves live in the teacher's tree, with the teacher's sharding.
        student_axes = sharding.logical_axes(student_config)
        self.teacher_params = jax.device_put(teacher_params, sharding.tree_shardings(
            teacher_params, sharding.logical_axes(teacher_config), self.mesh, teacher_rules))
        self.trainable_shardings = sharding.flat_shardings(split.trainable, student_axes, self.mesh, self.rules)
        frozen = jax.device_put(split.frozen, sharding.flat_shardings(split.frozen, student_axes, self.mesh, self.rules))
        self.split = dataclasses.replace(split, frozen=frozen)  # trainable stays on the host until init_state
        self.num_trainable = split.num_trainable()
        self.batch_sharding = sharding.batch_sharding(self.mesh, self.rules)
        self.eval_sharding = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec(*self.batch_sharding.spec[1:]))

    def evaluate(self, trainable) -> dict:
        from kept_jax import sharding
        from kept_jax.evaluate import batches_of
        from kept_jax.xkd.objectives import LogitKL
        from kept_jax.xkd.step import make_eval_step

        if not hasattr(self, "_eval"):
            self._eval = make_eval_step(LogitKL(self.teacher, self.student, self.cfg.loss), self.split)
        totals: dict = {}
        for rows in batches_of(self.eval_rows, self.cfg.data.batch_size):
            rows = sharding.global_rows(rows, self.eval_sharding)
            for k, v in self._eval(trainable, self.teacher_params, self.split.frozen, rows).items():
                totals[k] = totals.get(k, 0.0) + float(v)
        return _sums_to_metrics(totals)

    def train_iterator(self):
        """This host's batches, [rows per step / hosts, seq], as a checkpointable grain iterator."""
        import jax

        from kept_jax import data

        d = self.cfg.data
        return iter(data.train_dataset(self.train_docs, self.weights, self.tokenize, d.seq_len,
                                       d.batch_size * d.grad_accum, self.cfg.train.seed,
                                       jax.process_index(), jax.process_count()))

    def batches(self, iterator=None):
        """Global [grad_accum, batch, seq] token arrays, placed on the mesh, from `iterator` (default: a fresh one)."""
        from kept_jax import sharding

        d = self.cfg.data
        iterator = self.train_iterator() if iterator is None else iterator
        while True:
            local = next(iterator).reshape(d.grad_accum, -1, d.seq_len)
            yield sharding.global_batch(local, self.batch_sharding)

    def step_flops(self) -> float:
        from kept_jax.flops import step_flops_per_token

        matmul_leaves = ("kernel", "a", "b")
        trainable_matmul = sum(int(math.prod(v.shape)) for k, v in self.split.trainable.items()
                               if k[-1] in matmul_leaves)
        d = self.cfg.data
        return d.tokens_per_step * step_flops_per_token(self.teacher.config, self.student.config, d.seq_len,
                                                        trainable_matmul)

    def distill(self, log=None, checkpoints=None, stop=None):
        """Trains from the latest checkpoint (if any) to `train.steps`; returns the final state.

        `log` (RunLog) gets train and eval records; `checkpoints` (Checkpoints) saves as it goes; `stop`
        (StopRequest) ends the loop after a step, with a checkpoint, when a signal came.
        """
        import jax
        from tqdm import tqdm

        from kept_jax import sharding
        from kept_jax.checkpoint import abstract_like
        from kept_jax.flops import peak_flops
        from kept_jax.xkd.objectives import LogitKL
        from kept_jax.xkd.step import abstract_state, init_state, make_optimizer, make_schedule, make_train_step

        cfg, t, d = self.cfg, self.cfg.train, self.cfg.data
        schedule = make_schedule(t.lr, t.warmup, t.steps)
        optimizer = make_optimizer(t.lr, t.warmup, t.steps, t.weight_decay, t.clip)
        shapes = abstract_state(self.split, optimizer)
        state_sh = sharding.state_shardings(shapes, self.trainable_shardings, self.mesh)
        iterator = self.train_iterator()
        start = checkpoints.latest_step() if checkpoints else None
        if start is None:
            state, start = init_state(self.split, optimizer, state_sh), 0
        else:
            state = checkpoints.restore(start, abstract_like(shapes, state_sh), iterator)
            print(f"resuming from the checkpoint at step {start}", file=sys.stderr)
        flops, peak = self.step_flops(), peak_flops(jax.devices()[0].device_kind, cfg.precision.compute)
        self.split = dataclasses.replace(self.split, trainable={})  # the state holds them now
        step_fn = make_train_step(LogitKL(self.teacher, self.student, cfg.loss), self.split, optimizer, state_sh)
        tokens_per_step = d.tokens_per_step
        history, window, timed_steps, t0, eval_seconds = [], {}, 0, None, 0.0
        bar = tqdm(total=t.steps, initial=start, desc="distill", unit="step", file=sys.stderr, dynamic_ncols=True,
                   mininterval=1.0, disable=jax.process_index() != 0)
        batches = self.batches(iterator)
        for i in range(start + 1, t.steps + 1):
            state, metrics = step_fn(state, self.teacher_params, self.split.frozen, next(batches))
            metrics = {k: float(v) for k, v in metrics.items()}
            if t0 is None:
                t0 = time.perf_counter()  # after the first step: compilation is not throughput
            else:
                timed_steps += 1
            for k, v in metrics.items():
                window[k] = window.get(k, 0.0) + v
            window["steps"] = window.get("steps", 0) + 1
            if i % t.log_every == 0 or i == t.steps:
                m = _sums_to_metrics(window)
                seconds = max(time.perf_counter() - t0 - eval_seconds, 1e-9)  # training time only
                record = {"split": "train", "step": i, "tokens": i * tokens_per_step, "kl": m["kl"],
                          "agreement": m["agreement"], "loss": m["loss"], "student_nll": m["student_nll"],
                          "teacher_nll": m["teacher_nll"], "grad_norm": window["grad_norm"] / window["steps"],
                          "lr": float(schedule(i - 1)), "tokens_per_s": timed_steps * tokens_per_step / seconds}
                status = f"KL {m['kl']:.3e} agree {m['agreement']:.2%} {record['tokens_per_s']:,.0f} tok/s"
                if peak:
                    record["mfu"] = timed_steps * flops / seconds / (peak * jax.device_count())
                    status += f" MFU {record['mfu']:.1%}"
                history.append(record)
                if log:
                    log.write(record)
                bar.set_postfix_str(status, refresh=False)
                window = {}
            if t.eval_every and i % t.eval_every == 0 and i != t.steps:
                t_eval = time.perf_counter()
                self.log_eval(log, i, self.evaluate(state.trainable))
                eval_seconds += time.perf_counter() - t_eval
            bar.update(1)
            saved = checkpoints.save(i, state, iterator, force=i == t.steps) if checkpoints else False
            if stop is not None and stop.requested():
                bar.close()
                if checkpoints:
                    if not saved:
                        checkpoints.save(i, state, iterator, force=True)
                    checkpoints.wait()
                raise KeyboardInterrupt(f"stopped by a signal after step {i}; the checkpoint at step {i} is saved")
        bar.close()
        if checkpoints:
            checkpoints.wait()
        self.state, self.history = state, history
        return state

    def log_eval(self, log, step: int, metrics: dict) -> dict:
        record = {"split": "eval", "step": step, "tokens": step * self.cfg.data.tokens_per_step,
                  "kl": metrics["kl"], "agreement": metrics["agreement"], "student_nll": metrics["student_nll"],
                  "teacher_nll": metrics["teacher_nll"], "eval_tokens": metrics["tokens"]}
        if log:
            log.write(record)
        return record

    def export(self, export_dir: str | None) -> None:
        import jax

        from bridge.hf_export import hf_tensor
        from kept_jax.convert import export_model
        from kept_jax.xkd.trainable import merge_lora

        variables = self.split.assemble(self.teacher_params, self.state.trainable)
        params = variables["params"]
        if "lora" in variables:
            params = merge_lora(params, variables["lora"], self.student.config.lora_scale)
        config = self.student.config
        specs = {s.hf_name: s for s in config.tensor_table()}
        dtype = self.cfg.precision.export
        if jax.process_count() > 1:  # every host takes part in the gather; only the first one writes
            params = jax.tree.map(_host_array, params)
        if export_dir is None:
            return
        export_model(export_dir, self.cfg.source, config, lambda n: hf_tensor(params, config, specs[n], dtype), dtype,
                     5 * 2**30)

def _verify(export_dir: str, source: str) -> dict:
    """bridge.verify in-process; without torch the check is skipped and says so."""
    try:
        import torch  # noqa: F401
    except ImportError:
        return {"verified": False, "why": "torch is not installed: pip install 'kept_jax[torch]'"}
    from bridge import verify

    rc = verify.main(["--hf", export_dir, "--reference", source, "--tokens", "512"])
    return {"verified": rc == 0, "exit_code": rc}


def _summary_table(summary: dict) -> str:
    rows = [("KL (nats/tok)", "kl", ".4e"), ("agreement", "agreement", ".2%"), ("student ppl", "student_ppl", ".3f")]
    lines = [f"\n{'':<16}{'init':>12}{'final':>12}"]
    lines += [f"{label:<16}{summary[key + '_init']:>12{fmt}}{summary[key + '_final']:>12{fmt}}" for label, key, fmt in rows]
    lines.append(f"{'teacher ppl':<16}{summary['teacher_ppl']:>12.3f}{summary['teacher_ppl']:>12.3f}")
    return "\n".join(lines)


@cli_entry
def main(argv=None) -> int:
    args = parse_args(argv)
    from kept_jax.train_config import DEFAULT_CONFIG, load_config

    cfg, raw = load_config(args.config, args.overrides)
    if args.dry_run:
        from kept_jax.dry_run import dry_run

        return dry_run(cfg, args.device_memory, args.devices)
    import jax

    from kept_jax import checkpoint, runlog, sharding

    sharding.initialize_distributed()
    lead = jax.process_index() == 0  # the first host writes logs, the export and the summary
    name = os.path.splitext(os.path.basename(args.config or DEFAULT_CONFIG))[0]
    out_dir = args.out or os.path.join("runs", name)
    config = checkpoint.config_dict(cfg)
    resume = checkpoint.check_run_dir(out_dir, config, args.force)
    summary_path = os.path.join(out_dir, "summary.json")
    if resume and os.path.isfile(summary_path):
        with open(summary_path, encoding="utf-8") as f:
            print(_summary_table(json.load(f)))
        print(f"\nthe run in {out_dir} is complete; use --force to run it again")
        return 0
    t_start = time.perf_counter()

    job = Job(cfg)
    print(f"teacher {cfg.source} -> convert (opm={cfg.opm}) ...", file=sys.stderr, flush=True)
    job.prepare()
    if not resume and lead:
        checkpoint.create_run_dir(out_dir, config, args.force)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("kept_jax run directory")
    c = cfg.checkpoint
    checkpoints = checkpoint.Checkpoints(os.path.join(out_dir, "checkpoints"), c.every, c.keep, c.async_save)
    start = checkpoints.latest_step() or 0
    # Records up to the restored step stand; later ones (and the final evaluation) are made again.
    log = runlog.RunLog(out_dir, lambda r: start > 0 and r["step"] <= start and not (
        r["split"] == "eval" and r["step"] == cfg.train.steps), enabled=lead)
    try:
        if start == 0:
            init = job.log_eval(log, 0, job.evaluate(job.split.trainable))
            print(f"at init: KL {init['kl']:.4e} nats/token, agreement {init['agreement']:.2%} on "
                  f"{init['eval_tokens']:,} held-out tokens; training {job.num_trainable:,} parameters "
                  f"({cfg.trainable})", file=sys.stderr)
        with checkpoint.StopRequest() as stop:
            job.distill(log, checkpoints, stop)
        job.log_eval(log, cfg.train.steps, job.evaluate(job.state.trainable))
    finally:
        log.close()
        checkpoints.close()
    if not lead:
        job.export(None)  # every host takes part in gathering the weights
        return 0

    records = runlog.read_metrics(out_dir)
    evals = [r for r in records if r["split"] == "eval"]
    init, final = evals[0], evals[-1]
    train_records = [r for r in records if r["split"] == "train"]
    from kept_jax.fileio import atomic_file, atomic_output_dir

    export_dir = os.path.join(out_dir, "export")
    with atomic_output_dir(export_dir, force=True) as tmp:
        job.export(tmp)
    verified = _verify(export_dir, cfg.source) if cfg.verify else {"verified": False, "why": "verify=false"}
    summary = {
        "opm": cfg.opm,
        "trainable": cfg.trainable if isinstance(cfg.trainable, str) else list(cfg.trainable),
        "trainable_params": job.num_trainable,
        "shared_tensors": len(job.split.shared),
        "steps": cfg.train.steps,
        "tokens": cfg.train.steps * cfg.data.tokens_per_step,
        "kl_init": init["kl"], "kl_final": final["kl"],
        "agreement_init": init["agreement"], "agreement_final": final["agreement"],
        "student_ppl_init": math.exp(init["student_nll"]), "student_ppl_final": math.exp(final["student_nll"]),
        "teacher_ppl": math.exp(final["teacher_nll"]),
        "eval_tokens": final["eval_tokens"],
        "tokens_per_s": train_records[-1]["tokens_per_s"] if train_records else None,
        "mfu": train_records[-1].get("mfu") if train_records else None,
        "resumed_from_step": start if resume else None,
        "export_dir": os.path.abspath(export_dir),
        "seconds_this_process": round(time.perf_counter() - t_start, 1),
        **verified,
        "history": train_records,
        "config": raw,
    }
    runlog.write_report(out_dir, f"{cfg.source} -> Llama: opm={cfg.opm}, trainable={summary['trainable']}")
    with atomic_file(summary_path) as f:
        json.dump(summary, f, indent=2)
    print(_summary_table(summary))
    print(f"\nopm={cfg.opm} trainable={summary['trainable']} steps={cfg.train.steps} tokens={summary['tokens']:,} "
          f"verified={summary['verified']} time={summary['seconds_this_process']:.0f}s\nrun directory: {out_dir}")
    if cfg.verify and not summary["verified"]:
        raise KeptError(f"the exported model did not verify through Transformers ({summary.get('why', 'see above')}); "
                        f"the run directory {out_dir} keeps it for inspection")
    return 0


if __name__ == "__main__":
    sys.exit(main())
