"""FLOPs of the XKD step by an explicit formula, and the peak FLOP/s of known accelerators, for MFU.

Per token, with N the matmul parameters of one model (every linear layer and the output head; the embedding
lookup is not a matmul: `config.matmul_params()`) and X(T) the forward FLOPs of its sequence mixing beyond those
matmuls at sequence length T (`config.mixing_flops_per_token`: 4 L T A for attention, with L layers and
A = heads x head_dim, QK^T and PV at full T x T):

    forward               F = 2 N + X(T)                (2 FLOPs per multiply-add)
    teacher               F_teacher                     (forward only, no gradient)
    student               F_student + 2 N_student + 2 X_student(T) + 2 N_trainable
                          (forward; gradients w.r.t. activations through every matmul; the mixing's backward;
                           weight gradients only for trainable matmul weights, LoRA adapters included)

With every weight trainable the student term of a Llama is the familiar 6 N + 12 L T A. Recomputation under remat
is not counted: MFU measures useful work. MFU = step FLOPs / step time / (peak FLOP/s per device x devices).
"""

from __future__ import annotations

from kept_jax.config import ModelConfig

# Dense peak FLOP/s per device by `device_kind` prefix, for bf16 compute; fp32 matmuls run as TF32 on the tensor
# cores under XLA's default precision, whose dense peak is half that of bf16 on these parts.
PEAK_BF16 = {
    "NVIDIA H200": 989e12, "NVIDIA H100": 989e12, "NVIDIA GH200": 989e12, "NVIDIA A100": 312e12,
    "NVIDIA L40S": 362e12, "NVIDIA B200": 2250e12, "TPU v5p": 459e12, "TPU v5 lite": 197e12, "TPU v4": 275e12,
}


def peak_flops(device_kind: str, compute_dtype: str) -> float | None:
    """The device's dense peak for `compute_dtype`, or None when unknown (CPUs among others)."""
    for prefix, peak in PEAK_BF16.items():
        if device_kind.startswith(prefix):
            return peak if compute_dtype == "bfloat16" else peak / 2
    return None


def forward_flops_per_token(config: ModelConfig, seq_len: int) -> float:
    return 2 * config.matmul_params() + config.mixing_flops_per_token(seq_len)


def step_flops_per_token(teacher: ModelConfig, student: ModelConfig, seq_len: int, trainable_matmul_params: int) -> float:
    return (forward_flops_per_token(teacher, seq_len) + forward_flops_per_token(student, seq_len)
            + 2 * student.matmul_params() + 2 * student.mixing_flops_per_token(seq_len) + 2 * trainable_matmul_params)
