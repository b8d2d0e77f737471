"""rto_jax: Reinforced Token Optimization (DPO meets PPO) in JAX/Flax."""

from rto_jax import runtime as _runtime

__version__ = "0.1.0"

_runtime.release_memory_after_compiles()  # see rto_jax/runtime.py
