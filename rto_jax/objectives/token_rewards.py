"""RTO token rewards (DESIGN.md 1, stage 4; arXiv 2404.18922):

    r_h = clip(beta_dpo * (logp_dpo(h) - logp_ref(h)), -c, c)     # DPO token reward
          - beta_kl * (logp_old(h) - logp_ref(h))                 # KL penalty
          + beta_rm * [h == H] * score                            # sentence reward at EOS

``beta_dpo = 0`` gives PPO's reward. All arrays are ``[B, T]`` over response tokens except
``score [B]``; ``H`` is each row's last valid token (from the mask, never column -1).
"""

import jax.numpy as jnp

from rto_jax.objectives.masked import apply_mask, masked_sum

PLACEMENTS = ("token", "sequence_end")


def last_token_index(mask):
    """Index of the last valid token per row: ``[B, T] -> [B]`` int32; -1 for an empty row."""
    cols = jnp.arange(mask.shape[-1], dtype=jnp.int32)
    return jnp.max(jnp.where(mask > 0, cols, -1), axis=-1)


def _clip(x, c):
    # c <= 0 means no clip; jnp.where keeps this valid for a traced c as well.
    return jnp.where(c > 0, jnp.clip(x, -jnp.abs(c), jnp.abs(c)), x)


def rto_token_rewards(
    logp_old, logp_ref, logp_dpo, score, mask, *, beta_dpo, dpo_clip, beta_kl, beta_rm, dpo_placement="token"
):
    """Per-token rewards of RTO.

    Args:
      logp_old, logp_ref, logp_dpo: ``[B, T]`` log-probs of the sampled response tokens under
        the rollout policy, the reference (SFT) policy and the DPO policy.
      score: ``[B]`` sequence reward r_MLE(x, y) (already normalised / clipped / penalised).
      mask: ``[B, T]`` response mask (1 up to and including EOS).
      beta_dpo, dpo_clip (c; ``<= 0`` disables the clip), beta_kl, beta_rm: coefficients.
      dpo_placement: ``"token"`` (the RTO reward, clipped per token), or ``"sequence_end"``:
        the sequence sum of the *unclipped* per-token terms ``beta_dpo * (logp_dpo - logp_ref)``
        over valid tokens, then clipped to ``[-c, c]`` if ``c > 0``, placed at the last valid
        token. (The sum is the DPO implicit sequence reward; the clip bounds the same quantity.)
    Returns:
      ``(rewards, parts)``: float32 ``[B, T]`` rewards, 0 at masked positions, and
      ``parts = {'dpo', 'kl', 'score'}``, each ``[B, T]``, which sum to ``rewards``.
    """
    if dpo_placement not in PLACEMENTS:
        raise ValueError(f"unknown dpo_placement {dpo_placement!r}; valid: {', '.join(PLACEMENTS)}")
    f32 = lambda a: jnp.asarray(a, jnp.float32)
    logp_old, logp_ref, logp_dpo, score = map(f32, (logp_old, logp_ref, logp_dpo, score))
    is_last = jnp.arange(mask.shape[-1])[None, :] == last_token_index(mask)[:, None]

    dpo_tok = beta_dpo * (logp_dpo - logp_ref)
    if dpo_placement == "token":
        dpo = _clip(dpo_tok, dpo_clip)
    else:
        dpo = jnp.where(is_last, _clip(masked_sum(dpo_tok, mask, axis=-1), dpo_clip)[:, None], 0.0)
    kl = -beta_kl * (logp_old - logp_ref)
    sentence = jnp.where(is_last, beta_rm * score[:, None], 0.0)

    parts = {"dpo": apply_mask(dpo, mask), "kl": apply_mask(kl, mask), "score": apply_mask(sentence, mask)}
    return parts["dpo"] + parts["kl"] + parts["score"], parts
