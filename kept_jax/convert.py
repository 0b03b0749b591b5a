"""`python -m kept_jax.convert`: a trained model into another architecture, training-free, with a report.

    python -m kept_jax.convert --source ORION_DIR --out DIR [--opm STRATEGY] [--calib FILE] [--calib-tokens N]
    python -m kept_jax.convert --to llamba --source LLAMA_DIR --out DIR [--mixer-init mohawk|attention]
                               [--target-config LLAMBA_CONFIG_JSON]
    python -m kept_jax.convert --to hybrid --source LLAMA_DIR --out DIR [--attention-layers every:4|auto:8|0,8,16|...]
                               [--mixer-init mamba2|attention] [--mamba-groups G] [--target-config HYBRID_CONFIG_JSON]
    python -m kept_jax.convert ... --calib-ids IDS.npy --eval-ids IDS.npy   # a source without a tokenizer
    python -m kept_jax.convert --to mlx --source LLAMBA_DIR --out DIR [--bits 4|8|16] [--group-size 64]
    python -m kept_jax.convert ... --dry-run        # plan from config.json alone: mapping coverage, parameter counts

`--to llama` (default): Orion -> Llama by NPM + OPM, calibrated on the teacher's own activations. `--to llamba`:
Llama -> Llamba, the MLPs, norms, embedding and head copied and each attention replaced by an initialized mixer.
`--to hybrid`: Llama -> a Mamba-2/attention hybrid in Transformers' GraniteMoeHybrid layout, the layers of
`--attention-layers` kept as attention and the others' attention replaced by an initialized Mamba-2 mixer (`auto:N`
keeps the N layers whose replacement alone costs the most held-out KL, measured on the calibration text).
Either way the mapping is a checked rule table; the command evaluates KL(teacher || converted) per token on held-out
text and exports a Hugging Face directory with `conversion_report.json` and `conversion_report.md`. `--opm all` and
`--mixer-init all` evaluate every choice and write only the report. `--to mlx`: a Llamba for Cartesia's on-device
runtime (cartesia-mlx), its linear layers quantized to 4 or 8 bits (bridge/mlx_export.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from typing import Any, Callable

import numpy as np

from kept_jax.errors import ArgumentParser, KeptError, cli_entry
from kept_jax.memory import parse_size

DEFAULT_SOURCE = os.path.join(os.path.dirname(__file__), "assets", "tiny-orion")


@dataclasses.dataclass
class ConversionResult:
    strategy: str
    config: Any  # target ModelConfig (runtime dtype set)
    mapping: Any  # kept_jax.mapping.Mapping
    tensors: dict[str, np.ndarray] | None  # HF-named, in the export dtype; None: computed while exporting
    errors: dict[str, float | None]  # per target, filled as the tensors are computed
    metrics: dict[str, float]  # empty without an evaluation

    @property
    def mapping_rows(self) -> list[dict]:
        return self.mapping.table(self.errors)

    def tensor_getter(self, source_dir: str, dtype: str) -> Callable[[str], np.ndarray]:
        """`get(hf_name)` for the writer: the kept tensors, or each rule run as the writer asks for its target (in
        HF order), so that one tensor at a time exists."""
        if self.tensors is not None:
            return self.tensors.__getitem__
        from kept_jax.config import NUMPY_DTYPES

        produced = self.mapping.materialize(source_tensor_reader(source_dir), NUMPY_DTYPES[dtype])

        def get(name: str) -> np.ndarray:
            target, value, self.errors[target] = next(produced)
            if target != name:
                raise AssertionError(f"the writer asked for {name}, the mapping produced {target}")
            return value
        return get


def source_tensor_reader(source: str) -> Callable[[str], np.ndarray]:
    """HF tensors straight from the source checkpoint (a directory or a GGUF file), in their stored dtype (a GGUF
    file's dequantized to float32; the rules compute in float64)."""
    from bridge.checkpoint import open_checkpoint

    reader = open_checkpoint(source).reader()

    def read(name: str) -> np.ndarray:
        value = reader.read(name)  # a copy: closing the file unmaps what was read, so RSS stays one tensor
        if reader.format == "safetensors":
            reader.release()
        return value
    return read


def run_mapping(mapping, read: Callable[[str], np.ndarray], dtype: str) -> tuple[dict[str, np.ndarray], dict]:
    """Every rule's tensor in `dtype`, kept in memory (for an evaluation), and the per-target errors."""
    from kept_jax.config import NUMPY_DTYPES

    tensors, errors = {}, {}
    for name, value, error in mapping.materialize(read, NUMPY_DTYPES[dtype]):
        tensors[name], errors[name] = value, error
    return tensors, errors


def id_file_rows(path: str, flag: str, vocab_size: int, seq_len: int) -> np.ndarray:
    """A `.npy` array of token ids (any shape: read as one stream, documents already joined by EOS) cut into
    [rows, seq_len] int32: what calibration and evaluation read when the source has no tokenizer."""
    try:
        ids = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise KeptError(f"{flag} {path!r} does not exist") from None
    except (ValueError, OSError, EOFError) as e:
        raise KeptError(f"{flag} {path!r} is not a .npy array of token ids ({e}); write one with numpy.save") from None
    if not isinstance(ids, np.ndarray) or ids.dtype.kind not in "iu":
        raise KeptError(f"{flag} {path!r} holds {getattr(ids, 'dtype', type(ids).__name__)}, not integer token ids")
    ids = ids.reshape(-1)
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        raise KeptError(f"{flag} {path!r} has token ids from {ids.min()} to {ids.max()}, outside the source's "
                        f"vocabulary 0..{vocab_size - 1}; were they made with another tokenizer?")
    rows = ids.size // seq_len
    return ids[: rows * seq_len].astype(np.int32).reshape(rows, seq_len)


def held_rows(path: str, ids: bool, tokenizer, source_config, seq_len: int, skip_rows: int,
              max_tokens: int, flag: str) -> np.ndarray:
    """Rows of `seq_len` from a text file (tokenized by the source's tokenizer) or, with `ids`, a token-id file;
    after `skip_rows`, at most `max_tokens` (rounded up to a row)."""
    from kept_jax import corpus

    rows = (id_file_rows(path, flag, source_config.vocab_size, seq_len) if ids
            else corpus.token_rows(path, tokenizer.encode, seq_len, source_config.eos_token_id))
    rows = rows[skip_rows:][: max(1, -(-max_tokens // seq_len))]
    if len(rows) == 0:
        raise KeptError(f"{path} has too little text: nothing is left after the calibration rows; give more text")
    return rows


# target -> the source architectures it is made from
TARGETS = {"llama": ("orion", "llama"), "llamba": ("llama",), "hybrid": ("llama",), "mlx": ("llamba",)}
OPM_ONLY = ("opm", "ridge")  # options of the Orion -> Llama conversion alone
CALIBRATION = ("calib", "calib_ids", "calib_tokens")  # OPM's statistics, or the layers hybrid's auto:N measures
# The options that belong to some targets only (the rest, --source --out --dry-run --force, apply to all).
HF_TARGETS = ("llama", "llamba", "hybrid")  # the conversions that write a Hugging Face directory and evaluate it
STUDENTS = ("llamba", "hybrid")  # the conversions that initialize new mixers
TARGET_NAMES = {"llama": "Llama", "llamba": "Llamba", "hybrid": "GraniteMoeHybrid"}
TARGET_OPTIONS = {
    **{name: ("llama",) for name in OPM_ONLY},
    **{name: ("llama", "hybrid") for name in CALIBRATION},
    **{name: STUDENTS for name in ("mixer_init", "target_config", "seed")},
    **{name: ("hybrid",) for name in ("attention_layers", "mamba_groups")},
    **{name: HF_TARGETS for name in ("eval_file", "eval_ids", "eval_tokens", "seq_len", "batch", "dtype",
                                     "max_shard_size", "no_eval")},
    **{name: ("mlx",) for name in ("bits", "group_size", "quantize_head", "mlx_tokenizer")},
}


def parse_args(argv):
    from bridge.mlx_export import BITS
    from kept_jax.mapping import STRATEGIES
    from kept_jax.mapping.hybrid_init import SPEC_FORMS
    from kept_jax.mapping.students import MIXER_INITS, check_mixer_init
    from kept_jax.quantize import DEFAULT_GROUP_SIZE, GROUP_SIZES

    p = ArgumentParser(prog="python -m kept_jax.convert", description=__doc__.split("\n\n")[0])
    p.add_argument("--to", default="llama", choices=tuple(TARGETS),
                   help="target architecture: llama (from an Orion source, or a Llama GGUF file or directory, which is "
                   "copied), llamba or hybrid (from a Llama source) or mlx (a Llamba for Cartesia's on-device runtime)")
    p.add_argument("--source", default=DEFAULT_SOURCE,
                   help="source: a Hugging Face directory or a GGUF file (default: the embedded tiny Orion); with "
                   "--dry-run also a config.json")
    p.add_argument("--out", help="output directory (must not exist or be empty, unless --force)")
    p.add_argument("--dry-run", action="store_true", help="plan from config.json alone: nothing is read or written")
    p.add_argument("--opm", choices=(*STRATEGIES, "all"), help="--to llama: OPM strategy (default absorb), or all")
    p.add_argument("--mixer-init", choices=(*dict.fromkeys(i for inits in MIXER_INITS.values() for i in inits), "all"),
                   help="--to llamba: how each mixer starts, mohawk (default) or attention; --to hybrid: mamba2 "
                   "(default) or attention; or all to compare")
    p.add_argument("--attention-layers", help=f"--to hybrid: the layers that keep attention, {SPEC_FORMS} (default "
                   "every:4)")
    p.add_argument("--mamba-groups", type=int, help="--to hybrid: B/C groups of the Mamba-2 mixers (default 1, which "
                   "every client reads alike; MLX-LM normalizes the gated norm over the whole width)")
    p.add_argument("--target-config", help="--to llamba or hybrid: the student's config.json (e.g. "
                   "configs/models/llamba-1b.json); default: derived from the teacher")
    p.add_argument("--seed", type=int, help="--to llamba or hybrid: seed of the mixers' randomly initialized rows")
    p.add_argument("--calib", help="--to llama, and hybrid's auto:N: calibration text, .jsonl ('text' field) or plain "
                   "text (default: embedded held-out)")
    p.add_argument("--calib-ids", help="--to llama, and hybrid's auto:N: calibration token ids instead of text, a .npy "
                   "array (for a source without a tokenizer)")
    p.add_argument("--calib-tokens", type=int)
    p.add_argument("--eval", dest="eval_file", help="held-out text for KL (default: embedded held-out split)")
    p.add_argument("--eval-ids", help="held-out token ids instead of text, a .npy array (for a source without a "
                   "tokenizer)")
    p.add_argument("--eval-tokens", type=int, help="held-out tokens to evaluate (default 32768)")
    p.add_argument("--seq-len", type=int, help="tokens per evaluation or calibration row (default 256)")
    p.add_argument("--batch", type=int, help="rows per evaluation or calibration batch (default 8)")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), help="export and evaluation dtype (default: source's)")
    p.add_argument("--ridge", type=float, help="--to llama: relative ridge of the rank-1 absorb solve (default 1e-6)")
    p.add_argument("--max-shard-size", help="largest safetensors file (default: 5GB; a Llamba is one file, the only "
                   "layout the official Llamba loader reads)")
    p.add_argument("--no-eval", action="store_true", help="skip the KL evaluation: the conversion then streams, "
                   "one layer and one tensor at a time, so peak memory stays a fraction of the checkpoint")
    p.add_argument("--bits", type=int, choices=BITS,
                   help="--to mlx: 4 or 8 (linear layers quantized by MLX, group-wise affine) or 16 (bfloat16); "
                   "default 4")
    p.add_argument("--group-size", type=int, choices=GROUP_SIZES,
                   help=f"--to mlx: inputs per quantization group (default {DEFAULT_GROUP_SIZE})")
    p.add_argument("--quantize-head", action="store_true", default=None,
                   help="--to mlx: quantize the output head too (default: kept in bfloat16, as generate --quantize "
                   "keeps it)")
    p.add_argument("--mlx-tokenizer",
                   help="--to mlx: the tokenizer cartesia-mlx loads, a Hub id or a path (default: the output "
                   "directory's absolute path, where the source's tokenizer files are copied)")
    p.add_argument("--force", action="store_true", help="replace a non-empty output directory")
    args = p.parse_args(argv)
    if args.out is None and not args.dry_run:
        p.error("the following arguments are required: --out")
    wrong = [name for name, targets in TARGET_OPTIONS.items()
             if args.to not in targets and getattr(args, name) not in (None, False)]
    if wrong:
        flags = ", ".join(f"--{name.replace('_', '-')}" for name in wrong)
        owners = " and ".join(f"--to {t}" for t in TARGET_OPTIONS[wrong[0]])
        raise KeptError(f"{flags} {'does' if len(wrong) == 1 else 'do'} not apply to --to {args.to}; "
                        f"{'they are' if len(wrong) > 1 else 'it is'} for {owners}")
    defaults = {"seed": 0, "eval_tokens": 32768, "seq_len": 256, "batch": 8, "bits": 4,
                "group_size": DEFAULT_GROUP_SIZE, "quantize_head": False}
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.opm_flags = [f"--{name.replace('_', '-')}" for name in OPM_ONLY + CALIBRATION
                      if getattr(args, name) is not None]
    for text, ids in (("calib", "calib_ids"), ("eval_file", "eval_ids")):
        if getattr(args, text) and getattr(args, ids):
            raise KeptError(f"--{text.removesuffix('_file')} (text) and --{ids.replace('_', '-')} (token ids) both "
                            "give the same data; pass one")
    args.opm = args.opm or "absorb"
    if args.to in STUDENTS:
        args.mixer_init = args.mixer_init or MIXER_INITS[args.to][0]
        if args.mixer_init != "all":
            check_mixer_init(args.to, args.mixer_init, "--mixer-init")
    args.attention_layers = args.attention_layers or "every:4"
    args.mamba_groups = 1 if args.mamba_groups is None else args.mamba_groups
    if args.mamba_groups < 1:
        raise KeptError(f"--mamba-groups must be positive, got {args.mamba_groups}")
    if args.no_eval and "all" in (args.opm, args.mixer_init):
        raise KeptError("--no-eval leaves nothing to compare with --opm all or --mixer-init all; pick one choice, "
                        "or drop --no-eval")
    args.calib_tokens = 16384 if args.calib_tokens is None else args.calib_tokens
    for name in ("calib_tokens", "eval_tokens", "seq_len", "batch"):
        if getattr(args, name) <= 0:
            raise KeptError(f"--{name.replace('_', '-')} must be positive")
    return args


def student_mappings(args, teacher_config, attention_layers: tuple[int, ...] = ()) -> list:
    """Llama -> Llamba or hybrid (attention in `attention_layers`): one mapping per requested mixer init."""
    from kept_jax.mapping.students import MIXER_INITS, student_config, student_mapping

    layout = _target_layout(args)
    inits = MIXER_INITS[args.to] if args.mixer_init == "all" else [args.mixer_init]
    return [student_mapping(teacher_config, student_config(args.to, teacher_config, init, layout, attention_layers,
                                                           args.mamba_groups), init, args.seed)
            for init in inits]


def attention_layers(args, teacher_config, calib_rows: np.ndarray | None = None) -> tuple[int, ...]:
    """--attention-layers resolved: a list, or for auto:N the N layers that `layer_choice` measures as the costliest
    to replace (on `calib_rows`, the teacher and every Mamba-2 init loaded in memory)."""
    from kept_jax.mapping.hybrid_init import parse_attention_layers

    layers = parse_attention_layers(args.attention_layers, teacher_config.num_hidden_layers)
    if not isinstance(layers, int):
        return layers
    from bridge.checkpoint import load_checkpoint
    from bridge.hf_import import ArrayReader, params_from_reader
    from kept_jax.mapping.layer_choice import leave_one_out_kl, most_costly
    from kept_jax.mapping.students import MIXER_INITS
    from kept_jax.metrics import batches_of
    from kept_jax.runlog import phase

    init = args.mixer_init if args.mixer_init != "all" else MIXER_INITS["hybrid"][0]
    with phase("choose attention layers", f"each of the {teacher_config.num_hidden_layers} layers replaced alone, "
               f"on {calib_rows.size:,} tokens"):
        mapping = student_mappings(argparse.Namespace(**{**vars(args), "mixer_init": init}), teacher_config, ())[0]
        tensors, _ = run_mapping(mapping, source_tensor_reader(args.source), teacher_config.param_dtype)
        mamba_config = mapping.target_config.replace(compute_dtype=teacher_config.compute_dtype,
                                                     param_dtype=teacher_config.param_dtype)
        mamba_params, _, _ = params_from_reader(ArrayReader(tensors), mamba_config)
        del tensors
        config, params, _ = load_checkpoint(args.source, compute_dtype=teacher_config.compute_dtype,
                                            param_dtype=teacher_config.param_dtype)
        costs = leave_one_out_kl(config, params, mamba_config, mamba_params, batches_of(calib_rows, args.batch))
    chosen = most_costly(costs, layers)
    args.layer_costs = [float(c) for c in costs]
    print(f"attention kept in layers {', '.join(map(str, chosen))} (auto:{layers}); KL when each layer alone is "
          f"replaced: {', '.join(f'{i}: {c:.3g}' for i, c in enumerate(costs))}", file=sys.stderr, flush=True)
    return chosen


def opm_strategies(args) -> list[str]:
    from kept_jax.mapping import STRATEGIES

    return list(STRATEGIES) if args.opm == "all" else [args.opm]


def opm_mappings(args, teacher_config, stats: dict) -> list:
    """Orion -> Llama: one NPM + OPM mapping per requested strategy (`stats={}` for a plan: rules read them lazily)."""
    from kept_jax.mapping import build_mapping

    return [build_mapping(strategy, teacher_config, stats, ridge=ridge(args)) for strategy in opm_strategies(args)]


def export_dtype(args, source_config) -> str:
    """--dtype, or the source's own when it is bf16 or fp32, else bf16."""
    return args.dtype or (source_config.dtype if source_config.dtype in ("bfloat16", "float32") else "bfloat16")


def ridge(args) -> float:
    from kept_jax.mapping.opm import DEFAULT_RIDGE

    return DEFAULT_RIDGE if args.ridge is None else args.ridge


def _target_layout(args):
    """--target-config read into the target's config class (a LlambaConfig or a HybridConfig), or None."""
    if args.target_config is None:
        return None
    from kept_jax.config import read_config_json
    from kept_jax.models import HybridConfig, LlambaConfig

    example = {"llamba": "a Llamba config.json such as configs/models/llamba-1b.json",
               "hybrid": "a GraniteMoeHybrid config.json such as configs/models/tiny-hybrid.json"}[args.to]
    if not os.path.isfile(args.target_config):
        raise KeptError(f"--target-config {args.target_config!r} is not a file; give {example}")
    return {"llamba": LlambaConfig, "hybrid": HybridConfig}[args.to].from_hf_dict(read_config_json(args.target_config))


def check_source(args, source_config) -> None:
    wanted = TARGETS[args.to]
    if source_config.architecture not in wanted:
        hint = {"llama": "; to make a Llamba or hybrid student from a Llama, pass --to llamba or --to hybrid",
                "mlx": "; make a Llamba first (--to llamba, then python -m kept_jax.train)"}.get(args.to, "")
        articles = {"orion": "an Orion", "llama": "a Llama", "llamba": "a Llamba"}
        names = " or ".join(articles[a] for a in wanted)
        raise KeptError(f"--to {args.to} converts {' and '.join(a.capitalize() for a in wanted)} checkpoints, so "
                        f"--source must be {names} checkpoint; {args.source!r} is {source_config.architecture!r}{hint}")
    if conversion_kind(args, source_config) == "copy" and args.opm_flags:
        raise KeptError(f"{', '.join(args.opm_flags)} {'applies' if len(args.opm_flags) == 1 else 'apply'} to an Orion "
                        f"source; {args.source!r} is already a Llama, which --to llama writes as a Hugging Face Llama "
                        "directory unchanged")
    if args.to == "hybrid" and args.opm_flags and not args.attention_layers.startswith("auto:"):
        raise KeptError(f"{', '.join(args.opm_flags)}: --to hybrid reads calibration text only to choose the "
                        "attention layers (--attention-layers auto:N)")


def conversion_kind(args, source_config) -> str:
    """opm (Orion -> Llama), copy (a Llama, e.g. a GGUF file, written as an HF Llama directory), llamba or hybrid."""
    if args.to in STUDENTS:
        return args.to
    return "opm" if source_config.architecture == "orion" else "copy"


def conversion_mappings(args, teacher_config, stats: dict, layers: tuple[int, ...] | None = None) -> list:
    """The mappings the command builds for its kind of conversion (`stats={}` for a plan; `layers`: a hybrid's
    attention layers, resolved)."""
    from kept_jax.mapping import copy_mapping

    kind = conversion_kind(args, teacher_config)
    if kind in STUDENTS:
        return student_mappings(args, teacher_config, layers)
    return opm_mappings(args, teacher_config, stats) if kind == "opm" else [copy_mapping(teacher_config)]


def convert_all(args, source_config) -> tuple[Any, list[ConversionResult], dict]:
    """Calibrates once (OPM: the teacher streamed from its files, layer by layer), builds each requested mapping
    and, unless --no-eval, converts and evaluates each (both models in memory); without the evaluation the
    tensors are computed only as the export writes them. `source_config`: the source's config, as `main` read it."""
    from bridge.checkpoint import load_checkpoint_tokenizer, open_checkpoint
    from bridge.hf_import import ArrayReader, params_from_reader, streamed_layers
    from kept_jax import corpus
    from kept_jax.metrics import batches_of
    from kept_jax.runlog import counted, phase

    check_source(args, source_config)
    kind = conversion_kind(args, source_config)
    dtype = export_dtype(args, source_config)
    teacher_config = source_config.replace(compute_dtype=dtype, param_dtype=dtype)
    info = {"source": os.path.abspath(args.source), "to": args.to, "dtype": dtype, "timings_s": {}}
    if kind == "copy":  # every weight written as read, and both models run in one dtype: KL 0 by construction
        args.no_eval = True
        info["not_evaluated"] = "a copy: the teacher's own weights, KL 0 by construction"
    chooses_layers = kind == "hybrid" and args.attention_layers.startswith("auto:")
    calibrates = kind == "opm" or chooses_layers
    reads_text = (calibrates and not args.calib_ids) or (not args.no_eval and not args.eval_ids)
    tokenizer = load_checkpoint_tokenizer(args.source, source_config.architecture, (
        "calibration and evaluation read text. Give token ids instead, .npy arrays: --calib-ids FILE (--to llama) and "
        "--eval-ids FILE, or --no-eval; the export then has no tokenizer files")) if reads_text else None

    eval_file = args.eval_ids or args.eval_file or corpus.HELDOUT
    calib_rows, skip = None, 0
    if calibrates:
        calib_file = args.calib_ids or args.calib or corpus.HELDOUT
        calib_rows = held_rows(calib_file, bool(args.calib_ids), tokenizer, source_config, args.seq_len, 0,
                               args.calib_tokens, "--calib-ids")
        skip = len(calib_rows) if os.path.abspath(calib_file) == os.path.abspath(eval_file) else 0
        info["calibration"] = {"file": calib_file, "tokens": int(calib_rows.size)}
    eval_rows = None
    if not args.no_eval:
        eval_rows = held_rows(eval_file, bool(args.eval_ids), tokenizer, source_config, args.seq_len, skip,
                              args.eval_tokens, "--eval-ids")

    reader = open_checkpoint(args.source).reader()
    _, info["import_skipped"], _ = params_from_reader(reader, teacher_config, lambda spec: False)  # names checked
    final_shift = None
    if kind == "hybrid":
        layers = attention_layers(args, teacher_config, calib_rows)
        info["attention_layers"] = list(layers)
        if chooses_layers:
            info["layer_choice"] = {"spec": args.attention_layers, "kl_when_replaced_alone": args.layer_costs}
        mappings = conversion_mappings(args, teacher_config, {}, layers)
    elif kind != "opm":
        mappings = conversion_mappings(args, teacher_config, {})
    else:
        from kept_jax.mapping import calibrate, outer_sites
        from kept_jax.mapping.opm import solved

        sites = sorted({s for strategy in opm_strategies(args) for s in outer_sites(strategy, teacher_config)})
        embedding, _, _ = params_from_reader(reader, teacher_config.replace(scan_layers=False),
                                             lambda spec: spec.hf_name == teacher_config.hf_embedding_name)
        with phase("calibrate", f"the teacher's {teacher_config.num_hidden_layers} layers one at a time on "
                   f"{calib_rows.size:,} tokens", info["timings_s"]):
            stats = calibrate(teacher_config.replace(scan_layers=False), embedding,
                              counted(streamed_layers(reader, teacher_config), teacher_config.num_hidden_layers,
                                      "calibrate", "layer"), batches_of(calib_rows, args.batch),
                              outer_sites=sites, finish=lambda st: solved(st, ridge(args)))
        del embedding
        mappings = opm_mappings(args, teacher_config, stats)
        if not source_config.tie_word_embeddings and not args.no_eval:
            read = source_tensor_reader(args.source)
            final_shift = read("lm_head.weight").astype(np.float64) @ read("model.norm.bias").astype(np.float64)
    if args.no_eval:
        mapping = mappings[0]
        config = mapping.target_config.replace(compute_dtype=dtype, param_dtype=dtype)
        info.update(evaluation=None, predicted_final_beta_kl=None)
        return teacher_config, [ConversionResult(strategy_name(mapping), config, mapping, None, {}, {})], info

    from bridge.checkpoint import load_checkpoint
    from kept_jax.metrics import compare
    from kept_jax.models import build_model

    teacher_config, teacher_params, _ = load_checkpoint(args.source, compute_dtype=dtype, param_dtype=dtype)
    teacher = build_model(teacher_config)
    results = []
    for mapping in mappings:
        name = strategy_name(mapping)
        with phase(f"convert and evaluate {name}", f"{eval_rows.size:,} held-out tokens", info["timings_s"]):
            tensors, errors = run_mapping(mapping, source_tensor_reader(args.source), dtype)
            config = mapping.target_config.replace(compute_dtype=dtype, param_dtype=dtype)
            student_params, _, _ = params_from_reader(ArrayReader(tensors), config)
            metrics = compare(teacher, teacher_params, build_model(config), student_params,
                              batches_of(eval_rows, args.batch), logit_shift=final_shift)
        results.append(ConversionResult(name, config, mapping, None if len(mappings) > 1 else tensors, errors,
                                        metrics))
        print(f"converted with {name!r}: KL {metrics['kl']:.3e} nats/token, agreement {metrics['agreement']:.2%}",
              file=sys.stderr, flush=True)
        del tensors, student_params  # comparing every choice keeps only the numbers

    info.update({
        "evaluation": {"file": eval_file, "tokens": int(eval_rows.size), "skipped_calibration_rows": skip},
        "predicted_final_beta_kl": results[0].metrics.get("predicted_shift_kl"),
    })
    return teacher_config, results, info


def strategy_name(mapping) -> str:
    """The choice a mapping stands for in the report: an OPM strategy or a mixer init."""
    return mapping.strategy.split("/", 1)[-1]


def summary_table(results: list[ConversionResult], info: dict) -> str:
    lines = [
        f"{'method':<11} {'KL(t||c) nats/tok':>18} {'top-1 agree':>12} {'teacher ppl':>12} {'converted ppl':>14}",
    ]
    for r in results:
        m = r.metrics
        if not m:
            lines.append(f"{r.strategy:<11} not evaluated ({info.get('not_evaluated', '--no-eval')})")
            continue
        lines.append(f"{r.strategy:<11} {m['kl']:>18.3e} {m['agreement']:>12.2%} {m['teacher_ppl']:>12.3f} "
                     f"{m['student_ppl']:>14.3f}")
    evaluated = [r for r in results if r.metrics]
    if evaluated:
        buckets = list(evaluated[0].metrics["by_position"])
        lines.append(f"{'KL by position':<11} " + " ".join(f"{b:>10}" for b in buckets))
        lines += [f"{r.strategy:<11} " + " ".join(f"{r.metrics['by_position'][b]['kl']:>10.3e}" for b in buckets)
                  for r in evaluated]
    if info["predicted_final_beta_kl"] is not None:
        lines.append(f"predicted cost of dropping the final norm's beta (1/2 E[Var_p(W_head beta)]): "
                     f"{info['predicted_final_beta_kl']:.3e} nats/token")
    calibration = f"{info['calibration']['tokens']:,} calibration tokens; " if "calibration" in info else ""
    evaluation = (f"{info['evaluation']['tokens']:,} held-out tokens, {evaluated[0].metrics['tokens']:,} positions "
                  "scored (each with a next token in its row; kept_jax.metrics); " if evaluated else "")
    lines.append(f"{evaluation}{calibration}{info['dtype']}")
    return "\n".join(lines)


def write_report(out_dir: str, results: list[ConversionResult], info: dict) -> str:
    from kept_jax.mapping import format_table

    report = dict(info, strategies={r.strategy: dict(r.metrics, mapping=r.mapping_rows) for r in results})
    with open(os.path.join(out_dir, "conversion_report.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
    text = summary_table(results, info)
    with open(os.path.join(out_dir, "conversion_report.md"), "w", encoding="utf-8") as f:
        f.write("# Conversion report\n\n```\n" + text + "\n```\n")
        if info.get("tokenizer_note"):
            f.write(f"\nNote: {info['tokenizer_note']}.\n")
        for r in results:
            f.write(f"\n## Mapping: {r.strategy}\n\n```\n{format_table(r.mapping_rows)}\n```\n")
    return text


def export_model(out_dir: str, source: str, config, get: Callable[[str], np.ndarray], dtype: str,
                 max_shard_bytes: int | None = None) -> str | None:
    """The HF directory: config, weights (`get(hf_name)` in `dtype`, one at a time, in files of at most
    `max_shard_bytes`, by default the architecture's layout), generation config and the
    tokenizer: an Orion source's SentencePiece model converted (and its ids checked), a Llama source's tokenizer
    files as they are (a Llama GGUF file's as its vocabulary describes them; a Llamba made from a Llama). Returns a
    note when the source has no tokenizer to export."""
    import shutil

    from transformers import GenerationConfig

    from bridge.checkpoint import open_checkpoint
    from bridge.hf_export import shard_limit, write_config, write_weights
    from bridge.tokenizer_export import check_tokenizer, copy_tokenizer, export_tokenizer
    from kept_jax.runlog import progress

    write_config(out_dir, config.replace(dtype=dtype))
    table = config.tensor_table()
    with progress(len(table), "export", "tensor") as bar:
        def get_counted(name: str) -> np.ndarray:
            tensor = get(name)
            bar.update(1)
            return tensor

        write_weights(out_dir, [(s.hf_name, s.hf_shape) for s in table], dtype, get_counted,
                      shard_limit(config, max_shard_bytes))
    checkpoint = open_checkpoint(source)
    files = checkpoint.files_dir
    if os.path.isfile(os.path.join(files, "generation_config.json")):  # the source's end tokens and sampling defaults
        shutil.copy(os.path.join(files, "generation_config.json"), out_dir)
    else:
        GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                         pad_token_id=config.pad_token_id).save_pretrained(out_dir)
    if not checkpoint.has_tokenizer:
        return (f"no tokenizer: the source {source} has no tokenizer, so this export has none; copy the tokenizer "
                "files that belong to these weights into it before loading it with AutoTokenizer")
    if checkpoint.hf.get("model_type") == "orion":
        export_tokenizer(files, out_dir, "orion")
        check_tokenizer(files, out_dir)
    else:
        copy_tokenizer(files, out_dir)
    return None


def dry_run(args) -> int:
    """Plans the conversion from config.json alone: the mapping's coverage and every parameter count."""
    import jax

    from bridge.checkpoint import load_config
    from bridge.gguf_import import is_gguf
    from kept_jax.config import read_config_json
    from kept_jax.models import abstract_params, config_from_hf

    plain_config = os.path.isfile(args.source) and not is_gguf(args.source)
    layout = args.source if os.path.isfile(args.source) else os.path.join(args.source, "config.json")
    source = (config_from_hf(read_config_json(args.source)) if plain_config else load_config(args.source))
    check_source(args, source)
    if args.to == "mlx":
        from bridge.mlx_export import check_expressible, check_group_size, planned_bytes, tensor_plan

        check_expressible(source)
        check_group_size(source, args.bits, args.group_size)
        size = planned_bytes(source, args.bits, args.group_size, args.quantize_head)
        print(f"dry run: abstract shapes only, no weights read\nsource   {layout}: {source.describe()}\n"
              f"target   cartesia-mlx Llamba, {len(tensor_plan(source, args.quantize_head))} tensors, "
              f"{size / 2 ** 20:.1f} MiB at {args.bits} bits")
        return 0
    layers = None
    if args.to == "hybrid":
        from kept_jax.mapping.hybrid_init import evenly_spaced, parse_attention_layers

        layers = parse_attention_layers(args.attention_layers, source.num_hidden_layers)
        if isinstance(layers, int):
            print(f"note: auto:{layers} chooses the layers by measurement, which needs the weights; this plan takes "
                  f"{layers} evenly spaced ones (the same shapes)")
            layers = evenly_spaced(layers, source.num_hidden_layers)
    mappings = conversion_mappings(args, source, {}, layers)

    def count(config) -> str:
        from_model = sum(math.prod(x.shape) for x in jax.tree.leaves(abstract_params(config)))
        if from_model != config.num_params():
            raise AssertionError(f"{config.architecture}: formula {config.num_params():,} != model {from_model:,}")
        return f"{config.num_params():,} parameters"

    print(f"dry run: abstract shapes only, no weights read\nsource   {layout}: {source.describe()}; {count(source)}")
    for mapping in mappings:
        mapping.check()
        target = mapping.target_config
        by_transform: dict[str, list[int]] = {}
        sizes = {s.hf_name: math.prod(s.hf_shape) for s in target.tensor_table()}
        for rule in mapping.rules:
            entry = by_transform.setdefault(rule.transform, [0, 0])
            entry[0] += 1
            entry[1] += sizes[rule.target]
        print(f"\ntarget   {mapping.strategy}: {target.describe()}; {count(target)}\n"
              f"mapping  {len(mapping.rules)} target tensors, {len(mapping.dropped)} source tensors dropped on "
              "purpose; every tensor covered")
        for transform, (tensors, params) in by_transform.items():
            print(f"  {tensors:>5} x {transform:<70} {params:>16,}")
    return 0


def mlx_tokenizer(args) -> str:
    """The tokenizer name the runtime's config gives AutoTokenizer: --mlx-tokenizer, or the output directory, which
    receives the source's tokenizer files."""
    from bridge.checkpoint import open_checkpoint

    if args.mlx_tokenizer:
        return args.mlx_tokenizer
    if not open_checkpoint(args.source).has_tokenizer:
        raise KeptError(f"the source {args.source!r} has no tokenizer files, and cartesia-mlx loads one by name: pass "
                        "--mlx-tokenizer with the Hub id or directory of the tokenizer these weights were trained with")
    return os.path.abspath(args.out)


def to_mlx(args, source_config) -> int:
    """--to mlx: the Llamba re-laid out and quantized for cartesia-mlx, its tokenizer beside it."""
    from bridge.checkpoint import open_checkpoint
    from bridge.mlx_export import WEIGHTS_FILE, check_expressible, check_group_size, require_mlx, write_mlx
    from bridge.tokenizer_export import copy_tokenizer
    from kept_jax.fileio import atomic_output_dir, check_output_dir

    check_source(args, source_config)
    check_expressible(source_config)
    check_group_size(source_config, args.bits, args.group_size)
    require_mlx()  # before any output: MLX writes the file
    tokenizer = mlx_tokenizer(args)
    check_output_dir(args.out, args.force, needed_bytes=source_config.num_params() * 2)
    with atomic_output_dir(args.out, args.force) as tmp:
        size = write_mlx(tmp, source_config, source_tensor_reader(args.source), args.bits, args.group_size,
                         args.quantize_head, tokenizer)
        checkpoint = open_checkpoint(args.source)
        if checkpoint.has_tokenizer:
            copy_tokenizer(checkpoint.files_dir, tmp)
    precision = "bfloat16" if args.bits == 16 else (
        f"{args.bits}-bit, groups of {args.group_size}; head {'quantized' if args.quantize_head else 'bfloat16'}")
    print(f"wrote {args.out}: {WEIGHTS_FILE} for cartesia-mlx ({precision}), {size / 2 ** 20:.1f} MiB\n"
          f"load it with: cartesia_mlx.from_pretrained({os.path.join(args.out, WEIGHTS_FILE)!r}); tokenizer: "
          f"{tokenizer}")
    return 0


@cli_entry
def main(argv=None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        return dry_run(args)
    from bridge.checkpoint import load_config
    from kept_jax.config import NUMPY_DTYPES
    from kept_jax.fileio import atomic_output_dir, check_output_dir
    from kept_jax.runlog import phase

    source = load_config(args.source)
    if args.to == "mlx":
        return to_mlx(args, source)
    itemsize = np.dtype(NUMPY_DTYPES[export_dtype(args, source)]).itemsize
    check_output_dir(args.out, args.force, needed_bytes=source.num_params() * itemsize)
    max_shard_bytes = None if args.max_shard_size is None else parse_size(args.max_shard_size, "--max-shard-size")
    _, results, info = convert_all(args, source)
    export = (args.opm if conversion_kind(args, source) == "opm" else args.mixer_init) != "all"
    with atomic_output_dir(args.out, args.force) as tmp:
        if export:
            result = results[0]
            with phase("export", "streamed: each tensor computed as it is written" if result.tensors is None
                       else "", info["timings_s"]):
                info["tokenizer_note"] = export_model(tmp, args.source, result.config,
                                                      result.tensor_getter(args.source, info["dtype"]),
                                                      info["dtype"], max_shard_bytes)
        text = write_report(tmp, results, info)
    print(text)
    if export:
        from kept_jax.mapping import format_table

        rows = results[0].mapping_rows
        changed = [r for r in rows if r["transform"] != "identity"]
        copied = f"{len(rows) - len(changed)} tensors copied unchanged (identity; conversion_report.md lists all)"
        if changed:
            print("\nmapping (error: relative MSE on calibration data of what the rule approximates):")
            print(format_table(changed))
        if len(changed) < len(rows):
            print(("and " if changed else "\nmapping: ") + copied)
        print(f"\nwrote {args.out}: a Hugging Face {TARGET_NAMES[args.to]} checkpoint ({info['dtype']}) and "
              "conversion_report.{json,md}")
        if info["tokenizer_note"]:
            print(f"note: {info['tokenizer_note']}")
    else:
        print(f"\nwrote {args.out}/conversion_report.{{json,md}} (no model exported when comparing every choice)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
