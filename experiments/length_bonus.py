# experiments/length_bonus.py
"""PPO's reward plus a bonus for every response token: a token reward written in the recipe itself."""

from experiments import rto
from rto_jax.objectives.token_rewards import at_last_token, log_ratio, token_reward


@token_reward("ref", "reward")  # reads pi_ref's log-probs and the reward model's score
def length_bonus(logps, score, mask, *, bonus=0.5, beta_kl=0.01):
    parts = {
        "bonus": bonus * mask,  # [B, R]: every response token
        "kl": -beta_kl * log_ratio(logps, "policy", "ref", mask),
        "score": at_last_token(score, mask),
    }
    return parts["bonus"] + parts["kl"] + parts["score"], parts


TOKEN_REWARD = length_bonus


def run(pipeline):
    return rto.run(pipeline, token_reward=TOKEN_REWARD)  # RTO's stages, this reward
