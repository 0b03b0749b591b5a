"""One typed model config for Orion and Llama, read from and written to Hugging Face `config.json`.

The architecture fields mirror HF's. The runtime fields (compute/param dtype, layer scan, remat policy,
attention implementation) choose how the same math runs; they never go into `config.json`.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
from typing import Any

from kept_jax.errors import KeptError

# Per architecture: the norm at every norm site and the HF class names written on export.
ARCHITECTURES: dict[str, dict[str, str]] = {
    "llama": {"norm": "rmsnorm", "hf_architecture": "LlamaForCausalLM"},
    "orion": {"norm": "layernorm", "hf_architecture": "OrionForCausalLM"},
}
ROPE_TYPES = ("default", "linear", "dynamic", "llama3")
REMAT_POLICIES = ("none", "full", "save-dots", "save-dots-no-batch")
ATTENTION_IMPLS = ("xla", "cudnn")
DTYPES = ("float32", "bfloat16", "float16")

# config.json keys that only describe the checkpoint or HF runtime behaviour, never the forward math.
HARMLESS_HF_KEYS = frozenset(
    """
    architectures auto_map transformers_version _name_or_path model_type use_cache initializer_range
    output_hidden_states output_attentions return_dict chunk_size_feed_forward is_encoder_decoder
    id2label label2id problem_type tokenizer_class torchscript pruned_heads tie_encoder_decoder
    is_decoder add_cross_attention cross_attention_hidden_size finetuning_task task_specific_params
    prefix sep_token_id decoder_start_token_id max_length min_length do_sample early_stopping num_beams
    num_beam_groups diversity_penalty temperature top_k top_p typical_p repetition_penalty
    length_penalty no_repeat_ngram_size encoder_no_repeat_ngram_size bad_words_ids
    num_return_sequences output_scores return_dict_in_generate forced_bos_token_id
    forced_eos_token_id remove_invalid_values exponential_decay_length_penalty suppress_tokens
    begin_suppress_tokens tf_legacy_loss use_bfloat16 output_router_logits
    max_sequence_length pretraining_tp attention_dropout hidden_dropout dropout
    """.split()
)
# Keys that change the math; kept_jax supports them only at the listed values.
FIXED_HF_KEYS: dict[str, tuple[Any, ...]] = {
    "hidden_act": ("silu",),
    "partial_rotary_factor": (1.0, None),
    "sliding_window": (None,),
    "use_sliding_window": (False, None),
}
# Keys this module reads into fields.
READ_HF_KEYS = frozenset(
    """
    vocab_size hidden_size intermediate_size num_hidden_layers num_attention_heads num_key_value_heads
    head_dim max_position_embeddings rms_norm_eps rope_theta rope_scaling rope_parameters
    original_max_position_embeddings attention_bias mlp_bias tie_word_embeddings torch_dtype dtype
    bos_token_id eos_token_id pad_token_id
    """.split()
)


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters, as HF's `rope_parameters` describes them."""

    type: str = "default"
    theta: float = 10000.0
    factor: float = 1.0
    # llama3 only.
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None
    original_max_position_embeddings: int | None = None

    def __post_init__(self):
        if self.type not in ROPE_TYPES:
            raise KeptError(
                f"unsupported rope type {self.type!r}; kept_jax supports {', '.join(ROPE_TYPES)}"
            )
        if not (self.theta > 0 and math.isfinite(self.theta)):
            raise KeptError(f"rope_theta must be a positive number, got {self.theta!r}")
        if self.type != "default" and not self.factor > 0:
            raise KeptError(f"rope type {self.type!r} needs a positive 'factor', got {self.factor!r}")
        if self.type == "llama3":
            missing = [
                k
                for k in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
                if getattr(self, k) is None
            ]
            if missing:
                raise KeptError(f"rope type 'llama3' needs {', '.join(missing)} in rope_parameters")
            if self.high_freq_factor == self.low_freq_factor:
                raise KeptError("rope type 'llama3' needs high_freq_factor != low_freq_factor")

    def to_hf(self) -> dict[str, Any]:
        """The v5 `rope_parameters` dict."""
        out: dict[str, Any] = {"rope_type": self.type, "rope_theta": self.theta}
        if self.type != "default":
            out["factor"] = self.factor
        if self.type == "llama3":
            out["low_freq_factor"] = self.low_freq_factor
            out["high_freq_factor"] = self.high_freq_factor
            out["original_max_position_embeddings"] = self.original_max_position_embeddings
        return out


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture (from `config.json`) plus runtime choices (not written to `config.json`)."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-5  # Orion's LayerNorm eps lives in this same field.
    rope: RopeConfig = RopeConfig()
    attention_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    dtype: str = "float32"  # the checkpoint's storage dtype
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    # Runtime.
    compute_dtype: str = "float32"
    param_dtype: str = "float32"
    scan_layers: bool = True
    remat_policy: str = "none"
    attention_impl: str = "xla"
    lora_scale: float = 1.0  # alpha / rank; used only when a "lora" collection is passed to apply

    def __post_init__(self):
        if self.architecture not in ARCHITECTURES:
            raise KeptError(
                f"unsupported architecture {self.architecture!r}; kept_jax supports {', '.join(ARCHITECTURES)}"
            )
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "max_position_embeddings",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise KeptError(f"{name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise KeptError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if not (self.rms_norm_eps > 0):
            raise KeptError(f"rms_norm_eps must be positive, got {self.rms_norm_eps!r}")
        _check_choice("compute_dtype", self.compute_dtype, DTYPES)
        _check_choice("param_dtype", self.param_dtype, DTYPES)
        _check_choice("dtype", self.dtype, DTYPES)
        _check_choice("remat_policy", self.remat_policy, REMAT_POLICIES)
        _check_choice("attention_impl", self.attention_impl, ATTENTION_IMPLS)

    @property
    def norm(self) -> str:
        return ARCHITECTURES[self.architecture]["norm"]

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def num_params(self) -> int:
        d, f, v, l = self.hidden_size, self.intermediate_size, self.vocab_size, self.num_hidden_layers
        q, kv = self.num_attention_heads * self.head_dim, self.num_key_value_heads * self.head_dim
        norm = d * (2 if self.norm == "layernorm" else 1)
        attn = d * (q + 2 * kv) + q * d + (q + 2 * kv + d if self.attention_bias else 0)
        mlp = 3 * d * f + (2 * f + d if self.mlp_bias else 0)
        head = 0 if self.tie_word_embeddings else d * v
        return v * d + l * (attn + mlp + 2 * norm) + norm + head

    # ---- Hugging Face config.json -------------------------------------------------------------

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any], **runtime: Any) -> "ModelConfig":
        """Reads an HF `config.json` dict; rejects anything that would change the math unnoticed."""
        model_type = hf.get("model_type")
        if model_type not in ARCHITECTURES:
            raise KeptError(
                f"config.json has model_type {model_type!r}; kept_jax reads {', '.join(map(repr, ARCHITECTURES))}"
            )
        unknown = sorted(set(hf) - HARMLESS_HF_KEYS - READ_HF_KEYS - set(FIXED_HF_KEYS))
        if unknown:
            known = sorted(HARMLESS_HF_KEYS | READ_HF_KEYS | set(FIXED_HF_KEYS))
            hints = []
            for key in unknown:
                close = difflib.get_close_matches(key, known, n=1)
                hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            raise KeptError(
                f"config.json has attribute(s) kept_jax does not know: {', '.join(hints)}. They may change the "
                "model's math, so the checkpoint is refused; remove them if they are only metadata"
            )
        for key, allowed in FIXED_HF_KEYS.items():
            if key in hf and hf[key] not in allowed:
                raise KeptError(
                    f"config.json sets {key}={hf[key]!r}; kept_jax supports only {' or '.join(map(repr, allowed))}"
                )
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            if key not in hf:
                raise KeptError(f"config.json is missing the required field {key!r}")

        heads = hf["num_attention_heads"]
        head_dim = hf.get("head_dim")
        if head_dim is None:
            if hf["hidden_size"] % heads:
                raise KeptError(
                    f"hidden_size ({hf['hidden_size']}) is not divisible by num_attention_heads ({heads}); "
                    "set head_dim explicitly in config.json"
                )
            head_dim = hf["hidden_size"] // heads
        dtype = hf.get("dtype") or hf.get("torch_dtype") or "float32"
        return cls(
            architecture=model_type,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=hf.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            max_position_embeddings=hf.get("max_position_embeddings", 4096),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-5 if model_type == "orion" else 1e-6)),
            rope=_rope_from_hf(hf),
            attention_bias=bool(hf.get("attention_bias", False)),
            mlp_bias=bool(hf.get("mlp_bias", False)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            dtype=str(dtype).removeprefix("torch."),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=hf.get("eos_token_id"),
            pad_token_id=hf.get("pad_token_id"),
            **runtime,
        )

    def to_hf_dict(self) -> dict[str, Any]:
        """The HF `config.json` dict, with rope settings in both the v5 and the older form."""
        hf: dict[str, Any] = {
            "architectures": [ARCHITECTURES[self.architecture]["hf_architecture"]],
            "model_type": self.architecture,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_parameters": self.rope.to_hf(),
            "rope_theta": self.rope.theta,
            "rope_scaling": None if self.rope.type == "default" else self.rope.to_hf(),
            "attention_bias": self.attention_bias,
            "mlp_bias": self.mlp_bias,
            "tie_word_embeddings": self.tie_word_embeddings,
            "dtype": self.dtype,
            "torch_dtype": self.dtype,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
        }
        if self.rope.type == "default":
            del hf["rope_scaling"]
        return hf


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        close = difflib.get_close_matches(str(value), choices, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise KeptError(f"{name} must be one of {', '.join(choices)}; got {value!r}{hint}")


def _rope_from_hf(hf: dict[str, Any]) -> RopeConfig:
    """Reads v5 `rope_parameters` and/or the older `rope_theta` + `rope_scaling`; both must agree."""
    v5 = hf.get("rope_parameters")
    old_scaling = hf.get("rope_scaling")
    old_theta = hf.get("rope_theta")
    if v5 is not None and not isinstance(v5, dict):
        raise KeptError(f"config.json rope_parameters must be an object, got {v5!r}")
    if old_scaling is not None and not isinstance(old_scaling, dict):
        raise KeptError(f"config.json rope_scaling must be an object or null, got {old_scaling!r}")
    if v5 and any(isinstance(v, dict) for v in v5.values()):
        raise KeptError("config.json has per-layer-type rope_parameters; kept_jax supports one rope for all layers")

    params: dict[str, Any] = {}
    if old_scaling:
        params.update(old_scaling)
    if old_theta is not None:
        params["rope_theta"] = old_theta
    if v5:
        for key, value in v5.items():
            if key in params and key not in ("type", "rope_type") and params[key] != value:
                raise KeptError(
                    f"config.json disagrees with itself: rope_parameters.{key}={value!r} but the older "
                    f"rope_theta/rope_scaling form says {params[key]!r}; make them agree"
                )
        params.update(v5)
    rope_type = params.get("rope_type") or params.get("type") or "default"
    old_type = (old_scaling or {}).get("rope_type") or (old_scaling or {}).get("type")
    if v5 and old_type and rope_type != old_type:
        raise KeptError(
            f"config.json disagrees with itself: rope_parameters says rope type {rope_type!r} but rope_scaling "
            f"says {old_type!r}; make them agree"
        )
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise KeptError("partial_rotary_factor != 1 is not supported by kept_jax")
    if params.get("attention_factor", 1.0) not in (1.0, None):
        raise KeptError(f"rope attention_factor != 1 is not supported for rope type {rope_type!r}")
    original = params.get("original_max_position_embeddings", hf.get("original_max_position_embeddings"))
    if rope_type == "llama3" and original is None:
        original = hf.get("max_position_embeddings")  # HF's own fallback
    return RopeConfig(
        type=rope_type,
        theta=float(params.get("rope_theta", 10000.0)),
        factor=float(params.get("factor", 1.0)),
        low_freq_factor=params.get("low_freq_factor"),
        high_freq_factor=params.get("high_freq_factor"),
        original_max_position_embeddings=original,
    )


def load_hf_config(model_dir: str | os.PathLike, **runtime: Any) -> ModelConfig:
    """Reads `<model_dir>/config.json` into a ModelConfig."""
    if not os.path.isdir(model_dir):
        raise KeptError(f"model directory {str(model_dir)!r} does not exist; pass the path of a Hugging Face checkpoint")
    path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(path):
        raise KeptError(
            f"{str(model_dir)!r} has no config.json; pass a Hugging Face checkpoint directory (it holds config.json "
            "and the weights)"
        )
    try:
        with open(path, encoding="utf-8") as f:
            hf = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise KeptError(f"{path} is not valid JSON ({e}); re-download or re-save the checkpoint") from None
    if not isinstance(hf, dict):
        raise KeptError(f"{path} must hold a JSON object")
    return ModelConfig.from_hf_dict(hf, **runtime)
