"""`python -m kept_jax.train [--config FILE] [--out DIR] [--restart] [key=value ...]`: the KEPT job, end to end.

Load the Orion teacher -> convert it (NPM + OPM) -> evaluate KL/agreement on held-out text -> distill (XKD), with
checkpoints, periodic evaluation and logs in the run directory -> evaluate again -> export the student as a Hugging
Face Llama directory -> verify it through Transformers -> write `summary.json` and `report.png`. The same command
resumes an interrupted run (only `--restart` starts one over). `--dry-run` plans the job from shapes alone
(kept_jax/dry_run.py). With no arguments it runs `configs/tiny.yaml`: the embedded tiny Orion on the embedded corpus,
a few minutes on a laptop CPU."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time

from kept_jax.errors import ArgumentParser, KeptError, cli_entry


def parse_args(argv):
    p = ArgumentParser(prog="python -m kept_jax.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help="YAML job config (default: configs/tiny.yaml)")
    p.add_argument("--out", help="run directory (default: runs/<config name>)")
    p.add_argument("--restart", action="store_true",
                   help="start over: delete the run in --out (its checkpoints, logs and export) and train from step 0; "
                        "without it the same command resumes the run, and a different config is refused")
    p.add_argument("--force", action="store_true", help=argparse.SUPPRESS)  # the old name, answered with a message
    p.add_argument("--dry-run", action="store_true",
                   help="check the job with abstract shapes only (no weights loaded) and print its memory per device")
    p.add_argument("--device-memory", help="with --dry-run: the memory of one device, e.g. 80GB or 141GiB")
    p.add_argument("--devices", type=int, help="with --dry-run: how many devices to plan for (default: the mesh's "
                   "size, or 1 when mesh.data is -1)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. train.steps=200 opm=center-lsq")
    return p.parse_intermixed_args(argv)


def _sums_to_metrics(sums: dict, count: str = "tokens") -> dict:
    """Means per `count` (the objective's: tokens, matrices) of every summed metric; `agree` is `agreement`."""
    n = max(float(sums[count]), 1.0)
    out = {("agreement" if k == "agree" else k): v / n for k, v in sums.items()
           if k not in (count, "grad_norm", "steps")}
    out[count] = int(n)
    return out


def _read_layout(key: str, path: str, fix: str):
    """The ModelConfig of the config.json that config key `key` names (a file, or a directory holding one)."""
    from kept_jax.config import read_config_json
    from kept_jax.models import config_from_hf
    from kept_jax.train_config import find_config_json

    found = find_config_json(path)
    if found is None:
        raise KeptError(f"{key} {path!r} is neither a config.json nor a directory holding one; {fix}")
    return found, config_from_hf(read_config_json(found))


def plan_job(cfg, devices: int, dry_run: bool = False):
    """The job's `kept_jax.plan.JobPlan` on `devices` devices: the program reads the layouts (the source's from its
    checkpoint, a Hugging Face directory or a GGUF file; for a dry run without the weights, from `source_config`;
    the student's from `student_config`) and the library resolves the rest from them."""
    from bridge.checkpoint import open_checkpoint
    from kept_jax.models import config_from_hf
    from kept_jax.plan import make_plan

    has_weights = os.path.isfile(cfg.source) or os.path.isfile(os.path.join(cfg.source, "config.json"))
    if dry_run and not has_weights:
        if not cfg.source_config:
            raise KeptError(f"no checkpoint at {cfg.source!r} and no source_config set; give the source's config.json "
                            "with source_config=PATH to plan without the weights")
        layout, source_config = _read_layout("source_config", cfg.source_config, "give the source's config.json")
    else:
        layout, source_config = cfg.source, config_from_hf(open_checkpoint(cfg.source).hf)
    student_layout = None
    if cfg.recipe == "mohawk" and cfg.student_config:
        _, student_layout = _read_layout(
            "student_config", cfg.student_config, "give the student's config.json (e.g. "
            "configs/models/llamba-1b.json) or leave it out to derive the student from the teacher")
    return make_plan(cfg, source_config, layout, devices, student_layout)


CHAT_FILE = "chat.json"  # the teacher's and the converted student's answers, written before training
ORACLE_ROWS, ORACLE_TOKENS = 2, 32  # the float64 oracle runs token by token: a small check of the Llamba export
ORACLE_TOLERANCE = 1e-4  # of the logit scale; fp32 against float64 on bf16-rounded weights


class Job:
    """The pieces of one run, built in order; each stage is a method so that tests can drive them."""

    def __init__(self, plan):
        self.plan, self.cfg = plan, plan.cfg

    def prepare(self) -> None:
        import jax
        from flax import traverse_util

        from bridge.checkpoint import load_checkpoint, load_checkpoint_tokenizer, tokenizer_dir
        from kept_jax import data, runlog, sharding
        from kept_jax.metrics import batches_of
        from kept_jax.models import build_model
        from kept_jax.recipes import RECIPES
        from kept_jax.tokenizer import chat_template
        from kept_jax.xkd.trainable import shared_leaves

        plan, cfg, d = self.plan, self.cfg, self.cfg.data
        source = plan.source_config
        if cfg.model.attention_impl == "cudnn" and jax.default_backend() != "gpu":
            raise KeptError(f"model.attention_impl=cudnn needs an NVIDIA GPU and JAX runs on {jax.default_backend()}; "
                            f"set model.attention_impl=xla")
        self.mesh = sharding.make_mesh(*(plan.mesh[axis] for axis in sharding.MESH_AXES))
        self.rules = plan.rules

        # Data: every source is indexed and checked now, before the model is loaded.
        with runlog.phase("check data", "index every source, tokenize the held-out rows"):
            tokenizer = load_checkpoint_tokenizer(cfg.source, source.architecture, "the job tokenizes its text with "
                                                  "the teacher's own tokenizer; add its tokenizer.json or tokenizer.model")
            self.tokenize = data.Tokenize(tokenizer.encode, source.eos_token_id)
            if cfg.chat.questions and jax.process_count() > 1:
                raise KeptError("chat.questions are answered on one host; remove them from a multi-host job and ask "
                                "the export with python -m kept_jax.generate --chat")
            if cfg.chat.questions and chat_template(tokenizer_dir(cfg.source)) is None:
                raise KeptError(f"chat.questions are asked with the teacher's chat template, and {cfg.source} has "
                                "none (tokenizer_config.json's chat_template); remove chat.questions")
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

        with runlog.phase("load", cfg.source):
            _, source_params, _ = load_checkpoint(cfg.source, progress="load", **{
                **cfg.runtime(type(source)), "scan_layers": source.scan_layers})
        with runlog.phase("calibrate and convert", f"{calib_rows.size:,} held-out tokens, recipe {cfg.recipe}"):
            recipe = RECIPES[cfg.recipe](plan, source_params, batches_of(calib_rows, d.batch_size))
        del source_params
        self.stages, self.mapping = plan.stages, recipe.mapping
        self.teacher, self.student = build_model(plan.teacher_config), build_model(plan.student_config)

        # Placement on the mesh. Shared leaves live in the teacher's tree, with the teacher's sharding; the store
        # holds the student's other leaves (after a stage, the ones it trained).
        self.student_axes = sharding.logical_axes(plan.student_config)
        self.teacher_params = jax.device_put(recipe.teacher_params, sharding.tree_shardings(
            recipe.teacher_params, sharding.logical_axes(plan.teacher_config), self.mesh, plan.teacher_rules))
        flat = traverse_util.flatten_dict(recipe.student_variables)
        self.twins = shared_leaves(flat, recipe.teacher_params, recipe.shared)
        store = {k: v for k, v in flat.items() if k not in self.twins}
        self.store = jax.device_put(store, sharding.flat_shardings(store, self.student_axes, self.mesh, self.rules))
        self.split = self.stage_split(0)
        self.num_trainable = self.split.num_trainable()  # the first stage's
        self.batch_sharding = sharding.batch_sharding(self.mesh, self.rules)
        self.eval_sharding = sharding.rows_sharding(self.mesh, self.rules)

    def stage_split(self, k: int):
        """Stage k's split of the student: its trainable leaves (from the store, or the teacher's values for a
        leaf the mapping shares), the frozen leaves of the store, and the frozen leaves read from the teacher."""
        from flax import traverse_util

        from kept_jax.xkd.trainable import split_by_paths

        stage = self.stages[k]
        teacher_flat = traverse_util.flatten_dict({"params": self.teacher_params})
        view = {key: teacher_flat[twin] for key, twin in self.twins.items() if key not in self.store}
        view.update(self.store)
        shared = {key[1:]: twin[1:] for key, twin in self.twins.items() if key not in self.store}
        return split_by_paths(view, self.teacher_params, stage.trainable, shared)

    def carried_keys(self, k: int) -> list:
        """Leaves an earlier stage trained that stage k keeps frozen: not rebuilt by the conversion, so they are
        saved with stage k's checkpoints."""
        from kept_jax.xkd.trainable import is_trainable

        keys = set(self.store) | set(self.twins)
        before = {key for key in keys for s in self.stages[:k] if is_trainable(key, s.trainable)}
        return sorted(key for key in before if not is_trainable(key, self.stages[k].trainable))

    def evaluate(self, trainable) -> dict:
        """Held-out KL(teacher || student), agreement and NLLs of the student with `trainable` in the current split,
        overall and by position (`kept_jax.metrics`); for a Llamba also the stage-2 distance of every block from the
        teacher's layer, per token: `hidden` (summed over layers, the stage-2 loss) and `hidden_by_layer`."""
        import numpy as np

        from kept_jax import runlog, sharding
        from kept_jax.metrics import batches_of
        from kept_jax.metrics import summarize
        from kept_jax.xkd.objectives import HiddenAlignment, LogitKL
        from kept_jax.xkd.step import make_eval_step

        if not hasattr(self, "_evals"):  # one program each for the whole job: they take the assembled student
            self._evals = [make_eval_step(LogitKL(self.teacher, self.student, self.cfg.loss))]
            if self.cfg.recipe == "mohawk":
                self._evals.append(make_eval_step(HiddenAlignment(self.teacher, self.student, by_layer=True)))
        variables = self.split.assemble(self.teacher_params, trainable)
        totals, hidden = {}, {}
        batch = self.cfg.data.batch_size
        with runlog.progress(len(self.eval_rows) // batch, "evaluate", "batch", leave=False) as bar:
            for rows in batches_of(self.eval_rows, batch):
                rows = sharding.global_rows(rows, self.eval_sharding)
                for evaluate, sums in zip(self._evals, (totals, hidden)):
                    for k, v in evaluate(variables, self.teacher_params, rows).items():
                        sums[k] = sums.get(k, 0.0) + np.asarray(v, np.float64)
                bar.update(1)
        out = summarize({k: float(v) for k, v in totals.items()})
        if hidden:
            out["hidden"] = float(hidden["loss"] / hidden["tokens"])
            out["hidden_by_layer"] = [float(v) for v in hidden["layers"] / hidden["tokens"]]
        return out

    def chat(self, config=None, params=None) -> list[str]:
        """Greedy answers to `chat.questions`, with the teacher's chat template, of a model given as (config, params
        tree): by default the teacher."""
        from bridge.checkpoint import tokenizer_dir
        from kept_jax.generate import greedy_chat

        if config is None:
            config, params = self.teacher.config, self.teacher_params
        c = self.cfg.chat
        return greedy_chat(config, params, tokenizer_dir(self.cfg.source), list(c.questions), c.max_new_tokens)

    def student_params(self) -> dict:
        """The student's params tree as the store and the teacher's shared buffers hold it now."""
        return self.split.assemble(self.teacher_params)["params"]

    def pack(self, data_dir: str | None = None) -> None:
        """Every training source tokenized once into packed rows: `data_dir/train-<i>.rows` (memory-mapped, reused
        on resume), or in memory without a directory."""
        from kept_jax import data, runlog

        d = self.cfg.data
        self.train_rows = []
        for i, docs in enumerate(self.train_docs):
            name = getattr(docs, "name", i)
            with runlog.progress(len(docs), f"pack {name}", "doc") as bar:
                path = os.path.join(data_dir, f"train-{i}.rows") if data_dir else None
                rows = data.pack_rows(docs, self.tokenize, d.seq_len, path, bar)
            if len(rows) == 0:
                raise KeptError(f"training source {name!r} has fewer tokens than one sequence of "
                                f"data.seq_len={d.seq_len}; give more text or lower data.seq_len")
            self.train_rows.append(rows)

    def train_iterator(self):
        """This host's batches, [rows per step / hosts, seq], as a checkpointable grain iterator."""
        import jax

        from kept_jax import data

        d = self.cfg.data
        if getattr(self, "train_rows", None) is None:
            self.pack()
        return iter(data.train_dataset(self.train_rows, self.weights, d.batch_size * d.grad_accum,
                                       self.cfg.train.seed, jax.process_index(), jax.process_count()))

    def batches(self, iterator=None):
        """Global [grad_accum, batch, seq] token arrays, placed on the mesh, from `iterator` (default: a fresh one)."""
        from kept_jax import sharding

        d = self.cfg.data
        iterator = self.train_iterator() if iterator is None else iterator
        while True:
            local = next(iterator).reshape(d.grad_accum, -1, d.seq_len)
            yield sharding.global_batch(local, self.batch_sharding)

    def step_flops(self, stage, split) -> float:
        """FLOPs of one training step of `stage`, for MFU (kept_jax/flops.py)."""
        from kept_jax.flops import stage_flops_per_token

        matmul_leaves = ("kernel", "a", "b")
        trainable_matmul = sum(int(math.prod(v.shape)) for k, v in split.trainable.items()
                               if k[-1] in matmul_leaves)
        d = self.cfg.data
        return d.tokens_per_step * stage_flops_per_token(stage.objective, self.teacher.config, self.student.config,
                                                         d.seq_len, trainable_matmul)

    def distill(self, log=None, checkpoints=None, stop=None):
        """Trains every stage from the latest checkpoint (if any) to the last step; returns the final state.

        `log` (RunLog) gets train and eval records (held-out KL and agreement at the end of every stage);
        `checkpoints` (Checkpoints) saves as it goes, with the stage; `stop` (StopRequest) ends the loop after a
        step, with a checkpoint, when a signal came.
        """
        from kept_jax import runlog

        start = (checkpoints.latest_step() if checkpoints else None) or 0
        iterator = self.train_iterator()
        self.history = []
        batches = self.batches(iterator)
        for k, stage in enumerate(self.stages):
            if start > stage.end:
                continue
            resume = start if start > stage.start else None
            state = self._train_stage(k, resume, iterator, batches, log, checkpoints, stop)
            self.store.update(state.trainable)  # what the stage trained, for the stages after it
            with runlog.phase("evaluate", f"after stage {stage.name}"):
                self.log_eval(log, stage.end, self.evaluate(state.trainable), stage.name)
        self.state = state
        return state

    def _train_stage(self, k, resume, iterator, batches, log, checkpoints, stop):
        import jax

        from kept_jax import runlog, sharding
        from kept_jax.checkpoint import abstract_like
        from kept_jax.flops import peak_flops
        from kept_jax.xkd.objectives import make_objective
        from kept_jax.xkd.step import abstract_state, init_state, make_train_step

        cfg, t, d = self.cfg, self.cfg.train, self.cfg.data
        stage = self.stages[k]
        carried = self.carried_keys(k)
        split = self.split if k == 0 else self.stage_split(k)  # prepare made stage 0's: no second fp32 copy
        shapes = abstract_state(split, stage.optimizer)
        trainable_sh = sharding.flat_shardings(split.trainable, self.student_axes, self.mesh, self.rules)
        state_sh = sharding.state_shardings(shapes, trainable_sh, self.mesh)
        window = {}  # train metrics summed since the last logged record
        if resume is None:
            state = init_state(split, stage.optimizer, state_sh)
        else:
            carried_shapes = {key: jax.ShapeDtypeStruct(split.frozen[key].shape, jax.numpy.float32,
                                                        sharding=split.frozen[key].sharding) for key in carried}
            state, restored, window = checkpoints.restore(resume, abstract_like(shapes, state_sh), iterator,
                                                          carried_shapes)
            self.store.update(restored)
            split = self.stage_split(k)
            print(f"resuming from the checkpoint at step {resume} (stage {stage.name})", file=sys.stderr)
        for key in split.trainable:  # the state holds them now: no second copy in the store
            self.store.pop(key, None)
        flops, peak = self.step_flops(stage, split), peak_flops(jax.devices()[0].device_kind, cfg.precision.compute)
        self.split = dataclasses.replace(split, trainable={})  # nor in the split
        del split
        objective = make_objective(stage.objective, self.teacher, self.student, cfg.loss)
        step_fn = make_train_step(objective, self.split, stage.optimizer, state_sh)
        tokens_per_step = d.tokens_per_step
        timed_steps, t0, eval_seconds = 0, None, 0.0
        first = stage.start if resume is None else resume
        with runlog.progress(stage.steps, stage.name, "step", initial=first - stage.start) as bar:
            for i in range(first + 1, stage.end + 1):
                state, metrics = step_fn(state, self.teacher_params, self.split.frozen, next(batches))
                metrics = {k: float(v) for k, v in metrics.items()}
                if t0 is None:
                    t0 = time.perf_counter()  # after the first step: compilation is not throughput
                else:
                    timed_steps += 1
                for key, v in metrics.items():
                    window[key] = window.get(key, 0.0) + v
                window["steps"] = window.get("steps", 0) + 1
                if i % t.log_every == 0 or i == stage.end:
                    m = _sums_to_metrics(window, objective.count)
                    seconds = max(time.perf_counter() - t0 - eval_seconds, 1e-9)  # training time only
                    logged = ("kl", "agreement", "loss", "student_nll", "teacher_nll")
                    record = {"split": "train", "stage": stage.name, "step": i, "tokens": i * tokens_per_step,
                              **{key: m[key] for key in logged if key in m},
                              "grad_norm": window["grad_norm"] / window["steps"],
                              "lr": float(stage.schedule(i - stage.start - 1))}
                    timing = {"tokens_per_s": timed_steps * tokens_per_step / seconds}
                    status = (f"KL {m['kl']:.3e} agree {m['agreement']:.2%}" if "kl" in m else f"loss {m['loss']:.4g}")
                    status += f" {timing['tokens_per_s']:,.0f} tok/s"
                    if peak and flops:
                        timing["mfu"] = timed_steps * flops / seconds / (peak * jax.device_count())
                        status += f" MFU {timing['mfu']:.1%}"
                    self.history.append(record)
                    if log:
                        log.write(record, timing)
                    bar.set_postfix_str(status, refresh=False)
                    window = {}
                if t.eval_every and i % t.eval_every == 0 and i != stage.end:
                    t_eval = time.perf_counter()
                    self.log_eval(log, i, self.evaluate(state.trainable), stage.name)
                    eval_seconds += time.perf_counter() - t_eval
                bar.update(1)
                extra = {"carried": {key: self.split.frozen[key] for key in carried}, "stage": stage.name,
                         "log_window": dict(window)}  # a copy: an async save writes it later
                saved = checkpoints.save(i, state, iterator, force=i == stage.end, **extra) if checkpoints else False
                if stop is not None and stop.requested():
                    if checkpoints:
                        if not saved:
                            checkpoints.save(i, state, iterator, force=True, **extra)
                        checkpoints.wait()
                    raise KeyboardInterrupt(f"stopped by a signal after step {i}; the checkpoint at step {i} is saved")
        if checkpoints:
            checkpoints.wait()
        return state

    def log_eval(self, log, step: int, metrics: dict, stage: str) -> dict:
        record = {"split": "eval", "stage": stage, "step": step, "tokens": step * self.cfg.data.tokens_per_step,
                  "kl": metrics["kl"], "agreement": metrics["agreement"], "student_nll": metrics["student_nll"],
                  "teacher_nll": metrics["teacher_nll"], "eval_tokens": metrics["tokens"],
                  "by_position": metrics["by_position"],
                  **{k: metrics[k] for k in ("hidden", "hidden_by_layer") if k in metrics}}
        if log:
            log.write(record)
        return record

    def export(self, export_dir: str | None) -> None:
        import jax

        from bridge.hf_export import hf_tensor
        from kept_jax import sharding
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
            params = jax.tree.map(sharding.to_host, params)
        if export_dir is None:
            return
        export_model(export_dir, self.cfg.source, config, lambda n: hf_tensor(params, config, specs[n], dtype), dtype)

def student_name(config) -> str:
    """`Llamba`, or `hybrid (attention in layers 0, 4, 8)`."""
    if config.architecture == "llamba":
        return "Llamba"
    layers = config.attention_layers
    return f"hybrid (attention in {'no layer' if not layers else 'layers ' + ', '.join(map(str, layers))})"


def _verify(export_dir: str, source: str) -> dict:
    """bridge.verify in-process; without torch the check is skipped and says so."""
    try:
        import torch  # noqa: F401
    except ImportError:
        return {"verified": False, "why": "torch is not installed: pip install 'kept_jax[torch]'"}
    from bridge import verify

    rc = verify.main(["--hf", export_dir, "--reference", source, "--tokens", "512"])
    return {"verified": rc == 0, "exit_code": rc}


def _check_llamba(export_dir: str, rows) -> dict:
    """The export re-imported and compared with the float64 oracle (bridge/llamba_oracle.py) on held-out rows."""
    from bridge.llamba_oracle import check_export

    result = check_export(export_dir, rows[:ORACLE_ROWS, :ORACLE_TOKENS])
    ok = result["max_relative_error"] <= ORACLE_TOLERANCE and result["argmax_agreement"] == 1.0
    why = {} if ok else {"why": f"the re-imported export differs from the float64 oracle by "
                                f"{result['max_relative_error']:.2e} of the logit scale (tolerance "
                                f"{ORACLE_TOLERANCE:.0e}), argmax agreement {result['argmax_agreement']:.2%}"}
    return {"verified": ok, "oracle": result, **why}


def _stage_summaries(stages, evals: list[dict], train_records: list[dict], tokens_per_step: int) -> list[dict]:
    """Per stage: its steps and tokens, its loss at the first and last log line, and held-out KL, agreement,
    student perplexity and hidden-state distance (summed and per layer) at its end."""
    from kept_jax.xkd.trainable import describe

    by_end = {r["step"]: r for r in evals}  # a stage's closing evaluation is the only one at its end step
    out = []
    for stage in stages:
        lines = [r for r in train_records if r.get("stage") == stage.name]
        end = by_end[stage.end]
        out.append({"name": stage.name, "objective": stage.objective, "trainable": describe(stage.trainable),
                    "steps": stage.steps,
                    "tokens": stage.steps * tokens_per_step, "loss_first": lines[0]["loss"] if lines else None,
                    "loss_last": lines[-1]["loss"] if lines else None, "kl": end["kl"],
                    "agreement": end["agreement"], "student_ppl": math.exp(end["student_nll"]),
                    "hidden": end.get("hidden"), "hidden_by_layer": end.get("hidden_by_layer")})
    return out


def _summary_table(summary: dict) -> str:
    rows = [("KL (nats/tok)", "kl", ".4e"), ("agreement", "agreement", ".2%"), ("student ppl", "student_ppl", ".3f")]
    if "stages" in summary:  # MOHAWK: held-out KL and agreement after init and after each stage
        stages = summary["stages"]

        def row(label: str, init, values, fmt: str) -> str:
            return (f"{label:<16}{'' if init is None else format(init, fmt):>12}"
                    + "".join(f"{format(v, fmt):>22}" for v in values))

        lines = [f"\n{'':<16}{'init':>12}" + "".join(f"{s['name']:>22}" for s in stages)]
        lines.append(row("KL (nats/tok)", summary["kl_init"], [s["kl"] for s in stages], ".4e"))
        lines.append(row("agreement", summary["agreement_init"], [s["agreement"] for s in stages], ".2%"))
        lines.append(row("student ppl", summary["student_ppl_init"], [s["student_ppl"] for s in stages], ".4g")
                     + f"   (teacher {summary['teacher_ppl']:.4g})")
        if summary.get("hidden_init") is not None:
            lines.append(row("hidden dist", summary["hidden_init"], [s["hidden"] for s in stages], ".4g"))
        losses = [f"{s['loss_first']:.3g} -> {s['loss_last']:.3g}" if s["loss_first"] is not None else ""
                  for s in stages]
        lines.append(row("stage loss", None, losses, ""))
        return "\n".join(lines)
    lines = [f"\n{'':<16}{'init':>12}{'final':>12}"]
    lines += [f"{label:<16}{summary[key + '_init']:>12{fmt}}{summary[key + '_final']:>12{fmt}}" for label, key, fmt in rows]
    lines.append(f"{'teacher ppl':<16}{summary['teacher_ppl']:>12.3f}{summary['teacher_ppl']:>12.3f}")
    init, final = summary.get("by_position_init") or {}, summary.get("by_position_final") or {}
    lines += [f"{'KL, pos ' + name:<16}{init[name]['kl']:>12.4e}{final[name]['kl']:>12.4e}"
              for name in final if name in init]
    return "\n".join(lines)


@cli_entry
def main(argv=None) -> int:
    args = parse_args(argv)
    from kept_jax.train_config import DEFAULT_CONFIG, load_config

    cfg, raw = load_config(args.config, args.overrides)
    if args.dry_run:
        from kept_jax.dry_run import dry_run

        plan = plan_job(cfg, args.devices or cfg.mesh.devices(), dry_run=True)
        for note in plan.notes:
            print(note, file=sys.stderr)
        return dry_run(plan, args.device_memory)
    import jax

    import numpy as np

    from kept_jax import checkpoint, runlog, sharding
    from kept_jax.config import NUMPY_DTYPES
    from kept_jax.fileio import atomic_file, atomic_output_dir, read_optional_json, remove_interrupted_writes
    from kept_jax.xkd.trainable import describe

    sharding.initialize_distributed()
    plan = plan_job(cfg, jax.device_count())
    for note in plan.notes:
        print(note, file=sys.stderr)
    lead = jax.process_index() == 0  # the first host writes logs, the export and the summary
    name = os.path.splitext(os.path.basename(args.config or DEFAULT_CONFIG))[0]
    out_dir = args.out or os.path.join("runs", name)
    config = checkpoint.config_dict(cfg)
    if args.force:
        raise KeptError("train resumes the run in --out by default and no longer takes --force; to start over "
                        "(deleting the run's checkpoints) pass --restart")
    export_bytes = plan.source_config.num_params() * np.dtype(NUMPY_DTYPES[cfg.precision.export]).itemsize
    resume = checkpoint.check_run_dir(out_dir, config, args.restart, needed_bytes=export_bytes)
    summary_path = os.path.join(out_dir, "summary.json")
    if resume and os.path.isfile(summary_path):
        with open(summary_path, encoding="utf-8") as f:
            finished = json.load(f)
        print(_summary_table(finished))
        if finished.get("rejected"):
            raise KeptError(finished["rejected"])
        print(f"\nthe run in {out_dir} is complete; use --restart to run it again (it deletes this one)")
        return 0
    t_start = time.perf_counter()

    job = Job(plan)
    what = f"opm={cfg.opm}" if cfg.recipe == "kept" else f"recipe mohawk, mixer_init={cfg.mixer_init}"
    print(f"teacher {cfg.source} -> convert ({what}) ...", file=sys.stderr, flush=True)
    job.prepare()
    if not resume and lead:
        checkpoint.create_run_dir(out_dir, config, args.restart)
    elif lead:
        remove_interrupted_writes(out_dir)  # an export or summary cut short by the kill
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("kept_jax run directory")
    with runlog.phase("pack", "tokenize the training text once into DIR/packed_rows"):
        job.pack(os.path.join(out_dir, "packed_rows"))
    c = cfg.checkpoint
    checkpoints = checkpoint.Checkpoints(os.path.join(out_dir, "checkpoints"), c.every, c.keep, c.async_save)
    start = checkpoints.latest_step() or 0
    if resume and not start:  # (a restored run says where it resumes when the stage restores)
        print(f"{out_dir} holds this run but no checkpoint yet (it stopped before its first): starting from step 0",
              file=sys.stderr, flush=True)
    # Records up to the restored step stand; later ones, and the evaluation closing a stage at the restored step
    # (made again on resume), are dropped.
    stage_ends = {stage.end for stage in job.stages}
    log = runlog.RunLog(out_dir, lambda r: start > 0 and (r["step"] < start or r["step"] == start and not (
        r["split"] == "eval" and r["step"] in stage_ends)), enabled=lead)
    try:
        if start == 0:
            with runlog.phase("evaluate", f"the converted student on {len(job.eval_rows) * cfg.data.seq_len:,} "
                              "held-out tokens"):
                init = job.log_eval(log, 0, job.evaluate(job.split.trainable), "init")
            print(f"at init: KL {init['kl']:.4e} nats/token, agreement {init['agreement']:.2%} on "
                  f"{init['eval_tokens']:,} held-out tokens; training {job.num_trainable:,} parameters "
                  f"({describe(job.stages[0].trainable)}) in stage {job.stages[0].name}", file=sys.stderr)
        chat_path = os.path.join(out_dir, CHAT_FILE)
        asked = {"questions": list(cfg.chat.questions), "max_new_tokens": cfg.chat.max_new_tokens}
        saved = read_optional_json(chat_path)
        if asked["questions"] and lead and {k: saved.get(k) for k in asked} != asked:
            # The answers before training (on a resume too, when questions were added: nothing is restored yet).
            with runlog.phase("chat", f"the teacher and the converted student answer {len(asked['questions'])} "
                              "questions, greedy"):
                before = {**asked, "teacher": job.chat(),
                          "student_init": job.chat(job.student.config, job.student_params())}
            with atomic_file(chat_path) as f:
                json.dump(before, f, indent=1)
        with checkpoint.StopRequest() as stop, runlog.phase(
                "distill", f"{job.stages[-1].end} steps of {cfg.data.tokens_per_step:,} tokens, evaluated at the end "
                "of every stage"):
            job.distill(log, checkpoints, stop)
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
    timings = runlog.read_metrics(out_dir, runlog.TIMINGS_FILE)

    export_dir = os.path.join(out_dir, "export")
    with runlog.phase("export", os.path.abspath(export_dir)), atomic_output_dir(export_dir, force=True) as tmp:
        job.export(tmp)
    if not cfg.verify:
        verified = {"verified": False, "why": "verify=false"}
    elif job.student.config.architecture == "llamba":  # Transformers has no Llamba
        with runlog.phase("verify", "the re-imported export against the float64 oracle"):
            verified = _check_llamba(export_dir, job.eval_rows)
    else:
        with runlog.phase("verify", "the export through Transformers, against kept_jax and the teacher"):
            verified = _verify(export_dir, cfg.source)
    if "oracle" in verified:
        o = verified["oracle"]
        print(f"float64 oracle vs the re-imported export on {ORACLE_ROWS} x {ORACLE_TOKENS} held-out tokens: max "
              f"error {o['max_relative_error']:.2e} of the logit scale, argmax agreement {o['argmax_agreement']:.2%}")
    chat = None
    if cfg.chat.questions:
        from bridge.checkpoint import load_checkpoint

        with runlog.phase("chat", "the exported student answers the same questions"):
            answers = job.chat(*load_checkpoint(export_dir)[:2])
        before = read_optional_json(os.path.join(out_dir, CHAT_FILE))
        chat = [{"question": q, "teacher": t, "student_init": i, "student_final": f}
                for q, t, i, f in zip(cfg.chat.questions, before["teacher"], before["student_init"], answers)]
    total_steps = job.stages[-1].end
    summary = {
        "recipe": cfg.recipe,
        "opm": cfg.opm,
        "trainable": (cfg.trainable if isinstance(cfg.trainable, str) else list(cfg.trainable)) if cfg.recipe == "kept"
        else "per stage",
        "trainable_params": job.num_trainable,
        "shared_tensors": len(job.split.shared),
        "steps": total_steps,
        "tokens": total_steps * cfg.data.tokens_per_step,
        "kl_init": init["kl"], "kl_final": final["kl"],
        "agreement_init": init["agreement"], "agreement_final": final["agreement"],
        "student_ppl_init": math.exp(init["student_nll"]), "student_ppl_final": math.exp(final["student_nll"]),
        "teacher_ppl": math.exp(final["teacher_nll"]),
        "eval_tokens": final["eval_tokens"],
        "by_position_init": init.get("by_position"), "by_position_final": final.get("by_position"),
        "tokens_per_s": timings[-1]["tokens_per_s"] if timings else None,
        "mfu": timings[-1].get("mfu") if timings else None,
        "resumed_from_step": start if resume else None,
        "export_dir": os.path.abspath(export_dir),
        "seconds_this_process": round(time.perf_counter() - t_start, 1),
        **verified,
        "chat": chat,
        "history": train_records,
        "config": raw,
    }
    if cfg.recipe == "mohawk":
        summary["mixer_init"] = cfg.mixer_init
        summary["student"] = student_name(job.student.config)
        summary["stages"] = _stage_summaries(job.stages, evals, train_records, cfg.data.tokens_per_step)
        summary["hidden_init"], summary["hidden_by_layer_init"] = init.get("hidden"), init.get("hidden_by_layer")
    title = (f"{cfg.source} -> Llama: opm={cfg.opm}, trainable={summary['trainable']}" if cfg.recipe == "kept" else
             f"{cfg.source} -> {student_name(job.student.config)} (MOHAWK, {cfg.mixer_init} init): "
             + ", ".join(s.name for s in job.stages))
    runlog.write_report(out_dir, title)
    worse = None
    if not final["kl"] <= init["kl"]:  # NaN counts as worse
        worse = (f"held-out KL ended worse than it started ({init['kl']:.4e} -> {final['kl']:.4e} nats/token): the "
                 "training moved the student away from the teacher, most likely a learning rate too high for this "
                 f"trainable set ({'train.lr' if cfg.recipe == 'kept' else 'stages[].lr'}). The export in "
                 f"{os.path.abspath(export_dir)} is kept for inspection and is not a result; lower the learning "
                 "rate and run again with --restart")
        summary["rejected"] = worse
    with atomic_file(summary_path) as f:
        json.dump(summary, f, indent=2)
    print(_summary_table(summary))
    for row in chat or []:
        print(f"\nQ: {row['question']}")
        for who, key in (("teacher", "teacher"), ("student, init", "student_init"), ("student", "student_final")):
            print(f"  {who:<15}{json.dumps(row[key], ensure_ascii=False)}")
    print(f"\n{what} trainable={summary['trainable']} steps={total_steps} "
          f"tokens={summary['tokens']:,} verified={summary['verified']} time={summary['seconds_this_process']:.0f}s\n"
          f"run directory: {os.path.abspath(out_dir)}")
    if worse:
        raise KeptError(worse)
    if cfg.verify and not summary["verified"]:
        raise KeptError(f"the exported model did not verify ({summary.get('why', 'see above')}); "
                        f"the run directory {out_dir} keeps it for inspection")
    return 0


if __name__ == "__main__":
    sys.exit(main())
