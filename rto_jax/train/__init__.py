"""Train states and pure jitted step functions `(state, batch, rng) -> (state, metrics)`."""

from rto_jax.scoring import response_logits, response_logprobs, response_scalars, sequence_scores
from rto_jax.train.ppo import (
    Experience,
    PPOConfig,
    PPOState,
    create_ppo_state,
    create_shared_base_ppo_state,
    jitted_ppo_fns,
    make_experience,
    make_ppo_fns,
    online_prm_experience,
    ppo_update,
    prm_update,
    rollout,
)
from rto_jax.train.state import OptimizerConfig, TrainState, accumulate_gradients, make_optimizer
from rto_jax.train.steps import (
    DPOLoss,
    RewardModelLoss,
    SFTLoss,
    loss_metrics,
    make_train_step,
    precompute_reference_logps,
    sequence_logps,
)

__all__ = [
    "Experience",
    "PPOConfig",
    "PPOState",
    "create_ppo_state",
    "create_shared_base_ppo_state",
    "jitted_ppo_fns",
    "make_experience",
    "make_ppo_fns",
    "online_prm_experience",
    "ppo_update",
    "prm_update",
    "rollout",
    "OptimizerConfig",
    "TrainState",
    "accumulate_gradients",
    "make_optimizer",
    "DPOLoss",
    "RewardModelLoss",
    "SFTLoss",
    "loss_metrics",
    "make_train_step",
    "precompute_reference_logps",
    "response_logits",
    "response_logprobs",
    "response_scalars",
    "sequence_logps",
    "sequence_scores",
]
