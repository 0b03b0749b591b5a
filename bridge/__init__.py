"""Checkpoints in and out of kept_jax: Hugging Face directories and GGUF files in, Hugging Face directories out."""

from bridge.checkpoint import load_checkpoint, load_config, open_checkpoint
from bridge.hf_import import ImportReport

__all__ = ["ImportReport", "load_checkpoint", "load_config", "open_checkpoint"]
