"""Times kept_jax's jitted XKD step and, with `--vs torch`, the same step written in PyTorch, side by side.

    python -m benchmarks.xkd_step [--size 30m] [--seq-len 512] [--batch 4] [--trainable all] [--dtype float32]
                                  [--no-scan] [--vs torch] [--reps 5] [--compile-only]

One step is: the frozen Orion teacher's forward, the Llama student's forward and backward, the forward-KL loss on
all but the last position, global-norm clipping and an AdamW update, on a [batch, seq] batch of random tokens. The
weights are random, laid out as `opm=absorb` leaves them: the student shares the teacher's writers (embeddings,
o_proj, down_proj) and has its own readers (q/k/v, gate/up) and head.

Printed: tokens/s (median of `--reps` steps after compilation and a warm-up step), the step's FLOPs by the formula
in kept_jax/flops.py (useful work; remat's recomputation is not counted), the achieved FLOP/s, and the efficiency:
MFU against the device's dense peak on a GPU, and on a CPU against the FLOP/s of a large matmul measured in the same
process (`jnp.dot`, and `torch.matmul` for the PyTorch step), so that the figure means something on any machine.

`--vs torch` builds the same step the way a careful PyTorch user would: Transformers' `LlamaForCausalLM` student
with SDPA attention, the teacher as the same model with `torch.nn.LayerNorm` norms (Orion's modules) under
`torch.no_grad()`, `F.kl_div` on log-softmaxed logits, `clip_grad_norm_`, `torch.optim.AdamW` (foreach), bf16 by
autocast over fp32 master weights (kept_jax's bf16 is its precision policy: bf16 operands and fp32 accumulation in
every product, fp32 trainable weights, the frozen teacher in bf16). Before timing, the script checks that both compute
the same loss and gradient norm on the same weights and tokens in fp32. The two then alternate: each round runs each framework twice and times
its second step (the first step after a switch pays to re-fault memory the other framework's allocator returned, a
cost neither pays in a training loop). The last line printed is `ratio=<kept_jax tokens/s / torch tokens/s>`.

`--compile-only` compiles the kept_jax step on abstract shapes (no weights are allocated) and prints XLA's
`memory_analysis()`: on a GPU, whether the job fits one device.

Results go to benchmarks/results/xkd_step-<size>-<trainable>-<dtype>-seq<T>-b<B>-<device>-<date>.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import statistics
import sys
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from benchmarks.common import environment, median_seconds, write_result
from kept_jax.errors import KeptError, cli_entry
from kept_jax.flops import peak_flops, step_flops_per_token
from kept_jax.mapping import build_mapping, target_config
from kept_jax.memory import compiled_peak_bytes
from kept_jax.models import LlamaConfig, LlamaForCausalLM, build_model
from kept_jax.models.params import abstract_params, init_params
from kept_jax.xkd.losses import LossConfig
from kept_jax.xkd.objectives import LogitKL
from kept_jax.xkd.step import TrainState, abstract_state, init_state, make_optimizer, make_train_step
from kept_jax.xkd.trainable import StudentSplit, init_lora, split_by_paths

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _hf(**fields) -> dict:
    return {"model_type": "orion", "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
            "tie_word_embeddings": False, **fields}


def _read_json(*path) -> dict:
    with open(os.path.join(REPO, *path), encoding="utf-8") as f:
        return json.load(f)


# Orion-layout teachers by name, as HF config.json dicts. `30m` and `1b` count matmul parameters (every linear
# layer and the head); `1b` keeps Orion-14B's vocabulary, so the loss's share of the step is like the real job's.
SIZES = {
    "tiny": lambda: _read_json("kept_jax", "assets", "tiny-orion", "config.json"),
    "30m": lambda: _hf(vocab_size=8192, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                       num_attention_heads=8, num_key_value_heads=8, head_dim=64),
    "1b": lambda: _hf(vocab_size=84608, hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
                      num_attention_heads=16, num_key_value_heads=16, head_dim=128),
    "14b": lambda: _read_json("configs", "models", "orion-14b.json"),
}
TORCH_TRAINABLE = ("all", "norms")
LORA_RANK, LORA_ALPHA = 16, 32.0
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LR, WARMUP, STEPS, WEIGHT_DECAY, CLIP = 1e-4, 10, 1000, 0.0, 1.0


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m benchmarks.xkd_step", description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="30m", choices=sorted(SIZES))
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--trainable", default="all", choices=("all", "norms", "lora"))
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--vs", choices=("torch",), help="also time the same step in PyTorch, alternating with kept_jax")
    p.add_argument("--reps", type=int, default=5, help="timed steps of each framework (median reported)")
    p.add_argument("--remat", help="kept_jax remat policy (default: none up to 30m, save-dots-no-batch above)")
    p.add_argument("--no-scan", action="store_true",
                   help="kept_jax layers unrolled (model.scan_layers: false) instead of one scanned layer")
    p.add_argument("--attention", choices=("xla", "cudnn"), help="kept_jax attention (default: cudnn on a GPU)")
    p.add_argument("--chunk-size", type=int, default=1024, help="tokens per chunk of the loss's logits")
    p.add_argument("--compile-only", action="store_true",
                   help="compile on abstract shapes and print memory_analysis(); no weights, no timing")
    p.add_argument("--no-save", action="store_true", help="do not write the JSON result")
    args = p.parse_args(argv)
    for name in ("seq_len", "batch", "reps", "chunk_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.vs == "torch" and args.trainable not in TORCH_TRAINABLE:
        p.error(f"--vs torch compares trainable {' and '.join(TORCH_TRAINABLE)}; the PyTorch step has no LoRA")
    if args.vs and args.compile_only:
        p.error("--compile-only times nothing; drop --vs")
    return args


def teacher_config(args) -> LlamaConfig:
    big = args.size in ("1b", "14b")
    runtime = dict(compute_dtype=args.dtype, param_dtype=args.dtype, scan_layers=not args.no_scan,
                   remat_policy=args.remat or ("save-dots-no-batch" if big else "none"),
                   attention_impl=args.attention or ("cudnn" if jax.default_backend() == "gpu" else "xla"))
    config = LlamaConfig.from_hf_dict(SIZES[args.size](), **runtime)
    if args.seq_len > config.max_position_embeddings:
        raise KeptError(f"--seq-len {args.seq_len} is longer than the {args.size} model's "
                        f"max_position_embeddings ({config.max_position_embeddings})")
    return config


# ---- kept_jax ------------------------------------------------------------------------------------


def absorb_shared_paths(config: LlamaConfig) -> frozenset[tuple[str, ...]]:
    """The student leaves `opm=absorb` leaves equal to the teacher's (its recentered writers), from its rules."""
    return build_mapping("absorb", config, stats={}).shared_with_teacher()


