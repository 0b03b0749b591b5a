"""Llama -> a Mamba-2/attention hybrid in GraniteMoeHybrid's layout, without training. docs/hybrid.md.

Which layers keep attention is a spec (`parse_attention_layers`): `0,8,16`, `every:4` (layers 0, 4, 8, ...), `all`,
`none`, or `auto:N` (N layers chosen by measurement, `kept_jax.mapping.layer_choice`). Everything a kept layer has
is copied, so an all-attention hybrid is its Llama exactly: the embedding, every norm, the head, the kept attention
layers, and each MLP, whose gate and up rows become the shared MLP's `input_linear` ([gate; up]) and whose down
projection is its `output_linear`. Each other layer's attention becomes a Mamba-2 mixer, initialized in one of two
ways (`MIXER_INITS`):

- `mamba2` (the default): mamba_ssm's own initialization of a new Mamba-2 layer (in_proj, conv and out_proj at
  PyTorch's defaults, dt log-uniform in [0.001, 0.1], A uniform in [1, 16], D = 1, the gated norm's weight 1); the
  attention's weights are dropped. On SmolLM2-135M with every fourth layer kept it starts closer to the teacher (KL
  7.0 against 10.8 nats/token) and ends lower after the same training (docs/hybrid.md).
- `attention` (Mamba-in-the-Llama's): the mixer reads the attention it replaces, x <- W_V, B <- W_K, C <- W_Q,
  out_proj <- W_O, with d_state = head_dim. Each attention head becomes `mamba_n_heads / heads` Mamba-2 heads of
  head_dim (2 with the default expand 2, which llama.cpp requires), each reading that head's values (its KV head's,
  under GQA), with out_proj's columns divided among them so that they add up to W_O. B and C are shared within a
  group of heads: a group's B is the mean of W_K over its KV heads and its C the mean of W_Q over its query heads
  (one group, the default, averages them all; as many groups as attention heads reproduces each head's q.k). The
  convolution is the identity on the current token, z's rows and dt's rows PyTorch's default, the time steps and
  decays as `mamba2`'s, D = 1, the gated norm's weight 1.

Random values come from a generator seeded by (seed, target name): any one tensor can be rebuilt alone, identically.
"""

from __future__ import annotations

import re

import numpy as np

from kept_jax.errors import KeptError
from kept_jax.mapping.inits import conv_identity, default_linear, repeat_heads, seeded_rng
from kept_jax.mapping.rules import Mapping, Rule, identity
from kept_jax.models.hybrid import ATTENTION, MAMBA, HybridConfig
from kept_jax.models.llama import LlamaConfig

MIXER_INITS = ("mamba2", "attention")  # the default first
DT_RANGE = (1e-3, 1e-1)  # mamba_ssm's dt_min, dt_max: dt log-uniform between them
A_RANGE = (1.0, 16.0)  # mamba_ssm's A_init_range
SPEC_FORMS = "a list of layers (0,8,16), every:K, auto:N, all or none"
# The chunked SSD's chunk (the math does not depend on it): on this CPU a SmolLM2 hybrid's training steps at sequences
# of 256 took 7.6 s (stage 2) and 9.6 s (stage 3) with chunks of 64, 9.3 s and 10.7 s with Transformers' default of
# 256 (2026-12-05). Larger chunks suit GPU kernels; --target-config gives another.
CHUNK = 64


def parse_attention_layers(spec: str, num_layers: int) -> tuple[int, ...] | int:
    """The layers that keep attention, from `spec`; `auto:N` gives N (the layers are chosen by measurement)."""
    spec = str(spec).strip()
    if spec == "all":
        return tuple(range(num_layers))
    if spec == "none":
        return ()
    if match := re.fullmatch(r"(every|auto):(\d+)", spec):
        n = int(match.group(2))
        if match.group(1) == "every":
            if n < 1:
                raise KeptError(f"--attention-layers {spec}: every:K needs K >= 1")
            return tuple(range(0, num_layers, n))
        if not 1 <= n <= num_layers:
            raise KeptError(f"--attention-layers {spec}: auto:N needs 1 <= N <= {num_layers} (the teacher's layers)")
        return n
    if not re.fullmatch(r"\d+(,\d+)*", spec):
        raise KeptError(f"--attention-layers {spec!r} is not {SPEC_FORMS}")
    layers = sorted({int(i) for i in spec.split(",")})
    if layers[-1] >= num_layers:
        raise KeptError(f"--attention-layers {spec}: layer {layers[-1]} does not exist; the teacher has layers 0 to "
                        f"{num_layers - 1}")
    return tuple(layers)


