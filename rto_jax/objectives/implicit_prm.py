"""The implicit process reward model trained online from outcome labels (PRIME, Cui et al., arXiv 2502.01456).

A language model pi_phi with a frozen reference pi_ref is a process reward model without process
labels: its implicit token reward is DPO's,

    r_phi(y_t) = beta * log(pi_phi(y_t | x, y_<t) / pi_ref(y_t | x, y_<t))          per token   [B, R]
    r_phi(y)   = sum_t r_phi(y_t)                                                   per response [B]

and it learns from outcome labels l in [0, 1] alone, by the cross-entropy of the response's
implicit reward read as a probability (PRIME's eq. 5, their "CE" loss):

    L_CE(phi) = -mean_i [ l_i log sigmoid(r_phi(y_i)) + (1 - l_i) log(1 - sigmoid(r_phi(y_i))) ]

Trained this way on the policy's own rollouts during PPO, the dense reward RTO reads from pi_dpo
follows the policy's distribution instead of the offline pairs'. PRIME's labels are a verifier's 0/1;
here they come from the reward model's normalized score s (`outcome_labels`):

    "soft"    sigmoid(s): the loss is lowest where r_phi(y) = s
    "binary"  [s > 0]: above pi_sft's mean score, a verifier's pass/fail
    "group"   sigmoid(s - mean of s over the responses to the same prompt): lowest where r_phi ranks a
              prompt's responses as s does, with mean label 1/2 in every group (a group of one: sigmoid(s))

Absolute labels follow the score as the policy raises it: on the synthetic task "soft" labels rose
from 0.53 to 0.78 over a run, and with them the implicit reward of everything the policy samples
(docs/results/synthetic.md#the-online-implicit-prm). "group" labels keep only the comparison between
a prompt's responses, as PRIME's filter keeps only prompts whose responses are neither all right
nor all wrong.
"""

import jax
import jax.numpy as jnp

from rto_jax.objectives.advantages import group_stats
from rto_jax.objectives.masked import masked_sum

LABELS = ("soft", "binary", "group")


def outcome_labels(score, kind: str = "soft", group_ids=None):
    """Outcome labels `[B]` in [0, 1] from the normalized reward-model score `[B]`: "soft" sigmoid(score),
    "binary" 1 where score > 0 (above pi_sft's mean), else 0, "group" sigmoid(score - its group's mean
    score) (`group_ids [B]`: rows answering one prompt share it)."""
    score = jnp.asarray(score, jnp.float32)
    if kind == "soft":
        return jax.nn.sigmoid(score)
    if kind == "binary":
        return (score > 0).astype(jnp.float32)
    if kind == "group":
        if group_ids is None:
            raise ValueError("'group' outcome labels need the group ids")
        mean, _, _ = group_stats(score, group_ids)
        return jax.nn.sigmoid(score - mean)
    raise ValueError(f"unknown outcome label kind {kind!r}; valid: {', '.join(LABELS)}")


def implicit_prm_loss(logp, logp_ref, mask, labels, *, beta):
    """PRIME's cross-entropy loss of the implicit PRM on one batch of responses.

    Args:
      logp, logp_ref: `[B, R]` per-token log-probs of the responses under pi_phi (differentiated) and
        pi_ref, at temperature 1 (the models' own distributions, as the DPO token reward reads them).
      mask: `[B, R]` response mask. labels: `[B]` outcome labels in [0, 1]. beta: the reward's scale.
    Returns:
      (loss, metrics): the batch-mean cross-entropy; `prm/loss`, `prm/reward` (mean r_phi(y)),
      `prm/label` (mean label) and `prm/accuracy` (the share of responses where sigmoid(r_phi(y)) and
      the label fall on the same side of 1/2).
    """
    ratio = jnp.asarray(logp, jnp.float32) - jnp.asarray(logp_ref, jnp.float32)
    reward = beta * masked_sum(ratio, mask, axis=-1)  # [B]
    labels = jnp.asarray(labels, jnp.float32)
    # log sigmoid(r) and log(1 - sigmoid(r)) = log sigmoid(-r), stable for any r
    losses = -(labels * jax.nn.log_sigmoid(reward) + (1.0 - labels) * jax.nn.log_sigmoid(-reward))
    loss = jnp.mean(losses)
    agree = (reward > 0) == (labels > 0.5)
    metrics = {
        "prm/loss": loss,
        "prm/reward": jnp.mean(reward),
        "prm/label": jnp.mean(labels),
        "prm/accuracy": jnp.mean(agree.astype(jnp.float32)),
    }
    return loss, metrics