def _with_shared_leaves(student: dict, teacher: dict, shared_paths: frozenset[tuple[str, ...]]) -> dict:
    flat_student, flat_teacher = traverse_util.flatten_dict(student), traverse_util.flatten_dict(teacher)
    flat_student.update({path: flat_teacher[path] for path in shared_paths})
    return traverse_util.unflatten_dict(flat_student)


def student_variables(student_params: dict, trainable: str) -> dict:
    """The student's variables; LoRA adapters are added for `lora` (works under `jax.eval_shape` too)."""
    variables = {"params": student_params}
    if trainable == "lora":
        variables["lora"] = init_lora(student_params, LORA_RANK, LORA_TARGETS, jax.random.key(2))
    return variables


@dataclasses.dataclass
class KeptStep:
    """kept_jax's step (kept_jax.xkd.step.make_train_step) with its weights, optimizer state and one batch."""

    teacher: LlamaForCausalLM
    student: LlamaForCausalLM
    teacher_params: dict
    split: StudentSplit
    tokens: jax.Array  # [1, batch, seq]: one micro-batch
    optimizer: optax.GradientTransformation
    fn: Callable
    state: TrainState | None = None

    @classmethod
    def build(cls, config: LlamaConfig, variables: dict, teacher_params: dict, tokens, trainable: str,
              chunk_size: int) -> "KeptStep":
        teacher = build_model(config)
        student = build_model(target_config(config, "absorb").replace(lora_scale=LORA_ALPHA / LORA_RANK))
        split = split_by_paths(variables, teacher_params, trainable, absorb_shared_paths(config))
        optimizer = make_optimizer(LR, WARMUP, STEPS, WEIGHT_DECAY, CLIP)
        fn = make_train_step(LogitKL(teacher, student, LossConfig(chunk_size=chunk_size)), split, optimizer)
        return cls(teacher, student, teacher_params, split, tokens, optimizer, fn)

    def init(self) -> None:
        """A fresh optimizer state from the initial trainable leaves (the step donates the state it is given)."""
        self.state = init_state(self.split, self.optimizer)

    def __call__(self) -> dict:
        self.state, metrics = self.fn(self.state, self.teacher_params, self.split.frozen, self.tokens)
        return jax.block_until_ready(metrics)

    def flops(self) -> float:
        """FLOPs of one step by kept_jax.flops: useful work, the same for any implementation of this step."""
        trainable_matmul = sum(math.prod(v.shape) for k, v in self.split.trainable.items()
                               if k[-1] in ("kernel", "a", "b"))
        per_token = step_flops_per_token(self.teacher.config, self.student.config, self.tokens.shape[-1],
                                         trainable_matmul)
        return per_token * math.prod(self.tokens.shape)


