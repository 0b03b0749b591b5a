"""The training job's config: YAML validated against typed dataclasses, with dotted `key=value` overrides.

Unknown keys are errors that name the closest valid key; values are parsed as YAML (`train.steps=200`,
`trainable=norms`, `lora.targets=[q_proj,v_proj]`) and checked against the field's type.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from typing import Any, Literal

import yaml

from kept_jax.errors import KeptError
from kept_jax.xkd.losses import LossConfig

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
DEFAULT_CONFIG = os.path.join(CONFIG_DIR, "tiny.yaml")
TRAINABLE_SETS = ("all", "norms", "norms+biases", "lora")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass(frozen=True)
class SourceConfig:
    path: str  # a .jsonl, .parquet or text file, or a glob of them; "embedded" is the shipped corpus
    field: str = "text"  # the JSONL field or Parquet column that holds the text
    weight: float = 1.0  # mixing weight among the training sources


Sources = typing.Union[str, tuple[SourceConfig, ...]]


@dataclasses.dataclass(frozen=True)
class DataConfig:
    train: Sources = "embedded"  # a path or glob (field "text"), or a list of sources with fields and weights
    eval: Sources = "embedded"  # held-out text for calibration then evaluation; "split": hold out training documents
    eval_fraction: float = 0.01  # with eval: split, the share of training documents held out (by the seed)
    seq_len: int = 128
    batch_size: int = 8
    grad_accum: int = 1
    eval_tokens: int = 16384
    calib_tokens: int = 8192
    beyond_context: bool = False  # allow seq_len past the source's max_position_embeddings (its untrained positions)

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.grad_accum * self.seq_len


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 200
    lr: float = 1e-3
    warmup: int = 20
    weight_decay: float = 0.0
    clip: float = 1.0
    seed: int = 0
    log_every: int = 10
    eval_every: int = 0  # held-out evaluation every N steps (0: only before and after training)


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    every: int = 100  # save every N steps (and on SIGTERM/SIGINT, and at the end)
    keep: int = 3  # the last N complete checkpoints are kept
    async_save: bool = True  # write in a background thread while training goes on


@dataclasses.dataclass(frozen=True)
class ChatConfig:
    """Questions the teacher and the student answer (greedy, with the teacher's chat template) before training and
    after the export, side by side in the summary."""

    questions: tuple[str, ...] = ()
    max_new_tokens: int = 48


Rule = typing.Union[str, tuple[str, ...], None]


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    data: int = -1  # -1: every device the other axes leave
    fsdp: int = 1
    tensor: int = 1
    rules: dict[str, Rule] = dataclasses.field(default_factory=dict)  # logical axis -> mesh axes, over the defaults
    teacher_rules: dict[str, Rule] = dataclasses.field(default_factory=dict)  # the teacher's, over `rules`

    def devices(self) -> int:
        """The devices the sizes name: their product, the -1 entry counted as one (a dry run's default)."""
        return math.prod(s for s in (self.data, self.fsdp, self.tensor) if s != -1)


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = LORA_TARGETS


@dataclasses.dataclass(frozen=True)
class PrecisionConfig:
    compute: Literal["float32", "bfloat16"] = "float32"
    params: Literal["float32", "bfloat16"] = "float32"  # frozen weights; trainable ones keep an fp32 master copy
    export: Literal["float32", "bfloat16"] = "bfloat16"


@dataclasses.dataclass(frozen=True)
class ModelRuntime:
    remat: Literal["none", "full", "save-dots", "save-dots-no-batch"] = "none"
    scan_layers: bool = True
    attention_impl: Literal["xla", "cudnn"] = "xla"


@dataclasses.dataclass(frozen=True)
class StageConfig:
    """One MOHAWK stage: its objective, token budget, peak learning rate and trainable set, trained with AdamW
    (0.9, 0.95) on a warmup-stable-decay schedule that restarts with the stage."""

    name: str
    objective: Literal["matrix", "hidden", "kl"]  # 1: matrix orientation, 2: hidden-state alignment, 3: logits KL
    tokens: int  # the stage's budget; steps = ceil(tokens / data.tokens_per_step)
    lr: float  # the peak learning rate
    trainable: str | tuple[str, ...] = "all"  # a named set, or regular expressions over parameter paths
    warmup: float = 0.1  # the fraction of the stage's steps that warms up linearly from 0
    decay: float = 0.1  # the fraction at the end that decays linearly to 1e-8
    weight_decay: float = 0.1  # decoupled, on the leaves with a gradient (kept_jax.stages.decay_where_updated)
    clip: float = 0.0  # the global gradient norm's bound; 0: not clipped (the reference's)


@dataclasses.dataclass(frozen=True)
class JobConfig:
    source: str = "kept_jax/assets/tiny-orion"
    recipe: Literal["kept", "mohawk"] = "kept"  # kept: Orion -> Llama; mohawk: (Orion ->) Llama -> Llamba or hybrid
    opm: Literal["copy", "lsq", "center", "center-lsq", "absorb", "exact"] = "absorb"
    student: Literal["llamba", "hybrid"] = "llamba"  # mohawk: a Llamba, or a Mamba-2/attention hybrid (docs/hybrid.md)
    # mohawk: how each new mixer starts: a Llamba's mohawk or attention, a hybrid's attention or mamba2
    mixer_init: Literal["mohawk", "attention", "mamba2"] = "mohawk"
    # hybrid: the layers that keep attention: a list (3,9,14 or [3, 9, 14]), every:K, all or none
    attention_layers: str | int | tuple[int, ...] = "every:4"
    mamba_groups: int = 1  # hybrid: B/C groups of the Mamba-2 mixers
    student_config: str = ""  # mohawk: the student's config.json (default: derived from the teacher)
    stages: tuple[StageConfig, ...] = ()  # mohawk: the stages in order (kept trains once, with train.* and loss.*)
    trainable: str | tuple[str, ...] = "norms"  # a named set, or regular expressions over parameter paths
    verify: bool = True
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    loss: LossConfig = LossConfig()
    lora: LoraConfig = LoraConfig()
    precision: PrecisionConfig = PrecisionConfig()
    model: ModelRuntime = ModelRuntime()
    checkpoint: CheckpointConfig = CheckpointConfig()
    mesh: MeshConfig = MeshConfig()
    chat: ChatConfig = ChatConfig()
    source_config: str = ""  # the source's config.json when `source` is not on this machine (dry runs only)

    def runtime(self, config_class=None) -> dict:
        """The ModelConfig runtime fields this job sets (dtypes, layer scan, remat, attention kernel), those of
        `config_class` only when given (a Llamba has no attention kernel)."""
        fields = dict(compute_dtype=self.precision.compute, param_dtype=self.precision.params,
                      scan_layers=self.model.scan_layers, remat_policy=self.model.remat,
                      attention_impl=self.model.attention_impl)
        if config_class is not None:
            names = {f.name for f in dataclasses.fields(config_class)}
            fields = {k: v for k, v in fields.items() if k in names}
        return fields

    def __post_init__(self):
        check_ranges(self)
        _check_trainable("trainable", self.trainable)
        if self.recipe == "kept" and self.stages:
            raise KeptError("stages: are for recipe: mohawk; the kept recipe trains once, with train.* and loss.*")
        if self.recipe == "mohawk":
            if not self.stages:
                raise KeptError("recipe: mohawk needs a stages: list (see configs/tiny-llamba.yaml)")
            for i, stage in enumerate(self.stages):
                where = f"stages[{i}] ({stage.name})"
                _check_trainable(f"{where}.trainable", stage.trainable)
                if stage.trainable == "lora":
                    raise KeptError(f"{where}.trainable: lora is for the kept recipe")
                if stage.warmup + stage.decay > 1:
                    raise KeptError(f"{where}: warmup and decay are fractions of the stage with warmup + decay <= 1")
            names = [s.name for s in self.stages]
            if len(set(names)) != len(names):
                raise KeptError(f"stage names must differ; got {names}")
        if self.recipe == "kept" and self.train.warmup > self.train.steps:
            raise KeptError(f"train.warmup ({self.train.warmup}) is longer than train.steps ({self.train.steps}); "
                            "the learning rate would never reach train.lr. Lower train.warmup")
        if self.data.train == "split" or isinstance(self.data.eval, tuple) and any(
                s.path == "split" for s in self.data.eval):
            raise KeptError("'split' is a value for data.eval alone: it holds out part of data.train")
        for where, sources in (("data.train", self.data.train), ("data.eval", self.data.eval)):
            if isinstance(sources, tuple) and not sources:
                raise KeptError(f"{where} is an empty list; give at least one source")
        bad = [t for t in self.lora.targets if t not in LORA_TARGETS]
        if bad:
            raise KeptError(f"lora.targets has {bad[0]!r}; choose from {', '.join(LORA_TARGETS)}")
        if not any((self.loss.forward_kl, self.loss.reverse_kl, self.loss.jsd, self.loss.ce)):
            raise KeptError("every loss weight is zero; set loss.forward_kl (the default) or another term")


INF = float("inf")
# Every numeric config key and its valid range: (low, high, low excluded). Values must also be finite. A key not
# listed here is refused by tests/test_train_config.py, so a new numeric key cannot go unchecked.
RANGES: dict[str, tuple[float, float, bool]] = {
    "data.eval_fraction": (0, 1, True), "data.seq_len": (2, INF, False), "data.batch_size": (1, INF, False),
    "data.grad_accum": (1, INF, False), "data.eval_tokens": (1, INF, False), "data.calib_tokens": (1, INF, False),
    "train.steps": (1, INF, False), "train.lr": (0, INF, True), "train.warmup": (0, INF, False),
    "train.weight_decay": (0, INF, False), "train.clip": (0, INF, True), "train.seed": (0, 2**32 - 1, False),
    "train.log_every": (1, INF, False), "train.eval_every": (0, INF, False),
    "checkpoint.every": (1, INF, False), "checkpoint.keep": (1, INF, False),
    "mesh.data": (-1, INF, False), "mesh.fsdp": (1, INF, False), "mesh.tensor": (1, INF, False),
    "lora.rank": (1, INF, False), "lora.alpha": (0, INF, True),
    "loss.forward_kl": (0, INF, False), "loss.reverse_kl": (0, INF, False), "loss.jsd": (0, INF, False),
    "loss.ce": (0, INF, False), "loss.temperature": (0, INF, True), "loss.chunk_size": (1, INF, False),
    "stages.tokens": (1, INF, False), "stages.lr": (0, INF, True), "stages.warmup": (0, 1, False),
    "stages.decay": (0, 1, False), "stages.weight_decay": (0, INF, False), "stages.clip": (0, INF, False),
    "data.train.weight": (0, INF, True), "data.eval.weight": (0, INF, True), "chat.max_new_tokens": (1, INF, False),
    "mamba_groups": (1, INF, False), "attention_layers": (0, INF, False),
}


def numeric_fields(node, prefix: str = ""):
    """(range key, where, value) of every numeric field under a config dataclass (lists of sections included)."""
    for field in dataclasses.fields(node):
        value = getattr(node, field.name)
        key = f"{prefix}{field.name}"
        if dataclasses.is_dataclass(value):
            yield from numeric_fields(value, key + ".")
        elif isinstance(value, tuple) and value and all(dataclasses.is_dataclass(v) for v in value):
            for i, item in enumerate(value):
                for range_key, where, number in numeric_fields(item, key + "."):
                    yield range_key, where.replace(f"{key}.", f"{key}[{i}].", 1), number
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            yield key, key, value


def check_ranges(cfg) -> None:
    """One line naming the key, its value and the range it must be in; before anything runs."""
    for key, where, value in numeric_fields(cfg):
        low, high, low_open = RANGES[key]
        if not (math.isfinite(value) and (low < value if low_open else low <= value) and value <= high):
            lower = f"> {low:g}" if low_open else f">= {low:g}"
            bound = lower if high == INF else f"{lower} and <= {high:g}"
            raise KeptError(f"{where} = {value!r} is out of range: it must be finite and {bound}")


def find_config_json(path: str) -> str | None:
    """The config.json a job config names: a file, or a directory holding one; relative to the working directory,
    or else to the repository (so `configs/models/...` works from anywhere). None when there is none."""
    for candidate in (path, os.path.join(os.path.dirname(CONFIG_DIR), path)):
        if os.path.isdir(candidate):
            candidate = os.path.join(candidate, "config.json")
        if os.path.isfile(candidate):
            return candidate
    return None


def _check_trainable(where: str, spec) -> None:
    if isinstance(spec, str) and spec not in TRAINABLE_SETS:
        close = difflib.get_close_matches(spec, TRAINABLE_SETS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise KeptError(f"{where} must be one of {', '.join(TRAINABLE_SETS)} or a list of path patterns; "
                        f"got {spec!r}{hint}")


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if tp is SourceConfig and isinstance(value, str):  # a bare path in a list of sources
            value = {"path": value}
        if not isinstance(value, dict):
            raise KeptError(f"{where} must be a mapping of its fields, got {value!r}")
        return _build(tp, value, where + ".")
    if origin is Literal:
        if value not in typing.get_args(tp):
            close = difflib.get_close_matches(str(value), [str(a) for a in typing.get_args(tp)], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise KeptError(f"{where} must be one of {', '.join(map(str, typing.get_args(tp)))}; got {value!r}{hint}")
        return value
    if origin in (typing.Union, types.UnionType):
        errors = {}
        for option in typing.get_args(tp):
            try:
                return _coerce(value, option, where)
            except KeptError as e:
                errors[option] = e
        for option, error in errors.items():  # a list or mapping: the error of the option of that kind says most
            if isinstance(value, list) and typing.get_origin(option) is tuple:
                raise error
        raise KeptError(f"{where}: {value!r} fits none of {' | '.join(_type_name(a) for a in typing.get_args(tp))}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise KeptError(f"{where} must be a list, got {value!r}")
        return tuple(_coerce(v, typing.get_args(tp)[0], f"{where}[{i}]") for i, v in enumerate(value))
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if tp is type(None) and value is None:
        return None
    if origin is dict:
        if not isinstance(value, dict):
            raise KeptError(f"{where} must be a mapping, got {value!r}")
        return {str(k): _coerce(v, typing.get_args(tp)[1], f"{where}.{k}") for k, v in value.items()}
    if tp is bool and isinstance(value, bool) or tp in (int, str) and type(value) is tp:
        return value
    raise KeptError(f"{where} must be {_type_name(tp)}, got {value!r}")


def _build(cls, values: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean {prefix}{close[0]}?" if close else f"; valid keys: {', '.join(names)}"
            raise KeptError(f"unknown config key {prefix}{key}{hint}")
        kwargs[key] = _coerce(value, hints[key], prefix + key)
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    for key in keys[:-1]:
        node = tree.setdefault(key, {})
        if not isinstance(node, dict):
            raise KeptError(f"override {dotted}: {key} is not a section")
        tree = node
    tree[keys[-1]] = value


def load_config(path: str | None = None, overrides: list[str] = ()) -> tuple[JobConfig, dict]:
    """The validated config and the raw dict it came from (YAML file, then `key=value` overrides)."""
    path = path or DEFAULT_CONFIG
    if not os.path.isfile(path):
        raise KeptError(f"config file {path!r} does not exist; the configs shipped are in {CONFIG_DIR}")
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        raise KeptError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise KeptError(f"{path} must hold a mapping of config keys")
    for item in overrides:
        if "=" not in item:
            raise KeptError(f"override {item!r} must look like key=value, e.g. train.steps=200")
        key, text = item.split("=", 1)
        try:
            value = yaml.safe_load(text) if text else ""
        except yaml.YAMLError:
            value = text
        _set_dotted(raw, key.strip(), value)
    cfg = _build(JobConfig, raw)
    if cfg.recipe == "mohawk" and {"steps", "warmup", "lr", "weight_decay", "clip"} & set(raw.get("train") or {}):
        raise KeptError("recipe: mohawk takes each stage's tokens, lr, weight_decay and clip from stages:, not "
                        "train.steps/warmup/lr/weight_decay/clip; remove those keys")
    hybrid_keys = {"attention_layers", "mamba_groups"} & set(raw)
    if hybrid_keys and not (cfg.recipe == "mohawk" and cfg.student == "hybrid"):
        raise KeptError(f"{', '.join(sorted(hybrid_keys))} shape a hybrid student; set recipe: mohawk and "
                        "student: hybrid, or remove them")
    if "attention_layers" in raw and cfg.student_config:
        raise KeptError("attention_layers and student_config both say which layers keep attention (its layer_types); "
                        "give one of them")
    if cfg.recipe == "mohawk":
        from kept_jax.mapping.students import check_mixer_init

        check_mixer_init(cfg.student, cfg.mixer_init)
    if cfg.recipe == "mohawk" and {"trainable", "lora"} & set(raw):
        raise KeptError("recipe: mohawk trains each stage's own set (stages[i].trainable); remove the top-level "
                        "trainable and lora keys, which are the kept recipe's")
    return cfg, raw
