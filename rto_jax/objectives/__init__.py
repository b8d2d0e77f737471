"""Pure objective functions of arrays (no model code); float32 outputs. See docs/algorithm.md#stages."""

from rto_jax.objectives.dpo import LOSS_TYPES as DPO_LOSS_TYPES
from rto_jax.objectives.dpo import dpo_loss, dpo_token_rewards
from rto_jax.objectives.masked import (
    LOSS_AVERAGES,
    apply_mask,
    masked_loss_mean,
    masked_mean,
    masked_sum,
    masked_whiten,
)
from rto_jax.objectives.advantages import ESTIMATORS, gae
from rto_jax.objectives.ppo import masked_entropy, policy_loss, value_loss
from rto_jax.objectives.reward_model import bradley_terry_loss
from rto_jax.objectives.sft import entropy_from_logits, sft_loss, token_logprobs
from rto_jax.objectives.token_rewards import TOKEN_REWARDS, bind, last_token_index, token_reward

__all__ = [
    "DPO_LOSS_TYPES",
    "ESTIMATORS",
    "LOSS_AVERAGES",
    "TOKEN_REWARDS",
    "apply_mask",
    "bind",
    "bradley_terry_loss",
    "dpo_loss",
    "dpo_token_rewards",
    "entropy_from_logits",
    "gae",
    "last_token_index",
    "masked_entropy",
    "masked_loss_mean",
    "masked_mean",
    "masked_sum",
    "masked_whiten",
    "policy_loss",
    "sft_loss",
    "token_logprobs",
    "token_reward",
    "value_loss",
]
