"""Llama -> Llamba without training: copy what the two share, drop attention, initialize each mixer. docs/llamba.md.

The embedding, every norm, the MLPs and the head are copied (renamed into `backbone/...`). Each attention sublayer
becomes a Discrete-Mamba-2 mixer, initialized in one of two ways:

- `mohawk` (the recipe's): in_proj's x, B, C and l rows at PyTorch's default U(+-1/sqrt(d_in)), its z rows 0 and
  z_bias = 1.278464542761 so that the gate starts at silu(z_bias) = 1; the convolution the identity on the current
  token with bias 0; D = 1; out_proj at the default init. q/k/v/o are dropped.
- `attention`: the mixer reads the attention's projections, C <- W_Q, B <- W_K, x <- W_V (K and V repeated over the
  GQA groups: one B per query head), out_proj <- W_O; the rest as `mohawk`. It needs d_state = head_dim, one head
  per query head and n_qk_heads = n_v_heads, which `llamba_config_for` sets.

Random rows come from a generator seeded by (seed, target name): any one tensor can be rebuilt alone, identically.
"""

from __future__ import annotations

import numpy as np

from kept_jax.errors import KeptError
from kept_jax.mapping.inits import conv_identity, default_linear, repeat_heads
from kept_jax.mapping.rules import Mapping, Rule, identity
from kept_jax.models.llama import LlamaConfig
from kept_jax.models.llamba import LlambaConfig

MIXER_INITS = ("mohawk", "attention")
Z_BIAS_UNIT_GATE = 1.278464542761  # silu(1.278464542761) = 1.0000000000


