"""The experiment pipeline: config validation, tasks (where data comes from), the stages (SFT, reward
model, DPO, PPO/RTO, evaluation) as plain functions, orbax checkpoints and run logging."""

from rto_jax.pipeline.config import ConfigError, base_config, validate
from rto_jax.pipeline import stages
from rto_jax.pipeline.recipes import load_recipe, set_recipe
from rto_jax.pipeline.runner import Pipeline, model_path, run
from rto_jax.pipeline.stages import run_dpo, run_evaluate, run_ppo, run_reward_model, run_sft
from rto_jax.pipeline.tasks import Task, build_task, build_text_task

__all__ = [
    "ConfigError",
    "Pipeline",
    "Task",
    "base_config",
    "build_task",
    "build_text_task",
    "load_recipe",
    "model_path",
    "run",
    "run_dpo",
    "run_evaluate",
    "run_ppo",
    "run_reward_model",
    "run_sft",
    "set_recipe",
    "stages",
    "validate",
]
