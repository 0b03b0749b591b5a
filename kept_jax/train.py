"""`python -m kept_jax.train [--config FILE] [--out DIR] [key=value ...]`: the KEPT job, end to end.

Load the Orion teacher -> convert it (NPM + OPM) -> evaluate KL/agreement on held-out text -> distill (XKD) ->
evaluate again -> export the student as a Hugging Face Llama directory -> verify it through Transformers ->
write `summary.json` in the run directory. With no arguments it runs `configs/tiny.yaml`: the embedded tiny Orion
on the embedded corpus, a few minutes on a laptop CPU.
"""

from __future__ import annotations

import argparse
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
    p.add_argument("--force", action="store_true", help="replace a non-empty run directory")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. train.steps=200 opm=center-lsq")
    return p.parse_intermixed_args(argv)


def _rows(path: str, tokenizer, eos_id, seq_len: int):
    from kept_jax import corpus

    file = {"embedded": corpus.TRAIN, "embedded-heldout": corpus.HELDOUT}.get(path, path)
    return corpus.token_rows(file, tokenizer.encode, seq_len, eos_id)


def _recentered_paths(mapping, config) -> list[tuple[str, ...]]:
    """Params paths of the writers the mapping recenters (the same, function-preserving edit fits the teacher)."""
    from bridge.names import tensor_table

    specs = {s.hf_name: s for s in tensor_table(config)}
    return sorted({specs[r.target].params_path(config.scan_layers) for r in mapping.rules
                   if r.transform.startswith("recenter")})


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


