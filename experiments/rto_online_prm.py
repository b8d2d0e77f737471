"""RTO with an online implicit PRM (PRIME, Cui et al., arXiv 2502.01456): the RTO pipeline, but the
DPO policy that gives RTO its dense reward keeps training during PPO, so that reward follows the
policy's distribution instead of the offline pairs'.

On each rollout the DPO policy (the implicit PRM) takes one pass of PRIME's cross-entropy loss on its
implicit reward beta * sum_t log(pi_dpo / pi_ref) against outcome labels from the reward model's
normalized score (rto_jax/objectives/implicit_prm.py); then the rollout is scored with it, and RLOO
over 4 responses per prompt (PRIME's estimator) turns RTO's token rewards into advantages. Its
knobs are config keys: ppo.prm_lr, ppo.prm_beta, ppo.prm_labels, ppo.prm_update.
"""

from experiments import rto
from rto_jax.objectives.token_rewards import rto as rto_reward
from rto_jax.pipeline.recipes import method

# r_h = clip(beta_dpo * log pi_dpo/pi_ref) - beta_kl * log pi/pi_ref + [h = H] * score, pi_dpo trained online
TOKEN_REWARD = method(rto_reward, "rto_online_prm", online_prm="dpo", estimator="rloo", samples_per_prompt=4)


def run(pipeline):
    return rto.run(pipeline, token_reward=TOKEN_REWARD)
