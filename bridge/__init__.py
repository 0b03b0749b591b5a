"""Hugging Face checkpoints in and out of kept_jax."""

from bridge.hf_import import ImportReport, load_hf_checkpoint
from bridge.names import TensorSpec, tensor_table

__all__ = ["ImportReport", "TensorSpec", "load_hf_checkpoint", "tensor_table"]