def llamba_config_for(teacher: LlamaConfig, mixer_init: str, layout: LlambaConfig | None = None) -> LlambaConfig:
    """The student's config: `layout` (a Llamba config.json, e.g. a published size) checked against the teacher, or
    one derived from it (a head per query head, d_inner = heads x head_dim, d_state 64 or the head dim)."""
    if teacher.architecture != "llama":
        raise KeptError(f"a Llamba student is distilled from a Llama; the source is {teacher.architecture!r}")
    if teacher.attention_bias:
        raise KeptError("the source Llama has attention biases (attention_bias=true). The official Llamba code can "
                        "hold them (ssm_cfg.bias=true: biases on in_proj and out_proj, no z_bias), but kept_jax's "
                        "Llamba has no such biases yet and would drop them; use a bias-free Llama teacher (of an "
                        "Orion, `convert --opm absorb` makes one; `--opm exact` keeps biases)")
    d, heads, head_dim = teacher.hidden_size, teacher.num_attention_heads, teacher.head_dim
    if layout is None:
        if heads * head_dim % d:
            raise KeptError(f"heads x head_dim = {heads * head_dim} is not a multiple of hidden_size {d}; give the "
                            f"student's shape with --target-config")
        pad = 8 if teacher.vocab_size % 8 == 0 else 1  # the padded vocabulary must be the teacher's
        layout = LlambaConfig(
            vocab_size=teacher.vocab_size, hidden_size=d, intermediate_size=teacher.intermediate_size,
            num_hidden_layers=teacher.num_hidden_layers, rms_norm_eps=teacher.rms_norm_eps,
            mlp_bias=teacher.mlp_bias, tie_word_embeddings=teacher.tie_word_embeddings,
            bos_token_id=teacher.bos_token_id, eos_token_id=teacher.eos_token_id, pad_token_id=teacher.pad_token_id,
            d_state=head_dim if mixer_init == "attention" else 64, n_v_heads=heads, n_qk_heads=heads,
            expand=heads * head_dim // d, pad_vocab_size_multiple=pad)
    shared = {"hidden_size": "d_model", "num_hidden_layers": "n_layer",
              "intermediate_size": "mlp_cfg.intermediate_size", "mlp_bias": "mlp_cfg.bias",
              "tie_word_embeddings": "tie_embeddings"}
    for field, hf_name in shared.items():
        if getattr(layout, field) != getattr(teacher, field):
            raise KeptError(f"the student's {hf_name} is {getattr(layout, field)!r} but the teacher's is "
                            f"{getattr(teacher, field)!r}; they must be equal (the student keeps the teacher's MLPs, "
                            "norms, embedding and head)")
    if layout.padded_vocab_size != teacher.vocab_size:
        raise KeptError(f"the student's vocabulary ({layout.vocab_size}, padded to {layout.padded_vocab_size}) must be "
                        f"the teacher's {teacher.vocab_size}; set vocab_size to it and pad_vocab_size_multiple to a "
                        "divisor of it")
    if mixer_init == "attention":
        want = {"n_v_heads": heads, "n_qk_heads": heads, "head_dim": head_dim, "d_state": head_dim}
        wrong = {k: (getattr(layout, k), v) for k, v in want.items() if getattr(layout, k) != v}
        if wrong:
            raise KeptError("--mixer-init attention reads q/k/v/o as they are, so the student needs "
                            + ", ".join(f"{k}={v} (not {have})" for k, (have, v) in wrong.items())
                            + "; leave out --target-config to take the teacher's shape, or use --mixer-init mohawk")
    return layout.replace(dtype=teacher.dtype)


def build_llamba_mapping(teacher: LlamaConfig, student: LlambaConfig, mixer_init: str, seed: int = 0) -> Mapping:
    """The rule table Llama -> Llamba (`student` from `llamba_config_for`)."""
    if mixer_init not in MIXER_INITS:
        raise KeptError(f"unknown mixer init {mixer_init!r}; choose one of {', '.join(MIXER_INITS)}")
    d, h = student.hidden_size, student.n_v_heads
    rules = [identity(student.hf_embedding_name, teacher.hf_embedding_name)]
    dropped: dict[str, str] = {}
    for i in range(teacher.num_hidden_layers):
        src, dst = f"model.layers.{i}", f"backbone.layers.{i}"
        attn, mixer = f"{src}.self_attn", f"{dst}.mixer"
        for norm in ("input_layernorm", "post_attention_layernorm"):
            rules.append(identity(f"{dst}.{norm}.weight", f"{src}.{norm}.weight"))
        for proj in ("gate_proj", "up_proj", "down_proj"):
            for kind in ("weight", "bias") if teacher.mlp_bias else ("weight",):
                rules.append(identity(f"{dst}.mlp.{proj}.{kind}", f"{src}.mlp.{proj}.{kind}"))

        in_proj, out_proj = f"{mixer}.in_proj.weight", f"{mixer}.out_proj.weight"
        if mixer_init == "mohawk":
            rules.append(Rule(in_proj, (), "default rows; z rows 0", _in_proj(student, teacher, in_proj, seed), None))
            rules.append(Rule(out_proj, (), "default init",
                              lambda name=out_proj: default_linear(name, (d, student.d_inner), seed), None))
            for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
                dropped[f"{attn}.{proj}.weight"] = "attention is replaced by the mixer (mohawk init)"
        else:
            rules.append(Rule(in_proj, tuple(f"{attn}.{q}.weight" for q in ("q_proj", "k_proj", "v_proj")),
                              "x <- W_V, B <- W_K (GQA repeated), C <- W_Q; z rows 0; l rows default",
                              _in_proj(student, teacher, in_proj, seed), None))
            rules.append(identity(out_proj, f"{attn}.o_proj.weight"))
        # Initial values: they approximate nothing of the teacher, so they have no error to report.
        rules.append(Rule(f"{mixer}.z_bias", (), "1.2784645 (silu = 1)",
                          lambda: np.full(student.d_inner, Z_BIAS_UNIT_GATE), None))
        rules.append(Rule(f"{mixer}.conv1d.weight", (), "identity on the current token",
                          conv_identity(student.conv_channels, student.d_conv), None))
        if student.conv_bias:
            rules.append(Rule(f"{mixer}.conv1d.bias", (), "zeros", lambda: np.zeros(student.conv_channels), None))
        rules.append(Rule(f"{mixer}.D", (), "ones", lambda: np.ones(h), None))
    rules.append(identity("backbone.final_layernorm.weight", "model.norm.weight"))
    if not teacher.tie_word_embeddings:
        rules.append(identity("lm_head.weight"))
    return Mapping(f"llamba/{mixer_init}", teacher, student, rules, dropped)


def _in_proj(student: LlambaConfig, teacher: LlamaConfig, name: str, seed: int):
    """in_proj's rows [x (d_inner) | B (G N) | C (G N) | z (d_inner) | l (H)]: default init, attention's projections
    when given (W_Q, W_K, W_V), z rows 0 so that the gate starts at silu(z_bias) = 1."""
    d_inner, gn, conv = student.d_inner, student.n_qk_heads * student.d_state, student.conv_channels

    def fn(*attention: np.ndarray) -> np.ndarray:
        weight = default_linear(name, (student.in_proj_size, student.hidden_size), seed)
        if attention:
            wq, wk, wv = attention
            kv, heads = teacher.num_key_value_heads, student.n_v_heads
            weight[:d_inner] = repeat_heads(wv, kv, heads)
            weight[d_inner:d_inner + gn] = repeat_heads(wk, kv, heads)
            weight[d_inner + gn:conv] = wq
        weight[conv:conv + d_inner] = 0.0
        return weight
    return fn