def evenly_spaced(n: int, num_layers: int) -> tuple[int, ...]:
    """`n` layers spread over `num_layers` from the first to the last (`auto:N`'s shapes, before measuring)."""
    return tuple(sorted({round(i * (num_layers - 1) / max(n - 1, 1)) for i in range(n)}))


def hybrid_config_for(teacher: LlamaConfig, attention_layers: tuple[int, ...], mixer_init: str = "mamba2",
                      layout: HybridConfig | None = None, groups: int = 1) -> HybridConfig:
    """The student: the teacher's shape with attention in `attention_layers` and Mamba-2 elsewhere, its mixers
    `layout`'s (a GraniteMoeHybrid config.json) or derived from the teacher: expand 2, heads of head_dim, d_state =
    head_dim, `groups` B/C groups, chunks of `CHUNK`."""
    if teacher.architecture != "llama":
        raise KeptError(f"a hybrid student is distilled from a Llama; the source is {teacher.architecture!r}")
    if teacher.mlp_bias:
        raise KeptError("the source Llama has MLP biases (mlp_bias=true); GraniteMoeHybrid's shared MLP has none, so "
                        "they would be lost: use a Llama without MLP biases")
    d, heads, head_dim = teacher.hidden_size, teacher.num_attention_heads, teacher.head_dim
    if heads * head_dim != d:
        raise KeptError(f"the source Llama's heads are {head_dim} wide, not hidden_size / heads = {d // heads}: "
                        "GraniteMoeHybrid (as MLX-LM and llama.cpp read it) has no separate head_dim")
    types = tuple(ATTENTION if i in attention_layers else MAMBA for i in range(teacher.num_hidden_layers))
    if layout is None:
        expand = 2
        layout = HybridConfig(
            vocab_size=teacher.vocab_size, hidden_size=d, intermediate_size=teacher.intermediate_size,
            num_hidden_layers=teacher.num_hidden_layers, tie_word_embeddings=teacher.tie_word_embeddings,
            layer_types=types, num_attention_heads=heads,
            num_key_value_heads=teacher.num_key_value_heads, attention_multiplier=head_dim ** -0.5,
            mamba_n_heads=expand * d // head_dim, mamba_d_head=head_dim, mamba_n_groups=groups,
            mamba_d_state=head_dim, mamba_expand=expand, mamba_chunk_size=CHUNK)
    layout = layout.replace(layer_types=types, scan_layers=True)  # scanned again when one kind (post_init)
    shared = {"vocab_size": "vocab_size", "hidden_size": "hidden_size", "intermediate_size": "shared_intermediate_size",
              "num_hidden_layers": "num_hidden_layers", "num_attention_heads": "num_attention_heads",
              "num_key_value_heads": "num_key_value_heads", "tie_word_embeddings": "tie_word_embeddings"}
    for field, hf_name in shared.items():
        if getattr(layout, field) != getattr(teacher, field):
            raise KeptError(f"the student's {hf_name} is {getattr(layout, field)!r} but the teacher's is "
                            f"{getattr(teacher, field)!r}; they must be equal (the student keeps the teacher's "
                            "embedding, norms, MLPs, head and attention)")
    if mixer_init == "attention":
        per_head = layout.mamba_n_heads // heads
        wrong = []
        if layout.mamba_d_head != head_dim or layout.mamba_d_state != head_dim:
            wrong.append(f"mamba_d_head and mamba_d_state equal to head_dim {head_dim}")
        if per_head * heads != layout.mamba_n_heads:
            wrong.append(f"mamba_n_heads a multiple of the {heads} attention heads")
        if layout.mamba_n_groups > heads or heads % layout.mamba_n_groups:
            wrong.append(f"mamba_n_groups dividing the {heads} attention heads")
        if wrong:
            raise KeptError("--mixer-init attention reads q/k/v/o head by head, so the student needs "
                            + "; ".join(wrong) + "; leave out --target-config to take the teacher's shape, or use "
                            "--mixer-init mamba2")
    return layout.replace(
        rms_norm_eps=teacher.rms_norm_eps, max_position_embeddings=teacher.max_position_embeddings, rope=teacher.rope,
        attention_bias=teacher.attention_bias, attention_multiplier=teacher.attention_scale, embedding_multiplier=1.0,
        residual_multiplier=1.0, logits_scaling=1.0, bos_token_id=teacher.bos_token_id,
        eos_token_id=teacher.eos_token_id, pad_token_id=teacher.pad_token_id, dtype=teacher.dtype)


