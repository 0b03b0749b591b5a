"""Hugging Face checkpoints in and out of kept_jax."""

from bridge.hf_import import ImportReport, load_hf_checkpoint

__all__ = ["ImportReport", "load_hf_checkpoint"]
