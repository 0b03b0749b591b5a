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

MOHAWK's layer stages (`stage_flops_per_token`) run the teacher's layers without its head (u_0 ... u_L), then, for
each layer the student replaced (all of a Llamba's, a hybrid's Mamba-2 layers):

    hidden   the student's block forward and backward, the same terms as above without the head
    matrix   the teacher's q and k projections and Q K^T again (2 d (q + k) + 2 T q, q and k the projections'
             widths), and the student's in_proj and C B^T over the whole T x T (2 d P_in + 2 G N T, P_in =
             in_proj's width), counted three times for forward and backward
"""

from __future__ import annotations

from kept_jax.config import ModelConfig, replaced_layers

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


def stage_flops_per_token(objective: str, teacher: ModelConfig, student: ModelConfig, seq_len: int,
                          trainable_matmul_params: int) -> float:
    """FLOPs per token of one training step of a stage with `objective` (kept_jax/xkd/objectives.py)."""
    if objective == "kl":
        return step_flops_per_token(teacher, student, seq_len, trainable_matmul_params)
    teacher_layers = forward_flops_per_token(teacher, seq_len) - 2 * teacher.hidden_size * teacher.padded_vocab_size
    replaced = replaced_layers(teacher, student)
    if objective == "hidden":
        blocks = sum(student.layer_matmul_params()[i] for i in replaced)
        mixing = sum(student.layer_mixing_flops(seq_len)[i] for i in replaced)
        return teacher_layers + 4 * blocks + 3 * mixing + 2 * trainable_matmul_params
    d, layers = teacher.hidden_size, len(replaced)
    q, k = teacher.num_attention_heads * teacher.head_dim, teacher.num_key_value_heads * teacher.head_dim
    attention = layers * (2 * d * (q + k) + 2 * seq_len * q)
    matrices = layers * (2 * d * student.in_proj_size + 2 * student.bc_width * seq_len)
    return teacher_layers + attention + 3 * matrices
