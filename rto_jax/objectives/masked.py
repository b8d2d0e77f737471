"""Masked reductions over ``[B, T]`` token arrays.

``mask`` is 1 on valid tokens and 0 elsewhere (any dtype). Masking uses ``jnp.where`` rather
than a product, so non-finite values at masked positions (e.g. ``-inf`` log-probs of pad tokens)
never leak into a result. All outputs are float32.
"""

import jax.numpy as jnp


def apply_mask(x, mask):
    """``x`` (float32) where ``mask > 0``, exactly 0 elsewhere."""
    return jnp.where(mask > 0, jnp.asarray(x, jnp.float32), 0.0)


def masked_sum(x, mask, axis=None):
    """Sum of ``x`` over valid tokens (along ``axis``, or everything)."""
    return jnp.sum(apply_mask(x, mask), axis=axis)


def masked_mean(x, mask, axis=None):
    """Mean of ``x`` over valid tokens; 0 where there are none."""
    count = jnp.sum(jnp.asarray(mask > 0, jnp.float32), axis=axis)
    return masked_sum(x, mask, axis) / jnp.where(count > 0, count, 1.0)


LOSS_AVERAGES = ("token", "sequence")


def masked_loss_mean(x, mask, average: str = "token"):
    """A loss ``x [B, T]`` reduced to a scalar over the valid tokens.

    average="token": one mean over every valid token of the batch (long responses weigh more);
    "sequence": each row's mean over its valid tokens, then the mean over the rows that have any
    (every response weighs the same, as in the RTO authors' code). Equal when all rows have the
    same number of valid tokens.
    """
    if average == "token":
        return masked_mean(x, mask)
    if average != "sequence":
        raise ValueError(f"average must be one of {LOSS_AVERAGES}, got {average!r}")
    per_row = masked_mean(x, mask, axis=-1)
    has_tokens = jnp.any(mask > 0, axis=-1)
    return masked_mean(per_row, has_tokens)


def masked_whiten(x, mask, shift_mean=True, eps=1e-8):
    """Whiten ``x [B, T]`` with the mean and (population) variance of its valid tokens.

    Statistics are taken over the valid tokens of the whole batch. With ``shift_mean=False``
    the mean is added back (only the scale changes). Masked positions are 0 in the output.
    """
    x = jnp.asarray(x, jnp.float32)
    mean = masked_mean(x, mask)
    var = masked_mean(jnp.square(x - mean), mask)
    out = (x - mean) * jnp.reciprocal(jnp.sqrt(var + eps))
    if not shift_mean:
        out = out + mean
    return apply_mask(out, mask)
