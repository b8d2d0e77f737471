"""rto_jax: Reinforced Token Optimization (DPO meets PPO) in JAX/Flax."""

__version__ = "0.1.0"