def random_weights(config: LlamaConfig, seed: int = 0) -> tuple[dict, dict]:
    """Random teacher params and an absorb-like student's params (its own readers and head, shared writers)."""
    init = jax.jit(init_params, static_argnums=0)  # one program, not one dispatch per op
    teacher = init(config, jax.random.key(seed))
    student = init(target_config(config, "absorb"), jax.random.key(seed + 1))
    return teacher, _with_shared_leaves(student, teacher, absorb_shared_paths(config))


def random_tokens(config: LlamaConfig, batch: int, seq_len: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, config.vocab_size, (batch, seq_len), dtype=np.int32)


@functools.cache  # measured once per process
def matmul_flops_per_s(dtype: str, n: int = 2048, reps: int = 5) -> float:
    """FLOP/s of an n x n x n `jnp.dot` of `dtype` operands accumulated in fp32 (the precision policy's product) on
    this process's device: the CPU efficiency yardstick."""
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), dtype)
    dot = jax.jit(functools.partial(jnp.dot, preferred_element_type=jnp.float32))
    dot(a, b).block_until_ready()
    seconds, _ = median_seconds(lambda: dot(a, b).block_until_ready(), reps)
    return 2 * n**3 / seconds


# ---- PyTorch ------------------------------------------------------------------------------------


class TorchStep:
    """The same step in PyTorch: Transformers models, SDPA attention, AdamW; weights copied from kept_jax's."""

    def __init__(self, config: LlamaConfig, trainable: str, teacher_params: dict, student_params: dict,
                 tokens: np.ndarray, dtype: str):
        import torch
        from torch import nn
        from transformers import LlamaConfig as HFLlamaConfig, LlamaForCausalLM as HFLlamaForCausalLM

        student_config = target_config(config, "absorb")
        hf = {k: v for k, v in student_config.replace(dtype="float32").to_hf_dict().items()
              if k not in ("model_type", "architectures")}
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        with self.device:
            self.teacher = HFLlamaForCausalLM(HFLlamaConfig(**hf, attn_implementation="sdpa"))
            for layer in self.teacher.model.layers:  # Orion's norms
                layer.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.rms_norm_eps)
                layer.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.rms_norm_eps)
            self.teacher.model.norm = nn.LayerNorm(config.hidden_size, eps=config.rms_norm_eps)
            self.student = HFLlamaForCausalLM(HFLlamaConfig(**hf, attn_implementation="sdpa"))
        _load(self.teacher, teacher_params, config)
        _load(self.student, student_params, student_config)
        self.teacher.eval().requires_grad_(False)
        self.student.train()
        for name, p in self.student.named_parameters():
            p.requires_grad_(trainable == "all" or "norm" in name)
        self.params = [p for p in self.student.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=LR, weight_decay=WEIGHT_DECAY, foreach=True)
        self.tokens = torch.as_tensor(tokens, dtype=torch.long, device=self.device)
        self.set_dtype(dtype)

    def set_dtype(self, dtype: str) -> None:
        """bf16: the frozen teacher is cast; the student keeps fp32 master weights and runs under autocast."""
        import torch

        self.autocast = dtype == "bfloat16"
        self.teacher.to(torch.bfloat16 if self.autocast else torch.float32)

    def __call__(self) -> dict:
        import torch
        import torch.nn.functional as F

        with torch.autocast(self.device.type, torch.bfloat16, enabled=self.autocast):
            with torch.no_grad():
                teacher_logits = self.teacher(self.tokens, use_cache=False).logits[:, :-1]
            student_logits = self.student(self.tokens, use_cache=False).logits[:, :-1]
        vocab = student_logits.shape[-1]
        loss = F.kl_div(F.log_softmax(student_logits.float().reshape(-1, vocab), -1),
                        F.log_softmax(teacher_logits.float().reshape(-1, vocab), -1),
                        reduction="batchmean", log_target=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, CLIP)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return {"loss": loss.item(), "grad_norm": grad_norm.item()}


