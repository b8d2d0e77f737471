"""Evaluation: scoring policies on held-out prompts, summaries, and plots."""

from rto_jax.eval.rollout_eval import (
    episodes_to_reach,
    evaluate_policy,
    mean_and_se,
    over_prompt_batches,
    score_rollouts,
    summarize,
    win_rate,
)

__all__ = [
    "episodes_to_reach",
    "evaluate_policy",
    "mean_and_se",
    "over_prompt_batches",
    "score_rollouts",
    "summarize",
    "win_rate",
]