def _dt_bias(name: str, heads: int, seed: int) -> np.ndarray:
    """softplus^-1 of dt log-uniform in DT_RANGE (mamba_ssm's dt init)."""
    low, high = np.log(DT_RANGE)
    dt = np.exp(seeded_rng(seed, name).uniform(low, high, size=heads))
    return dt + np.log(-np.expm1(-dt))


def _a_log(name: str, heads: int, seed: int) -> np.ndarray:
    return np.log(seeded_rng(seed, name).uniform(*A_RANGE, size=heads))


def _group_means(weight: np.ndarray, heads: int, groups: int) -> np.ndarray:
    """[heads x hd, d] -> [groups x hd, d]: each group's mean over its run of heads."""
    per_head = weight.reshape(heads, -1, weight.shape[-1])
    return per_head.reshape(groups, heads // groups, *per_head.shape[1:]).mean(axis=1).reshape(-1, weight.shape[-1])


def build_hybrid_mapping(teacher: LlamaConfig, student: HybridConfig, mixer_init: str, seed: int = 0) -> Mapping:
    """The rule table Llama -> hybrid (`student` from `hybrid_config_for`)."""
    if mixer_init not in MIXER_INITS:
        raise KeptError(f"unknown mixer init {mixer_init!r}; choose one of {', '.join(MIXER_INITS)}")
    rules = [identity(student.hf_embedding_name, teacher.hf_embedding_name)]
    dropped: dict[str, str] = {}
    biases = ("weight", "bias") if teacher.attention_bias else ("weight",)
    for i, kind in enumerate(student.layer_types):
        layer = f"model.layers.{i}"
        attn, mamba, mlp = f"{layer}.self_attn", f"{layer}.mamba", f"{layer}.mlp"
        for norm in ("input_layernorm", "post_attention_layernorm"):
            rules.append(identity(f"{layer}.{norm}.weight"))
        rules.append(Rule(f"{layer}.shared_mlp.input_linear.weight",
                          (f"{mlp}.gate_proj.weight", f"{mlp}.up_proj.weight"),
                          "[gate; up] rows", lambda gate, up: np.concatenate([gate, up])))
        rules.append(identity(f"{layer}.shared_mlp.output_linear.weight", f"{mlp}.down_proj.weight"))
        if kind == ATTENTION:
            rules += [identity(f"{attn}.{proj}.{b}")
                      for proj in ("q_proj", "k_proj", "v_proj", "o_proj") for b in biases]
            continue
        mixer = _mamba_rules(teacher, student, mamba, attn, mixer_init, seed)
        rules += mixer
        sources = {source for rule in mixer for source in rule.sources}
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            for b in biases:
                if f"{attn}.{proj}.{b}" not in sources:
                    dropped[f"{attn}.{proj}.{b}"] = f"attention is replaced by Mamba-2 ({mixer_init} init)"
    rules.append(identity("model.norm.weight"))
    if not teacher.tie_word_embeddings:
        rules.append(identity("lm_head.weight"))
    return Mapping(f"hybrid/{mixer_init}", teacher, student, rules, dropped)


def _mamba_rules(teacher: LlamaConfig, student: HybridConfig, mamba: str, attn: str, mixer_init: str,
                 seed: int) -> list[Rule]:
    """One Mamba-2 layer's rules. Initial values approximate nothing of the teacher, so they have no error to
    report."""
    d, h, inner, conv = student.hidden_size, student.mamba_n_heads, student.d_inner, student.conv_channels
    in_proj, out_proj = f"{mamba}.in_proj.weight", f"{mamba}.out_proj.weight"
    rules = []
    if mixer_init == "attention":
        rules.append(Rule(in_proj, tuple(f"{attn}.{p}.weight" for p in ("q_proj", "k_proj", "v_proj")),
                          "x <- W_V, B <- mean W_K, C <- mean W_Q (per group); z, dt rows default",
                          _attention_in_proj(teacher, student, in_proj, seed), None))
        per_head = h // teacher.num_attention_heads
        rules.append(Rule(out_proj, (f"{attn}.o_proj.weight",), f"W_O, each head's columns / {per_head}",
                          lambda w: np.repeat(w.reshape(d, teacher.num_attention_heads, -1), per_head, axis=1)
                          .reshape(d, inner) / per_head, None))
        conv_weight = Rule(f"{mamba}.conv1d.weight", (), "identity on the current token",
                           conv_identity(student.conv_channels, student.mamba_d_conv), None)
        conv_bias = Rule(f"{mamba}.conv1d.bias", (), "zeros", lambda: np.zeros(conv), None)
    else:
        rules.append(Rule(in_proj, (), "default init", lambda: default_linear(in_proj, (student.in_proj_size, d),
                                                                                seed), None))
        rules.append(Rule(out_proj, (), "default init", lambda: default_linear(out_proj, (d, inner), seed), None))
        k = student.mamba_d_conv
        name = f"{mamba}.conv1d.weight"
        conv_weight = Rule(name, (), "default init", lambda: seeded_rng(seed, name).uniform(-k ** -0.5, k ** -0.5,
                                                                                      size=(conv, 1, k)), None)
        bias_name = f"{mamba}.conv1d.bias"
        conv_bias = Rule(bias_name, (), "default init",
                         lambda: seeded_rng(seed, bias_name).uniform(-k ** -0.5, k ** -0.5, size=conv), None)
    rules.append(conv_weight)
    if student.mamba_conv_bias:
        rules.append(conv_bias)
    rules.append(Rule(f"{mamba}.dt_bias", (), "softplus^-1 of dt log-uniform in [0.001, 0.1]",
                      lambda name=f"{mamba}.dt_bias": _dt_bias(name, h, seed), None))
    rules.append(Rule(f"{mamba}.A_log", (), "log A, A uniform in [1, 16]",
                      lambda name=f"{mamba}.A_log": _a_log(name, h, seed), None))
    rules.append(Rule(f"{mamba}.D", (), "ones", lambda: np.ones(h), None))
    rules.append(Rule(f"{mamba}.norm.weight", (), "ones", lambda: np.ones(inner), None))
    if student.mamba_proj_bias:
        rules.append(Rule(f"{mamba}.in_proj.bias", (), "zeros", lambda: np.zeros(student.in_proj_size), None))
        rules.append(Rule(f"{mamba}.out_proj.bias", (), "zeros", lambda: np.zeros(d), None))
    return rules


def _attention_in_proj(teacher: LlamaConfig, student: HybridConfig, name: str, seed: int):
    """in_proj's rows [z (d_inner) | x (d_inner) | B (G N) | C (G N) | dt (H)] from W_Q, W_K, W_V."""
    inner, gn = student.d_inner, student.mamba_n_groups * student.mamba_d_state
    heads, kv = teacher.num_attention_heads, teacher.num_key_value_heads
    per_head, groups = student.mamba_n_heads // heads, student.mamba_n_groups

    def fn(wq: np.ndarray, wk: np.ndarray, wv: np.ndarray) -> np.ndarray:
        weight = default_linear(name, (student.in_proj_size, student.hidden_size), seed)
        weight[inner:2 * inner] = repeat_heads(wv, kv, heads * per_head)  # each head reads its attention head's KV
        weight[2 * inner:2 * inner + gn] = _group_means(repeat_heads(wk, kv, heads), heads, groups)
        weight[2 * inner + gn:2 * inner + 2 * gn] = _group_means(wq, heads, groups)
        return weight
    return fn
