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