class Job:
    """The pieces of one run, built in order; each stage is a method so that tests can drive them."""

    def __init__(self, cfg):
        self.cfg = cfg

    def prepare(self) -> None:
        import jax
        import numpy as np

        from bridge.hf_import import ArrayReader, load_hf_checkpoint, params_from_reader
        from kept_jax.config import load_hf_config
        from kept_jax.convert import run_mapping, source_tensor_reader
        from kept_jax.evaluate import batches_of
        from kept_jax.mapping import build_mapping, calibrate, outer_sites, target_config
        from kept_jax.models import CausalLM
        from kept_jax.tokenizer import load_tokenizer
        from kept_jax.xkd.trainable import init_lora, split_student

        cfg = self.cfg
        source = load_hf_config(cfg.source)
        if source.architecture != "orion":
            raise KeptError(f"source must be an Orion checkpoint; {cfg.source!r} is {source.architecture!r}")
        runtime = dict(compute_dtype=cfg.precision.compute, param_dtype=cfg.precision.params,
                       scan_layers=cfg.model.scan_layers, remat_policy=cfg.model.remat,
                       attention_impl=cfg.model.attention_impl)
        tokenizer = load_tokenizer(cfg.source, "orion")
        d = cfg.data
        self.train_rows = _rows(d.train, tokenizer, source.eos_token_id, d.seq_len)
        heldout = _rows("embedded-heldout" if d.eval == "embedded" else d.eval, tokenizer, source.eos_token_id, d.seq_len)
        n_calib = max(1, -(-d.calib_tokens // d.seq_len))
        calib_rows, self.eval_rows = heldout[:n_calib], heldout[n_calib:][: max(1, -(-d.eval_tokens // d.seq_len))]
        if len(self.eval_rows) == 0:
            raise KeptError("the held-out text is used up by calibration; lower data.calib_tokens or give more text")
        if len(self.train_rows) < d.batch_size * d.grad_accum:
            raise KeptError(f"the training text has {len(self.train_rows)} sequences of {d.seq_len} tokens, fewer "
                            f"than one batch ({d.batch_size} x {d.grad_accum}); give more text or a smaller batch")

        teacher_config, teacher_params, _ = load_hf_checkpoint(cfg.source, **runtime)
        self.teacher = CausalLM(teacher_config)
        stats = calibrate(self.teacher, teacher_params, batches_of(calib_rows, d.batch_size),
                          outer_sites=outer_sites(cfg.opm, teacher_config))
        self.mapping = build_mapping(cfg.opm, teacher_config, stats)
        tensors, _ = run_mapping(self.mapping, source_tensor_reader(cfg.source), cfg.precision.params)
        student_config = target_config(teacher_config, cfg.opm).replace(lora_scale=cfg.lora.alpha / cfg.lora.rank)
        student_params, _, _ = params_from_reader(ArrayReader(tensors), student_config)
        del tensors
        self.student = CausalLM(student_config)
        # Recentering the writers leaves a LayerNorm teacher's function unchanged, so the teacher reads the
        # student's recentered writers: one copy of them instead of two.
        for path in _recentered_paths(self.mapping, teacher_config):
            teacher_params = _set(teacher_params, path, _get(student_params, path))
        self.teacher_params = teacher_params
        variables = {"params": student_params}
        if cfg.trainable == "lora":
            variables["lora"] = init_lora(student_params, cfg.lora.rank, cfg.lora.targets, jax.random.key(cfg.train.seed))
        self.split = split_student(variables, teacher_params, cfg.trainable)
        if not self.split.trainable:
            raise KeptError(f"trainable={cfg.trainable!r} selects no parameter of the student; check the patterns")
        self.rng = np.random.default_rng(cfg.train.seed)

    def evaluate(self, trainable) -> dict:
        from kept_jax.evaluate import batches_of
        from kept_jax.xkd.step import make_eval_step

        if not hasattr(self, "_eval"):
            self._eval = make_eval_step(self.teacher, self.student, self.split, self.cfg.loss)
        totals: dict = {}
        for rows in batches_of(self.eval_rows, self.cfg.data.batch_size):
            for k, v in self._eval(trainable, self.teacher_params, self.split.frozen, rows).items():
                totals[k] = totals.get(k, 0.0) + float(v)
        return _sums_to_metrics(totals)

    def batches(self):
        """[grad_accum, batch, seq] int32 arrays, epoch after epoch, shuffled by the seed."""
        d = self.cfg.data
        per_step = d.batch_size * d.grad_accum
        while True:
            order = self.rng.permutation(len(self.train_rows))
            for i in range(0, len(order) - per_step + 1, per_step):
                yield self.train_rows[order[i : i + per_step]].reshape(d.grad_accum, d.batch_size, d.seq_len)

    def distill(self):
        from tqdm import tqdm

        from kept_jax.xkd.step import init_state, make_optimizer, make_train_step

        t = self.cfg.train
        optimizer = make_optimizer(t.lr, t.warmup, t.steps, t.weight_decay, t.clip)
        state = init_state(self.split, optimizer)
        step = make_train_step(self.teacher, self.student, self.split, optimizer, self.cfg.loss)
        history, window, tokens, t0 = [], {}, 0, None
        bar = tqdm(total=t.steps, desc="distill", unit="step", file=sys.stderr, dynamic_ncols=True, mininterval=1.0)
        for i, batch in zip(range(1, t.steps + 1), self.batches()):
            state, metrics = step(state, self.teacher_params, self.split.frozen, batch)
            metrics = {k: float(v) for k, v in metrics.items()}
            if t0 is None:
                t0 = time.perf_counter()  # after the first step: compilation is not throughput
            else:
                tokens += int(metrics["tokens"])
            for k, v in metrics.items():
                window[k] = window.get(k, 0.0) + v
            if i % t.log_every == 0 or i == t.steps:
                m = _sums_to_metrics(window)
                rate = tokens / max(time.perf_counter() - t0, 1e-9)
                history.append({"step": i, "tokens_per_s": rate, "grad_norm": window["grad_norm"] / t.log_every, **m})
                bar.set_postfix_str(f"KL {m['kl']:.3e} agree {m['agreement']:.2%} {rate:,.0f} tok/s")
                window = {}
            bar.update(1)
        bar.close()
        self.state, self.history = state, history
        return state

    def export(self, export_dir: str) -> None:
        from bridge.hf_export import hf_tensor
        from bridge.names import tensor_table
        from kept_jax.convert import export_llama
        from kept_jax.xkd.trainable import merge_lora

        variables = self.split.assemble(self.teacher_params, self.state.trainable)
        params = variables["params"]
        if "lora" in variables:
            params = merge_lora(params, variables["lora"], self.student.config.lora_scale)
        config = self.student.config
        specs = {s.hf_name: s for s in tensor_table(config)}
        dtype = self.cfg.precision.export
        export_llama(export_dir, self.cfg.source, config, lambda n: hf_tensor(params, config, specs[n], dtype), dtype,
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


@cli_entry
def main(argv=None) -> int:
    args = parse_args(argv)
    from bridge.hf_export import atomic_output_dir, check_output_dir
    from kept_jax.train_config import DEFAULT_CONFIG, load_config

    cfg, raw = load_config(args.config, args.overrides)
    name = os.path.splitext(os.path.basename(args.config or DEFAULT_CONFIG))[0]
    out_dir = args.out or os.path.join("runs", name)
    os.makedirs(os.path.dirname(os.path.abspath(out_dir)), exist_ok=True)
    check_output_dir(out_dir, args.force)
    t_start = time.perf_counter()

    job = Job(cfg)
    print(f"teacher {cfg.source} -> convert (opm={cfg.opm}) ...", file=sys.stderr, flush=True)
    job.prepare()
    init = job.evaluate(job.split.trainable)
    print(f"at init: KL {init['kl']:.4e} nats/token, agreement {init['agreement']:.2%} on {init['tokens']:,} "
          f"held-out tokens; training {job.split.num_trainable():,} parameters ({cfg.trainable})", file=sys.stderr)
    job.distill()
    final = job.evaluate(job.state.trainable)

    with atomic_output_dir(out_dir, args.force) as tmp:
        export_dir = os.path.join(tmp, "export")
        os.makedirs(export_dir)
        job.export(export_dir)
        verified = _verify(export_dir, cfg.source) if cfg.verify else {"verified": False, "why": "verify=false"}
        summary = {
            "opm": cfg.opm,
            "trainable": cfg.trainable if isinstance(cfg.trainable, str) else list(cfg.trainable),
            "trainable_params": job.split.num_trainable(),
            "shared_tensors": len(job.split.shared),
            "steps": cfg.train.steps,
            "tokens": cfg.train.steps * cfg.data.batch_size * cfg.data.grad_accum * cfg.data.seq_len,
            "kl_init": init["kl"], "kl_final": final["kl"],
            "agreement_init": init["agreement"], "agreement_final": final["agreement"],
            "student_ppl_init": math.exp(init["student_nll"]), "student_ppl_final": math.exp(final["student_nll"]),
            "teacher_ppl": math.exp(final["teacher_nll"]),
            "eval_tokens": final["tokens"],
            "export_dir": os.path.join(os.path.abspath(out_dir), "export"),
            "seconds": round(time.perf_counter() - t_start, 1),
            **verified,
            "history": job.history,
            "config": raw,
        }
        with open(os.path.join(tmp, "summary.json"), "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2)
    print(f"\n{'':<16}{'init':>12}{'final':>12}")
    print(f"{'KL (nats/tok)':<16}{init['kl']:>12.4e}{final['kl']:>12.4e}")
    print(f"{'agreement':<16}{init['agreement']:>12.2%}{final['agreement']:>12.2%}")
    print(f"{'student ppl':<16}{summary['student_ppl_init']:>12.3f}{summary['student_ppl_final']:>12.3f}")
    print(f"{'teacher ppl':<16}{summary['teacher_ppl']:>12.3f}{summary['teacher_ppl']:>12.3f}")
    print(f"\nopm={cfg.opm} trainable={summary['trainable']} steps={cfg.train.steps} tokens={summary['tokens']:,} "
          f"verified={summary['verified']} time={summary['seconds']:.0f}s\nrun directory: {out_dir}")
    if cfg.verify and not summary["verified"]:
        raise KeptError(f"the exported model did not verify through Transformers ({summary.get('why', 'see above')}); "
                        f"the run directory {out_dir} keeps it for inspection")
    return 0


if __name__ == "__main__":
    sys.exit(main())
