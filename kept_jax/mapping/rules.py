"""A mapping is data: rules `target <- transform(sources)` over HF tensor names, plus explicitly dropped sources.

Rules are evaluated lazily, one target at a time, in float64, so a conversion streams: read the sources of one
rule, compute, cast, write. A rule whose math is independent along one axis of its first source (and its output)
says so, and runs in blocks along it: a 14B model's [vocab, hidden] head never exists in float64 as a whole.
`Mapping.check` proves completeness before any tensor is computed.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Callable, Iterable, Iterator

import numpy as np
from kept_jax.config import ModelConfig
from kept_jax.errors import KeptError


class MappingError(KeptError):
    """A mapping that does not produce every target exactly once or leaves a source unaccounted for."""


@dataclasses.dataclass(frozen=True)
class Rule:
    """`target <- fn(*sources)`. `fn` takes and returns float64 arrays in HF layout.

    `error` is the rule's relative mean-squared error on calibration data (None where it does not apply;
    0.0 for a rule that preserves the model's function exactly); a callable is called with the float64
    `error_sources` (vectors, such as a gain and the beta it drops).

    `block_axis`: `fn` treats slices of its first source along this axis independently, and its output has the
    same axis (the other sources are read whole): the rule then runs one block at a time.
    """

    target: str
    sources: tuple[str, ...]
    transform: str
    fn: Callable[..., np.ndarray]
    error: Callable[..., float] | float | None = 0.0
    error_sources: tuple[str, ...] = ()
    block_axis: int | None = None

    def apply(self, read: Callable[[str], np.ndarray], dtype: np.dtype) -> tuple[np.ndarray, float | None]:
        """The target in `dtype` (float64 math, at most about BLOCK_BYTES of it at a time when blocked) and its
        error. `read` gives a source tensor in its stored dtype."""
        inputs = [read(name) for name in self.sources]
        if self.block_axis is None or not inputs:
            value = np.asarray(self.fn(*(np.asarray(x, np.float64) for x in inputs))).astype(dtype)
        else:
            first, rest = inputs[0], [np.asarray(x, np.float64) for x in inputs[1:]]
            axis, total = self.block_axis, inputs[0].shape[self.block_axis]
            step = max(1, BLOCK_BYTES // (8 * max(1, first.size // max(1, total))))
            value = None
            for start in range(0, total, step):
                rows = (slice(None),) * axis + (slice(start, min(start + step, total)),)
                block = np.asarray(self.fn(first[rows].astype(np.float64), *rest))
                if value is None:
                    value = np.empty(block.shape[:axis] + (total,) + block.shape[axis + 1:], dtype)
                value[rows] = block
        error = self.error
        if callable(error):
            error = error(*(np.asarray(read(name), np.float64) for name in self.error_sources))
        return value, error


BLOCK_BYTES = 32 * 2**20  # float64 working set of a blocked rule


def identity(target: str, source: str | None = None) -> Rule:
    """`target` <- `source` unchanged (the same name when `source` is None)."""
    return Rule(target, (source or target,), "identity", lambda x: x, block_axis=0)


@dataclasses.dataclass
class Mapping:
    """The rules that build a target model from a source model, and the sources dropped on purpose."""

    strategy: str
    source_config: ModelConfig
    target_config: ModelConfig
    rules: list[Rule]
    dropped: dict[str, str]  # source name -> why it is not needed

    def check(self) -> None:
        """Every target tensor produced exactly once; every source tensor used or explicitly dropped."""
        targets = [s.hf_name for s in self.target_config.tensor_table()]
        sources = {s.hf_name for s in self.source_config.tensor_table()}
        produced = collections.Counter(r.target for r in self.rules)
        problems = []
        problems += [f"no rule produces target {t!r}" for t in targets if t not in produced]
        problems += [f"target {t!r} is produced by {n} rules" for t, n in produced.items() if n > 1]
        problems += [f"rule targets {t!r}, which the target model does not have" for t in produced if t not in targets]
        used = {s for r in self.rules for s in r.sources}
        problems += [f"rule reads {s!r}, which the source model does not have" for s in sorted(used - sources)]
        problems += [f"source {s!r} is neither used nor dropped" for s in sorted(sources - used - set(self.dropped))]
        problems += [f"dropped {s!r} is not a source tensor" for s in sorted(set(self.dropped) - sources)]
        if problems:
            shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
            raise MappingError(f"mapping {self.strategy!r} is incomplete: {shown}")

    def ordered_rules(self) -> list[Rule]:
        """Rules in target (HF) order."""
        by_target = {r.target: r for r in self.rules}
        return [by_target[s.hf_name] for s in self.target_config.tensor_table()]

    def params_paths(self, keep: Callable[[str], bool]) -> frozenset[tuple[str, ...]]:
        """The target's params paths whose every HF tensor comes from a rule whose transform `keep` accepts (a
        scanned leaf holds one tensor per layer)."""
        transforms = {r.target: r.transform for r in self.rules}
        accepted: dict[tuple[str, ...], bool] = {}
        for spec in self.target_config.tensor_table():
            path = spec.params_path(self.target_config.scan_layers)
            accepted[path] = accepted.get(path, True) and keep(transforms[spec.hf_name])
        return frozenset(path for path, ok in accepted.items() if ok)

    def shared_with_teacher(self) -> dict[tuple[str, ...], tuple[str, ...]]:
        """Target params path -> source params path, for the target leaves that hold the source's values: copied
        unchanged (under the same name, or another: Llamba's `backbone/...` MLPs are Llama's `model/...` ones), or
        recentered (which leaves a LayerNorm source's function as it was, so the job gives the teacher the
        recentered copies too). Frozen, these student leaves can read the teacher's buffers. A scanned leaf
        qualifies when each of its layers comes from the same layer of one source leaf."""
        source_specs = {s.hf_name: s for s in self.source_config.tensor_table()}
        rules = {r.target: r for r in self.rules}
        found: dict[tuple[str, ...], tuple[str, ...] | None] = {}
        for spec in self.target_config.tensor_table():
            path = spec.params_path(self.target_config.scan_layers)
            rule = rules[spec.hf_name]
            source = None
            if rule.transform == "identity":
                source = source_specs.get(rule.sources[0])
            elif rule.transform.startswith("recenter"):
                source = source_specs.get(spec.hf_name)
            twin = None
            if (source is not None and source.layer == spec.layer and source.hf_shape == spec.hf_shape
                    and source.transpose == spec.transpose):
                twin = source.params_path(self.source_config.scan_layers)
            found[path] = twin if found.get(path, twin) == twin else None  # one layer elsewhere spoils the leaf
        return {path: twin for path, twin in found.items() if twin is not None}

    def materialize(self, read: Callable[[str], np.ndarray],
                    dtype: np.dtype) -> Iterator[tuple[str, np.ndarray, float | None]]:
        """Yields (target name, tensor in `dtype`, rule error), one target at a time, in HF order. `read` gives a
        source tensor in its stored dtype."""
        self.check()
        for rule in self.ordered_rules():
            value, error = rule.apply(read, dtype)
            if not np.isfinite(value).all():
                raise KeptError(f"strategy {self.strategy!r} produced non-finite values in {rule.target}; the "
                                "calibration statistics are degenerate (give more or different --calib text)")
            yield rule.target, value, error

    def table(self, errors: dict[str, float | None] | None = None) -> list[dict]:
        """One row per target: its sources, its transform and its measured error; then the dropped sources."""
        errors = errors or {}
        rows = [
            {"target": r.target, "sources": list(r.sources), "transform": r.transform, "error": errors.get(r.target)}
            for r in self.ordered_rules()
        ]
        rows += [{"target": None, "sources": [s], "transform": f"dropped: {why}", "error": None} for s, why in self.dropped.items()]
        return rows


def copy_mapping(config: ModelConfig) -> Mapping:
    """Every tensor of `config` copied unchanged: a checkpoint written again in its own architecture (a GGUF file
    as a Hugging Face directory)."""
    return Mapping("copy", config, config, [identity(s.hf_name) for s in config.tensor_table()], {})


def format_table(rows: Iterable[dict]) -> str:
    lines = [f"{'target':<48} {'transform':<40} {'rel. error':>10}  sources"]
    for row in rows:
        error = "" if row["error"] is None else f"{row['error']:.2e}"
        lines.append(f"{row['target'] or '-':<48} {row['transform']:<40} {error:>10}  {', '.join(row['sources'])}")
    return "\n".join(lines)
