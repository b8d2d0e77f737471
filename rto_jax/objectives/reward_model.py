"""Bradley-Terry reward-model loss (docs/algorithm.md#2-reward-model).

loss = mean_b  -log sigmoid(r_w[b] - r_l[b] - margin[b])
"""

import jax
import jax.numpy as jnp


def bradley_terry_loss(chosen_rewards, rejected_rewards, margin=None):
    """Pairwise preference loss.

    Args:
      chosen_rewards, rejected_rewards: ``[B]`` scalar rewards of preferred / dispreferred
        responses (read at each response's last real token).
      margin: optional ``[B]`` or scalar margin the chosen reward must exceed.
    Returns:
      ``(loss, metrics)``; metrics ``loss``, ``accuracy`` (r_w > r_l), ``rewards/chosen``,
      ``rewards/rejected``, ``rewards/margin`` (mean of r_w - r_l).
    """
    chosen = jnp.asarray(chosen_rewards, jnp.float32)
    rejected = jnp.asarray(rejected_rewards, jnp.float32)
    diff = chosen - rejected
    shifted = diff if margin is None else diff - jnp.asarray(margin, jnp.float32)
    loss = jnp.mean(-jax.nn.log_sigmoid(shifted))
    metrics = {
        "loss": loss,
        "accuracy": jnp.mean((diff > 0).astype(jnp.float32)),
        "rewards/chosen": jnp.mean(chosen),
        "rewards/rejected": jnp.mean(rejected),
        "rewards/margin": jnp.mean(diff),
    }
    return loss, metrics