def _load(model, params: dict, config: LlamaConfig) -> None:
    import torch

    from bridge.hf_export import hf_tensor

    state = {s.hf_name: torch.from_numpy(hf_tensor(params, config, s, "float32")) for s in config.tensor_table()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not m.endswith("rotary_emb.inv_freq")]
    if missing or unexpected:
        raise RuntimeError(f"torch model and kept_jax params disagree: missing {missing}, unexpected {unexpected}")


@functools.cache
def torch_matmul_flops_per_s(dtype: str, n: int = 2048, reps: int = 5) -> float:
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    a = torch.randn(n, n, device=device, dtype=getattr(torch, dtype))
    b = torch.randn(n, n, device=device, dtype=getattr(torch, dtype))

    def run():
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()

    run()
    seconds, _ = median_seconds(run, reps)
    return 2 * n**3 / seconds


def check_same_step(kept: KeptStep, reference: TorchStep, rtol: float = 1e-4) -> dict:
    """One fp32 step of each on the same weights and tokens: loss and gradient norm must agree to `rtol`."""
    ours = kept()
    ours = {"loss": float(ours["loss"] / ours["tokens"]), "grad_norm": float(ours["grad_norm"])}
    theirs = reference()
    for key in ("loss", "grad_norm"):
        if not math.isclose(ours[key], theirs[key], rel_tol=rtol):
            raise KeptError(f"kept_jax and PyTorch disagree on the {key} of the same step: {ours[key]!r} vs "
                            f"{theirs[key]!r} (rtol {rtol}); the two steps do not compute the same thing")
    return {"kept_jax": ours, "torch": theirs, "rtol": rtol}


# ---- main ----------------------------------------------------------------------------------------


def compile_only(args, config: LlamaConfig) -> dict:
    """Compiles the step on shapes alone (nothing is allocated) and reports XLA's memory analysis."""
    teacher = abstract_params(config)
    student = _with_shared_leaves(abstract_params(target_config(config, "absorb")), teacher,
                                  absorb_shared_paths(config))
    variables = jax.eval_shape(lambda p: student_variables(p, args.trainable), student)
    tokens = jax.ShapeDtypeStruct((1, args.batch, args.seq_len), jnp.int32)
    kept = KeptStep.build(config, variables, teacher, tokens, args.trainable, args.chunk_size)
    start = time.perf_counter()
    compiled = kept.fn.lower(abstract_state(kept.split, kept.optimizer), teacher, kept.split.frozen, tokens).compile()
    seconds = time.perf_counter() - start
    memory = compiled.memory_analysis()
    gib = {name: round(getattr(memory, f"{name}_size_in_bytes") / 2**30, 2)
           for name in ("argument", "output", "alias", "temp", "generated_code")}
    gib["total"] = round(compiled_peak_bytes(compiled) / 2**30, 2)
    print(f"compiled in {seconds:.1f} s; memory_analysis, GiB per device: {gib}", flush=True)
    return {"compile_s": round(seconds, 1), "memory_GiB": gib}


def _config_line(config: LlamaConfig) -> str:
    fields = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim")
    runtime = ("compute_dtype", "param_dtype", "remat_policy", "attention_impl")
    return ", ".join(f"{k}={getattr(config, k)}" for k in fields + runtime)


def _cast(tree, dtype: str):
    return jax.tree.map(lambda x: x.astype(dtype), tree)


def _report(name: str, seconds: list[float], flops: float, tokens: int, yardstick: tuple[str, float]) -> dict:
    median = statistics.median(seconds)
    achieved = flops / median
    label, reference = yardstick
    row = {"step_s": round(median, 4), "step_s_all": [round(t, 4) for t in seconds],
           "tokens_per_s": round(tokens / median, 1), "step_flops": flops, "flops_per_s": achieved,
           "efficiency": round(achieved / reference, 4), "efficiency_vs": label}
    print(f"{name:>8}: {median:.3f} s/step (median of {len(seconds)}), {row['tokens_per_s']:,.0f} tokens/s, "
          f"{flops / 1e12:.3f} TFLOP/step, {achieved / 1e9:,.1f} GFLOP/s, {100 * row['efficiency']:.1f}% of {label}",
          flush=True)
    return row


