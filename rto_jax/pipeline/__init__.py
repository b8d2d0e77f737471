"""The experiment pipeline: config validation, tasks (where data comes from), the stages (SFT, reward
model, DPO, PPO/RTO, evaluation) as plain functions, orbax checkpoints and run logging."""

from rto_jax.pipeline.config import ConfigError, base_config, validate
from rto_jax.pipeline.runner import run
from rto_jax.pipeline.stages import run_dpo, run_evaluate, run_ppo, run_reward_model, run_sft
from rto_jax.pipeline.tasks import Task, build_task, build_text_task

__all__ = [
    "ConfigError",
    "Task",
    "base_config",
    "build_task",
    "build_text_task",
    "run",
    "run_dpo",
    "run_evaluate",
    "run_ppo",
    "run_reward_model",
    "run_sft",
    "validate",
]
