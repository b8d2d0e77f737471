"""PPO pieces over the token MDP (docs/algorithm.md#4-ppo-with-rto-token-rewards). All arrays ``[B, T]``, right-padded
``mask`` (1 on response tokens up to and including EOS).

The advantages (GAE with the critic, or a critic-free estimator) are rto_jax/objectives/advantages.py.

Clipped surrogate, with ratio_t = exp(logp_t - logp_old_t):

    L_pi = mean_valid max(-A_t ratio_t, -A_t clip(ratio_t, 1-eps, 1+eps))

Clipped value loss (the conventional 0.5 is NOT inside; the caller multiplies by
``PPOConfig.vf_coef``):

    L_V  = mean_valid max((V_t - R_t)^2, (V_old_t + clip(V_t - V_old_t, -eps, eps) - R_t)^2)

The losses' ``mean_valid`` is, with ``average="token"`` (default), the mean over the valid tokens
of the whole (mini)batch; with ``average="sequence"``, each response's mean over its tokens, then
the mean over responses (the RTO authors' code). On ragged batches the two weigh long and short
responses differently. Metrics are always token means.
"""

import jax.numpy as jnp

from rto_jax.objectives.masked import apply_mask, masked_loss_mean, masked_mean, masked_whiten  # noqa: F401
from rto_jax.objectives.sft import entropy_from_logits


def policy_loss(logp, logp_old, advantages, mask, clip_eps, average="token"):
    """PPO clipped surrogate loss.

    Args:
      logp: ``[B, T]`` current log-probs; logp_old: ``[B, T]`` rollout log-probs;
      advantages: ``[B, T]`` (usually whitened); mask: ``[B, T]``; clip_eps: ratio clip;
      average: "token" or "sequence" (see the module docstring).
    Returns:
      ``(loss, metrics)``; metrics ``clipfrac`` (fraction of valid tokens where the clipped
      term is the active one), ``approx_kl`` (masked mean of the k3 estimator
      ``(ratio - 1) - log ratio`` of KL(pi_old || pi), >= 0), ``ratio_mean``.
    """
    log_ratio = apply_mask(jnp.asarray(logp, jnp.float32) - jnp.asarray(logp_old, jnp.float32), mask)
    ratio = jnp.exp(log_ratio)
    adv = jnp.asarray(advantages, jnp.float32)
    unclipped = -adv * ratio
    clipped = -adv * jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    loss = masked_loss_mean(jnp.maximum(unclipped, clipped), mask, average)
    metrics = {
        "clipfrac": masked_mean(clipped > unclipped, mask),
        "approx_kl": masked_mean((ratio - 1.0) - log_ratio, mask),
        "ratio_mean": masked_mean(ratio, mask),
    }
    return loss, metrics


def value_loss(values, old_values, returns, mask, clip_eps, average="token"):
    """Clipped value loss, without the 0.5 factor (apply it as ``vf_coef``).

    Args:
      values: ``[B, T]`` current predictions; old_values: ``[B, T]`` rollout predictions;
      returns: ``[B, T]`` GAE returns; mask: ``[B, T]``; clip_eps: clip of ``V - V_old``;
      average: "token" or "sequence" (see the module docstring).
    Returns:
      ``(loss, metrics)``; metrics ``vf_clipfrac`` (fraction where the clipped error is the
      larger), ``value_mse`` (unclipped squared error), ``value_mean``.
    """
    f32 = lambda a: jnp.asarray(a, jnp.float32)
    values, old_values, returns = f32(values), f32(old_values), f32(returns)
    v_clipped = old_values + jnp.clip(values - old_values, -clip_eps, clip_eps)
    err = jnp.square(values - returns)
    err_clipped = jnp.square(v_clipped - returns)
    loss = masked_loss_mean(jnp.maximum(err, err_clipped), mask, average)
    metrics = {
        "vf_clipfrac": masked_mean(err_clipped > err, mask),
        "value_mse": masked_mean(err, mask),
        "value_mean": masked_mean(values, mask),
    }
    return loss, metrics


def masked_entropy(logits, mask):
    """Mean policy entropy over valid tokens: ``logits [B, T, V], mask [B, T] -> scalar``."""
    return masked_mean(entropy_from_logits(logits), mask)


def normalized_score(raw_score, has_eos, *, mean, std, clip, missing_eos_penalty):
    """The reward model's score as PPO's reward reads it: ``clip((raw - mean) / std, -clip, clip)``,
    minus ``missing_eos_penalty`` for a response that never emitted EOS (N+). ``[B] -> [B]`` float32."""
    score = jnp.clip((jnp.asarray(raw_score, jnp.float32) - mean) / std, -clip, clip)
    return score - missing_eos_penalty * (1.0 - jnp.asarray(has_eos, jnp.float32))
