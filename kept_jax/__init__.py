"""kept_jax: cross-architecture knowledge transfer (Orion -> Llama, KEPT) in JAX/Flax."""

__version__ = "0.1.0"

from kept_jax import runtime as _runtime

_runtime.configure()
