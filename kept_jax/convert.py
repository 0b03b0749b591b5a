"""`python -m kept_jax.convert`: Orion -> Llama, training-free (NPM + OPM), with a report of the distance.

    python -m kept_jax.convert --source DIR --out DIR --opm STRATEGY [--calib FILE] [--calib-tokens N]
                               [--dtype bfloat16|float32]

Calibrates on the teacher's own activations, builds the mapping, evaluates KL(teacher || converted) per token on
held-out text, and exports a Hugging Face Llama directory with `conversion_report.json` and
`conversion_report.md`. `--opm all` evaluates every strategy and writes only the report.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
from typing import Any, Callable

import numpy as np

from kept_jax.errors import KeptError, cli_entry

DEFAULT_SOURCE = os.path.join(os.path.dirname(__file__), "assets", "tiny-orion")


@dataclasses.dataclass
class ConversionResult:
    strategy: str
    config: Any  # target ModelConfig (runtime dtype set)
    tensors: dict[str, np.ndarray]  # HF-named, in the export dtype
    errors: dict[str, float | None]
    metrics: dict[str, float]
    mapping_rows: list[dict]


def source_tensor_reader(model_dir: str) -> Callable[[str], np.ndarray]:
    """float64 HF tensors straight from the source checkpoint (exact, whatever the evaluation dtype)."""
    from bridge.hf_import import CheckpointReader

    reader = CheckpointReader(model_dir)
    return lambda name: reader.read(name).astype(np.float64)


def run_mapping(mapping, read: Callable[[str], np.ndarray], dtype: str) -> tuple[dict[str, np.ndarray], dict]:
    """Evaluates every rule (float64), casts to `dtype`; returns tensors and per-target errors."""
    from kept_jax.config import NUMPY_DTYPES

    tensors, errors = {}, {}
    for name, value, error in mapping.materialize(read):
        if not np.isfinite(value).all():
            raise KeptError(f"strategy {mapping.strategy!r} produced non-finite values in {name}; "
                            "the calibration statistics are degenerate (give more or different --calib text)")
        tensors[name] = value.astype(NUMPY_DTYPES[dtype])
        errors[name] = error
    return tensors, errors


def token_rows(path: str, tokenizer, eos_id: int | None, seq_len: int, skip_rows: int, max_tokens: int) -> np.ndarray:
    from kept_jax import corpus

    rows = corpus.token_rows(path, tokenizer.encode, seq_len, eos_id)[skip_rows:]
    rows = rows[: max(1, -(-max_tokens // seq_len))]
    if len(rows) == 0:
        raise KeptError(f"{path} has too little text: nothing is left after the calibration rows; give more text")
    return rows


def parse_size(text: str) -> int:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?\s*", text.upper())
    if not match:
        raise KeptError(f"--max-shard-size {text!r} is not a size such as 5GB or 500MB")
    return int(float(match.group(1)) * 1024 ** " KMGT".index(match.group(2) or " "))


def parse_args(argv):
    from kept_jax.mapping import STRATEGIES

    p = argparse.ArgumentParser(prog="python -m kept_jax.convert", description=__doc__.split("\n\n")[0])
    p.add_argument("--source", default=DEFAULT_SOURCE, help="HF Orion directory (default: the embedded tiny Orion)")
    p.add_argument("--out", required=True, help="output directory (must not exist or be empty, unless --force)")
    p.add_argument("--opm", default="absorb", choices=(*STRATEGIES, "all"), help="OPM strategy, or all to compare")
    p.add_argument("--calib", help="calibration text: .jsonl ('text' field) or plain text (default: embedded held-out)")
    p.add_argument("--calib-tokens", type=int, default=16384)
    p.add_argument("--eval", dest="eval_file", help="held-out text for KL (default: embedded held-out split)")
    p.add_argument("--eval-tokens", type=int, default=32768)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--dtype", choices=("bfloat16", "float32"), help="export and evaluation dtype (default: source's)")
    p.add_argument("--ridge", type=float, default=1e-6, help="relative ridge of the rank-1 absorb solve")
    p.add_argument("--max-shard-size", default="5GB")
    p.add_argument("--force", action="store_true", help="replace a non-empty output directory")
    args = p.parse_args(argv)
    for name in ("calib_tokens", "eval_tokens", "seq_len", "batch"):
        if getattr(args, name) <= 0:
            raise KeptError(f"--{name.replace('_', '-')} must be positive")
    return args


def convert_all(args) -> tuple[Any, list[ConversionResult], dict]:
    """Loads the teacher once, calibrates once, and converts + evaluates each requested strategy."""
    from bridge.hf_import import ArrayReader, load_hf_checkpoint, params_from_reader
    from kept_jax import corpus
    from kept_jax.config import load_hf_config
    from kept_jax.evaluate import batches_of, compare
    from kept_jax.mapping import STRATEGIES, build_mapping, calibrate, outer_sites, target_config
    from kept_jax.models import build_model
    from kept_jax.tokenizer import load_tokenizer

    source_config = load_hf_config(args.source)
    if source_config.architecture != "orion":
        raise KeptError(f"--source must be an Orion checkpoint; {args.source!r} is {source_config.architecture!r}")
    dtype = args.dtype or (source_config.dtype if source_config.dtype in ("bfloat16", "float32") else "bfloat16")
    strategies = list(STRATEGIES) if args.opm == "all" else [args.opm]
    tokenizer = load_tokenizer(args.source, "orion")

    calib_file = args.calib or corpus.HELDOUT
    eval_file = args.eval_file or corpus.HELDOUT
    calib_rows = token_rows(calib_file, tokenizer, source_config.eos_token_id, args.seq_len, 0, args.calib_tokens)
    skip = len(calib_rows) if os.path.abspath(calib_file) == os.path.abspath(eval_file) else 0
    eval_rows = token_rows(eval_file, tokenizer, source_config.eos_token_id, args.seq_len, skip, args.eval_tokens)

    teacher_config, teacher_params, report = load_hf_checkpoint(args.source, compute_dtype=dtype, param_dtype=dtype)
    teacher = build_model(teacher_config)
    sites = sorted({s for strategy in strategies for s in outer_sites(strategy, teacher_config)})
    stats = calibrate(teacher, teacher_params, batches_of(calib_rows, args.batch), outer_sites=sites)

    read = source_tensor_reader(args.source)
    final_shift = read("lm_head.weight") @ read("model.norm.bias") if not source_config.tie_word_embeddings else None
    results = []
    for strategy in strategies:
        mapping = build_mapping(strategy, teacher_config, stats, ridge=args.ridge)
        tensors, errors = run_mapping(mapping, read, dtype)
        config = target_config(teacher_config, strategy)
        student_params, _, _ = params_from_reader(ArrayReader(tensors), config)
        metrics = compare(teacher, teacher_params, build_model(config), student_params, batches_of(eval_rows, args.batch),
                          logit_shift=final_shift)
        results.append(ConversionResult(strategy, config, tensors, errors, metrics, mapping.table(errors)))
        print(f"converted with {strategy!r}: KL {metrics['kl']:.3e} nats/token, agreement {metrics['agreement']:.2%}",
              file=sys.stderr, flush=True)
        if args.opm == "all":
            tensors.clear()  # only the numbers are kept
        del student_params

    info = {
        "source": os.path.abspath(args.source),
        "dtype": dtype,
        "calibration": {"file": calib_file, "tokens": int(calib_rows.size)},
        "evaluation": {"file": eval_file, "tokens": int(eval_rows.size), "skipped_calibration_rows": skip},
        "import_skipped": report.skipped,
        "predicted_final_beta_kl": results[0].metrics.get("predicted_shift_kl"),
    }
    return teacher_config, results, info


def summary_table(results: list[ConversionResult], info: dict) -> str:
    lines = [
        f"{'strategy':<11} {'KL(t||c) nats/tok':>18} {'top-1 agree':>12} {'teacher ppl':>12} {'converted ppl':>14}",
    ]
    for r in results:
        m = r.metrics
        lines.append(f"{r.strategy:<11} {m['kl']:>18.3e} {m['agreement']:>12.2%} {m['teacher_ppl']:>12.3f} "
                     f"{m['student_ppl']:>14.3f}")
    if info["predicted_final_beta_kl"] is not None:
        lines.append(f"predicted cost of dropping the final norm's beta (1/2 E[Var_p(W_head beta)]): "
                     f"{info['predicted_final_beta_kl']:.3e} nats/token")
    lines.append(f"{info['evaluation']['tokens']:,} held-out tokens; {info['calibration']['tokens']:,} calibration "
                 f"tokens; {info['dtype']}")
    return "\n".join(lines)


def write_report(out_dir: str, results: list[ConversionResult], info: dict) -> str:
    from kept_jax.mapping import format_table

    report = dict(info, strategies={r.strategy: dict(r.metrics, mapping=r.mapping_rows) for r in results})
    with open(os.path.join(out_dir, "conversion_report.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
    text = summary_table(results, info)
    with open(os.path.join(out_dir, "conversion_report.md"), "w", encoding="utf-8") as f:
        f.write("# Conversion report\n\n```\n" + text + "\n```\n")
        for r in results:
            f.write(f"\n## Mapping: {r.strategy}\n\n```\n{format_table(r.mapping_rows)}\n```\n")
    return text


def export_llama(out_dir: str, source_dir: str, config, get: Callable[[str], np.ndarray], dtype: str,
                 max_shard_bytes: int) -> None:
    """The HF Llama directory: config, weights (`get(hf_name)` in `dtype`, one at a time), generation config and
    the source's tokenizer, whose ids are checked."""
    from transformers import GenerationConfig

    from bridge.hf_export import write_config, write_weights
    from bridge.tokenizer_export import export_tokenizer

    write_config(out_dir, config.replace(dtype=dtype))
    write_weights(out_dir, [(s.hf_name, s.hf_shape) for s in config.tensor_table()], dtype, get, max_shard_bytes)
    GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                     pad_token_id=config.pad_token_id).save_pretrained(out_dir)
    export_tokenizer(source_dir, out_dir, "orion")
    check_tokenizer(source_dir, out_dir)


