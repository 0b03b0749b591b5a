"""The table between HF state-dict names and kept_jax parameter paths: its row type and the helpers that build rows.

Each architecture writes its own table (`ModelConfig.tensor_table`); import, export and the mapping layer read it.
"""

from __future__ import annotations

import dataclasses
import re


# Buffers HF checkpoints may carry that are not parameters; skipped on import and listed in the report.
HARMLESS_BUFFERS = (
    re.compile(r"(^|\.)rotary_emb\.inv_freq$"),
    re.compile(r"(^|\.)rotary_emb\.(cos|sin)_cached$"),
)


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One HF tensor: its name, its HF shape, where it lives in the params tree and whether it is transposed.

    `path` is the scanned path (layers stacked on a leading axis); `layer` is the layer index or None. `transpose`:
    the params array is the HF tensor with its axes reversed (a linear weight [out, in] is a kernel [in, out]; a
    depthwise conv weight [C, 1, K] is [K, 1, C]).
    """

    hf_name: str
    hf_shape: tuple[int, ...]
    path: tuple[str, ...]
    layer: int | None
    transpose: bool

    def params_path(self, scan_layers: bool) -> tuple[str, ...]:
        if self.layer is None or scan_layers:
            return self.path
        return self.path[:2] + (str(self.layer),) + self.path[2:]


def linear_specs(prefix, path, layer, d_in, d_out, bias):
    """A linear layer: HF weight [out, in] is kernel [in, out] here, and its optional bias."""
    yield TensorSpec(f"{prefix}.weight", (d_out, d_in), path + ("kernel",), layer, True)
    if bias:
        yield TensorSpec(f"{prefix}.bias", (d_out,), path + ("bias",), layer, False)


def norm_specs(prefix, path, layer, d, with_bias):
    yield TensorSpec(f"{prefix}.weight", (d,), path + ("weight",), layer, False)
    if with_bias:
        yield TensorSpec(f"{prefix}.bias", (d,), path + ("bias",), layer, False)


def is_harmless_buffer(name: str) -> bool:
    return any(p.search(name) for p in HARMLESS_BUFFERS)
