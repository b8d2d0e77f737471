"""The PPO baseline: the RTO recipe with PPO's sparse reward (KL penalty per token, the reward
model's score at the last token). It reads no DPO policy, so its configs skip the DPO stage."""

from experiments import rto
from rto_jax.objectives.token_rewards import ppo

TOKEN_REWARD = ppo


def run(pipeline):
    return rto.run(pipeline, token_reward=TOKEN_REWARD)