def run(args) -> dict:
    config = teacher_config(args)
    result = {"benchmark": "xkd_step", "environment": environment(),
              "args": {k: v for k, v in vars(args).items() if k != "no_save"},
              "teacher": _config_line(config), "teacher_params": config.num_params()}
    print(f"{args.size} teacher (Orion layout): {_config_line(config)}; {config.num_params() / 1e6:,.1f}M params")
    print(f"step: batch {args.batch} x seq {args.seq_len}, trainable {args.trainable}, {args.dtype}, "
          f"loss chunks of {args.chunk_size} tokens; device {result['environment']['device']}", flush=True)
    if args.compile_only:
        result["compile"] = compile_only(args, config)
        return result

    fp32 = config.replace(compute_dtype="float32", param_dtype="float32")
    teacher_params, student_params = random_weights(fp32)
    tokens = random_tokens(config, args.batch, args.seq_len)
    reference = None
    if args.vs == "torch":
        reference = TorchStep(fp32, args.trainable, teacher_params, student_params, tokens, "float32")
        kept = KeptStep.build(fp32, student_variables(student_params, args.trainable), teacher_params,
                              jnp.asarray(tokens[None]), args.trainable, args.chunk_size)
        kept.init()
        result["check"] = check_same_step(kept, reference)
        print("same step: kept_jax loss {loss:.6f} grad_norm {grad_norm:.6f}; ".format(**result["check"]["kept_jax"])
              + "torch loss {loss:.6f} grad_norm {grad_norm:.6f} (fp32, rtol {rtol})".format(
                  **result["check"]["torch"], rtol=result["check"]["rtol"]), flush=True)
        reference.set_dtype(args.dtype)
    if reference is None or args.dtype != "float32":
        if args.dtype != "float32":
            teacher_params, student_params = _cast(teacher_params, args.dtype), _cast(student_params, args.dtype)
        kept = KeptStep.build(config, student_variables(student_params, args.trainable), teacher_params,
                              jnp.asarray(tokens[None]), args.trainable, args.chunk_size)
        kept.init()

    start = time.perf_counter()
    kept()  # compilation, then one step that is not timed
    kept()
    result["kept_jax_compile_and_warmup_s"] = round(time.perf_counter() - start, 1)
    steps = {"kept_jax": kept}
    if reference is not None:
        reference()
        steps["torch"] = reference
    seconds: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.reps):  # alternate, so that both see the same machine state
        for name, step in steps.items():
            if reference is not None:
                step()  # not timed: the first step after a switch re-faults memory the other framework released
            start = time.perf_counter()
            step()
            seconds[name].append(time.perf_counter() - start)

    device = jax.devices()[0].device_kind
    peak = peak_flops(device, args.dtype)
    flops, n_tokens = kept.flops(), args.batch * args.seq_len
    if peak:
        yardstick = ("the device's peak", peak)
    else:
        dot = matmul_flops_per_s(args.dtype)
        yardstick = (f"jnp.dot's {dot / 1e9:,.1f} GFLOP/s", dot)
        result["jnp_dot_flops_per_s"] = dot
        if reference is not None:
            result["torch_matmul_flops_per_s"] = torch_matmul_flops_per_s(args.dtype)
            print(f"2048^3 matmul: jnp.dot {dot / 1e9:,.1f} GFLOP/s, torch.matmul "
                  f"{result['torch_matmul_flops_per_s'] / 1e9:,.1f} GFLOP/s")
    for name in steps:
        result[name] = _report(name, seconds[name], flops, n_tokens, yardstick)
    if reference is not None:
        result["ratio"] = round(result["kept_jax"]["tokens_per_s"] / result["torch"]["tokens_per_s"], 3)
    return result


def main(argv=None) -> int:
    args = parse_args(argv)
    result = run(args)
    if not args.no_save:
        stem = f"xkd_step-{args.size}-{args.trainable}-{args.dtype}-seq{args.seq_len}-b{args.batch}"
        if args.no_scan:
            stem += "-unrolled"
        if args.compile_only:
            stem += "-compile"
        print(f"wrote {write_result(stem, result)}")
    if "ratio" in result:
        print(f"ratio={result['ratio']}")
    return 0


if __name__ == "__main__":
    sys.exit(cli_entry(main)())
