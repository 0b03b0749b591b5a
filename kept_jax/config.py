"""What every architecture's typed config shares, and reading a Hugging Face `config.json` into the right one.

An architecture is one module in `kept_jax/models/` (docs/design.md); its config class derives from
`ModelConfig` and says everything specific to it: how it reads and writes `config.json`, its HF tensor-name table, its
parameter and FLOP formulas, its logical sharding axes and its Flax model. `kept_jax.models.ARCHITECTURES` maps each
HF `model_type` to its class, and `kept_jax.models.config_from_hf` picks the class from `model_type`
(`bridge.load_config` reads it from a checkpoint). This module imports no architecture: the registry imports them.

The shared fields use one name whatever the HF spelling (Llamba's `d_model` is `hidden_size` here), so that the
layers, the mapping, the bridge and the training engine read any architecture alike. Runtime fields choose how the
same math runs (dtypes, layer scan, remat) and never go into `config.json`.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
from typing import TYPE_CHECKING, Any, ClassVar, Iterable

import ml_dtypes
import numpy as np

from kept_jax.errors import KeptError

if TYPE_CHECKING:
    import flax.linen as nn

    from kept_jax.models.names import TensorSpec

NUMPY_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
DTYPES = tuple(NUMPY_DTYPES)
REMAT_POLICIES = ("none", "full", "save-dots", "save-dots-no-batch")

# How close (difflib's ratio) an unknown config.json key must be to one that changes the math to be taken for its typo.
TYPO_SIMILARITY = 0.85


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """The fields every architecture has, the runtime choices, and the interface each architecture implements."""

    architecture: str  # the HF model_type
    vocab_size: int
    hidden_size: int
    intermediate_size: int  # of the SwiGLU MLP
    num_hidden_layers: int
    rms_norm_eps: float = 1e-5  # the final norm's eps (Orion's LayerNorm eps lives in this same field)
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
    lora_scale: float = 1.0  # alpha / rank; used only when a "lora" collection is passed to apply

    # Where the architecture keeps its parts, and its own logical axes with their default mesh axes.
    embedding_path: ClassVar[tuple[str, ...]]
    hf_embedding_name: ClassVar[str]
    hf_tie_key: ClassVar[str] = "tie_word_embeddings"  # the config.json key of tie_word_embeddings
    model_types: ClassVar[tuple[str, ...]] = ()  # the config.json model_type(s) this class reads
    # config.json keys that identify the architecture when config.json has no model_type (its official writer's).
    layout_keys: ClassVar[frozenset[str]] = frozenset()
    # The official loader reads one `model.safetensors` only: the export is never sharded.
    hf_single_file: ClassVar[bool] = False
    head_path: ClassVar[tuple[str, ...]] = ("lm_head", "kernel")
    logical_axis_rules: ClassVar[dict[str, Any]] = {}

    def __post_init__(self):
        check_positive_ints({k: getattr(self, k) for k in ("vocab_size", "hidden_size", "intermediate_size",
                                                           "num_hidden_layers")})
        if not (self.rms_norm_eps > 0):
            raise KeptError(f"rms_norm_eps must be positive, got {self.rms_norm_eps!r}")
        check_choice("compute_dtype", self.compute_dtype, DTYPES)
        check_choice("param_dtype", self.param_dtype, DTYPES)
        check_choice("dtype", self.dtype, DTYPES)
        check_choice("remat_policy", self.remat_policy, REMAT_POLICIES)

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    # ---- Hugging Face config.json -------------------------------------------------------------

    @classmethod
    def model_type_of(cls, hf: dict[str, Any]) -> str | None:
        """`hf`'s model_type, or, without one, this architecture's when `hf` has its `layout_keys`."""
        model_type = hf.get("model_type")
        if model_type is None and cls.layout_keys and cls.layout_keys <= set(hf):
            return cls.model_types[0]
        return model_type

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any], **runtime: Any) -> "ModelConfig":
        """The config of `hf`, which must be one of this architecture's `model_types` (`model_type_of`).
        `kept_jax.models.config_from_hf` picks the architecture for any config.json."""
        model_type = cls.model_type_of(hf)
        if model_type not in cls.model_types:
            raise KeptError(f"config.json has model_type {model_type!r}; kept_jax reads "
                            f"{', '.join(map(repr, cls.model_types))} here")
        return cls._from_hf(hf, **runtime)

    @classmethod
    def _from_hf(cls, hf: dict[str, Any], **runtime: Any) -> "ModelConfig":
        raise NotImplementedError

    def to_hf_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    # ---- What the rest of kept_jax asks of an architecture -------------------------------------

    @property
    def model_class(self) -> type["nn.Module"]:
        """The Flax module; `kept_jax.models.build_model(config)` is `config.model_class(config)`."""
        raise NotImplementedError

    @property
    def block_class(self) -> type["nn.Module"]:
        """One layer of the stack: `block(config).apply({"params": layer}, x, *self.block_args(tokens))` is
        `(x_out, None)`, with `layer` one slice of the stacked `layers` params."""
        raise NotImplementedError

    @property
    def block_classes(self) -> tuple[type["nn.Module"], ...]:
        """Each layer's block, in order: `block_class` for every layer, unless the architecture mixes kinds of layer
        (a hybrid's attention and Mamba-2 layers). Every block takes the same `block_args`."""
        return (self.block_class,) * self.num_hidden_layers

    @property
    def layer_kinds(self) -> tuple[str, ...]:
        """What mixes the sequence in each layer (`attention`, `discrete-mamba2`, `mamba2`): a distillation
        aligns the student's layers whose kind differs from the teacher's (MOHAWK's stages 1 and 2)."""
        raise NotImplementedError

    @property
    def logit_divisor(self) -> float:
        """What the head's logits are divided by (GraniteMoeHybrid's `logits_scaling`); 1 for the others. The
        chunked losses compute logits from `models.head_kernel`, which folds it in."""
        return 1.0

    def block_args(self, tokens: Any) -> tuple:
        """The inputs every block takes besides the hidden state (rotary tables, say) for `tokens` [b, T]."""
        return ()

    def tensor_table(self) -> list["TensorSpec"]:
        """Every HF tensor the config implies, in HF order."""
        raise NotImplementedError

    def empty_cache(self, batch: int, length: int) -> tuple:
        """Generation: each layer's state at the start of `batch` sequences of up to `length` tokens (a KV cache,
        a recurrent state). The block's `extend(x, layer_cache, positions, lengths)` reads and returns it, and the
        model's `embed(tokens)` and `head(x)` are what comes before and after the layers (`kept_jax.decoding`)."""
        raise NotImplementedError

    @property
    def max_position_embeddings(self) -> int | None:
        """The longest sequence the architecture was built for, or None when it has no such limit."""
        raise NotImplementedError

    def hf_common_json(self) -> dict[str, Any]:
        """The config.json fields Transformers' architectures write alike: tying, the storage dtype (under both of
        its names) and the special token ids (`hf_common_fields` reads them back)."""
        return {"tie_word_embeddings": self.tie_word_embeddings, "dtype": self.dtype, "torch_dtype": self.dtype,
                "bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_id,
                "pad_token_id": self.pad_token_id}

    def layout_flags(self) -> dict[str, Any]:
        """The config.json fields that decide which tensors exist, by their config.json names (import errors)."""
        return {self.hf_tie_key: self.tie_word_embeddings, "mlp_bias": self.mlp_bias}

    def describe(self) -> str:
        """One line of the shape, for plans and reports."""
        tied = "tied" if self.tie_word_embeddings else "untied"
        return (f"{self.architecture}, {self.num_hidden_layers} layers, hidden {self.hidden_size}, "
                f"MLP {self.intermediate_size}, vocab {self.vocab_size}, {tied}")

    @property
    def padded_vocab_size(self) -> int:
        """The rows of the embedding and the head (Llamba pads the vocabulary)."""
        return self.vocab_size

    def num_params(self) -> int:
        raise NotImplementedError

    def layer_matmul_params(self) -> tuple[int, ...]:
        """Each layer's parameters in linear layers (its mixer's and its MLP's)."""
        raise NotImplementedError

    def layer_mixing_flops(self, seq_len: int) -> tuple[float, ...]:
        """Each layer's forward FLOPs per token of sequence mixing beyond the weight matmuls (attention's QK^T and
        PV, a state-space scan)."""
        raise NotImplementedError

    def matmul_params(self) -> int:
        """Parameters of every linear layer and the output head (the embedding lookup is not a matmul)."""
        return sum(self.layer_matmul_params()) + self.hidden_size * self.padded_vocab_size

    def mixing_flops_per_token(self, seq_len: int) -> float:
        return sum(self.layer_mixing_flops(seq_len))


def replaced_layers(teacher: ModelConfig, student: ModelConfig) -> tuple[int, ...]:
    """The layers whose sequence mixer the student replaced (a kind other than the teacher's), in order: every layer
    of a Llamba, the Mamba-2 layers of a hybrid. MOHAWK's stages 1 and 2 align these."""
    return tuple(i for i, (t, s) in enumerate(zip(teacher.layer_kinds, student.layer_kinds)) if t != s)


def check_positive_ints(values: dict[str, Any]) -> None:
    """Each value a positive int (not a bool); the error names the key as given."""
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise KeptError(f"{name} must be a positive integer, got {value!r}")


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        close = difflib.get_close_matches(str(value), choices, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise KeptError(f"{name} must be one of {', '.join(choices)}; got {value!r}{hint}")


def check_hf_keys(hf: dict[str, Any], math_keys: Iterable[str], where: str = "config.json") -> None:
    """The rule for config.json keys: the keys that change the math are the ones the reference implementation reads
    (`math_keys`: the architecture reads each, or refuses a value it does not implement); every other key is only
    metadata to that implementation (names, ids of other special tokens, what a tool adds), and is ignored as it
    ignores it. An unknown key that looks like a misspelt math key is refused, naming that key: the typo would
    otherwise fall back to a default without a word."""
    math_keys = sorted(math_keys)
    typos = []
    for key in sorted(set(hf) - set(math_keys)):
        close = difflib.get_close_matches(key, math_keys, n=1, cutoff=TYPO_SIMILARITY)
        if close:
            typos.append(f"{key!r} (did you mean {close[0]!r}?)")
    if typos:
        raise KeptError(f"{where} has {', '.join(typos)}: a misspelt key would leave the setting it means at its "
                        "default; spell it as the model's code reads it")


def hf_dtype(hf: dict[str, Any]) -> str:
    return str(hf.get("dtype") or hf.get("torch_dtype") or "float32").removeprefix("torch.")


def hf_common_fields(hf: dict[str, Any]) -> dict[str, Any]:
    """The fields every architecture reads alike from config.json: the storage dtype and the special token ids."""
    return {"dtype": hf_dtype(hf), **{key: hf.get(key) for key in ("bos_token_id", "eos_token_id", "pad_token_id")}}


def read_config_json(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            hf = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise KeptError(f"{path} is not valid JSON ({e}); re-download or re-save the checkpoint") from None
    if not isinstance(hf, dict):
        raise KeptError(f"{path} must hold a JSON object")
    return hf
