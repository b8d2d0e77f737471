"""Command-line tools: `python -m rto_jax.tools.plan` (memory planner)."""
