"""DPO losses and the DPO implicit token reward (docs/algorithm.md#3-dpo).

With sequence log-probs (sums over response tokens, ``[B]``):

    u = beta * ((logp(y_w) - logp_ref(y_w)) - (logp(y_l) - logp_ref(y_l)))

    sigmoid  -(1-eps) log sigmoid(u) - eps log sigmoid(-u)        (eps > 0: conservative DPO)
    hinge    relu(1 - u)
    robust   (-(1-eps) log sigmoid(u) + eps log sigmoid(-u)) / (1 - 2 eps)
    ipo      (d - 1/(2 beta))^2,  d = (logp(y_w)-logp_ref(y_w))/|y_w| - (logp(y_l)-logp_ref(y_l))/|y_l|

Every loss is a batch mean. ``eps`` = ``label_smoothing`` (ignored by hinge and ipo).
"""

import jax
import jax.numpy as jnp

from rto_jax.objectives.masked import apply_mask

LOSS_TYPES = ("sigmoid", "hinge", "robust", "ipo")


def dpo_loss(
    chosen_logps,
    rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    *,
    beta,
    loss_type="sigmoid",
    label_smoothing=0.0,
    chosen_lengths=None,
    rejected_lengths=None,
):
    """DPO loss of one batch of preference pairs.

    Args:
      chosen_logps, rejected_logps: ``[B]`` policy log-probs of y_w / y_l (summed over tokens).
      ref_chosen_logps, ref_rejected_logps: ``[B]`` the same under the reference policy.
      beta: KL strength. loss_type: one of ``LOSS_TYPES`` (a static Python string).
      label_smoothing: eps of the sigmoid / robust losses.
      chosen_lengths, rejected_lengths: ``[B]`` response token counts; required by ``ipo``
        (lengths below 1 are treated as 1).
    Returns:
      ``(loss, metrics)``; metrics ``loss``, ``rewards/chosen``, ``rewards/rejected`` (batch
      means of the implicit rewards beta * log-ratio), ``rewards/margin``, ``rewards/accuracy``.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown dpo loss_type {loss_type!r}; valid: {', '.join(LOSS_TYPES)}")
    f32 = lambda a: jnp.asarray(a, jnp.float32)
    chosen_ratio = f32(chosen_logps) - f32(ref_chosen_logps)
    rejected_ratio = f32(rejected_logps) - f32(ref_rejected_logps)
    u = beta * (chosen_ratio - rejected_ratio)
    eps = label_smoothing

    if loss_type == "sigmoid":
        losses = -(1 - eps) * jax.nn.log_sigmoid(u) - eps * jax.nn.log_sigmoid(-u)
    elif loss_type == "hinge":
        losses = jax.nn.relu(1.0 - u)
    elif loss_type == "robust":
        if isinstance(eps, (int, float)) and eps >= 0.5:
            raise ValueError(f"robust dpo needs label_smoothing < 0.5, got {eps}")
        losses = (-(1 - eps) * jax.nn.log_sigmoid(u) + eps * jax.nn.log_sigmoid(-u)) / (1 - 2 * eps)
    else:  # ipo
        for name, value in (("chosen_lengths", chosen_lengths), ("rejected_lengths", rejected_lengths)):
            if value is None:
                raise ValueError(f"dpo loss_type 'ipo' needs {name} (per-token averaged log-ratios)")
        d = chosen_ratio / jnp.maximum(f32(chosen_lengths), 1.0) - rejected_ratio / jnp.maximum(
            f32(rejected_lengths), 1.0
        )
        losses = jnp.square(d - 1.0 / (2.0 * beta))

    loss = jnp.mean(losses)
    chosen_rewards = beta * chosen_ratio
    rejected_rewards = beta * rejected_ratio
    metrics = {
        "loss": loss,
        "rewards/chosen": jnp.mean(chosen_rewards),
        "rewards/rejected": jnp.mean(rejected_rewards),
        "rewards/margin": jnp.mean(chosen_rewards - rejected_rewards),
        "rewards/accuracy": jnp.mean((chosen_rewards > rejected_rewards).astype(jnp.float32)),
    }
    return loss, metrics


def dpo_token_rewards(logp, logp_ref, mask, beta):
    """DPO implicit token reward ``beta * (logp - logp_ref)``, 0 where ``mask == 0``. ``[B, T]``."""
    diff = jnp.asarray(logp, jnp.float32) - jnp.asarray(logp_ref, jnp.float32)
    return apply_mask(beta * diff, mask)