def check_tokenizer(source_dir: str, out_dir: str) -> None:
    """The exported tokenizer.json gives the source tokenizer's ids on sample text, or the export fails."""
    from tokenizers import Tokenizer

    from kept_jax import corpus
    from kept_jax.tokenizer import load_tokenizer

    source = load_tokenizer(source_dir, "orion")
    exported = Tokenizer.from_file(os.path.join(out_dir, "tokenizer.json"))
    for text in corpus.read_documents(corpus.HELDOUT)[:3]:
        sample = text[:4000]
        if exported.encode(sample).ids != source.encode(sample):
            raise KeptError("the exported tokenizer.json does not reproduce the source tokenizer's ids; the source "
                            "tokenizer.model uses a normalization kept_jax cannot convert")


@cli_entry
def main(argv=None) -> int:
    args = parse_args(argv)
    from kept_jax.fileio import atomic_output_dir, check_output_dir

    check_output_dir(args.out, args.force)
    max_shard_bytes = parse_size(args.max_shard_size)
    _, results, info = convert_all(args)
    with atomic_output_dir(args.out, args.force) as tmp:
        if args.opm != "all":
            result = results[0]
            export_llama(tmp, args.source, result.config, result.tensors.__getitem__, info["dtype"], max_shard_bytes)
        text = write_report(tmp, results, info)
    print(text)
    if args.opm != "all":
        from kept_jax.mapping import format_table

        print("\nmapping (error: relative MSE on calibration data of what the rule approximates):")
        print(format_table(results[0].mapping_rows))
        print(f"\nwrote {args.out}: a Hugging Face Llama checkpoint ({info['dtype']}) and conversion_report.{{json,md}}")
    else:
        print(f"\nwrote {args.out}/conversion_report.{{json,md}} (no model exported with --opm all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
