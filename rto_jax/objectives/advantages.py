"""Advantage estimators: how PPO's update weighs each sampled token, from the token rewards
(docs/algorithm.md#advantage-estimators). Every estimator is a pure function

    estimator(rewards [B, R], values [B, R] or None, mask [B, R], group_ids [B], **coefficients)
        -> (advantages [B, R] float32, returns [B, R] float32 or None)

rewards: the token reward's output (dense or sparse), 0 where `mask` is 0. values: the critic's
predictions (GAE only; None for the critic-free estimators). group_ids: int32 in [0, B), rows that
answer the same prompt share one (`ppo.samples_per_prompt` responses per prompt). returns: the
critic's regression target (GAE), None when there is no critic. Advantages are 0 where `mask` is 0.

With a dense token reward every estimator works on the returns-to-go

    G_t = sum_{s >= t} gamma^(s - t) r_s                 (G_0: the response's whole return)

and a critic-free estimator's baseline is built from the group's whole returns G_0, so with a sparse
reward (everything at the last token) and gamma = 1, G_t = G_0 and each estimator is exactly its
published sequence-level form:

    gae          delta_t = r_t + gamma V_{t+1} - V_t,  A_t = delta_t + gamma lam A_{t+1},  returns A + V;
                 whitened over the batch's valid tokens when `whiten`
    grpo         A_t = (G_t - mean_g G_0) / (std_g G_0 + eps)          (Shao et al. 2024, DeepSeekMath)
    dr_grpo      A_t =  G_t - mean_g G_0                               (Liu et al. 2025, "Dr. GRPO")
    rloo         A_t =  G_t - mean_{j in g, j != i} G_0^j               (Ahmadian et al. 2024)
    reinforce_pp A_t = whiten_batch(G_t)                               (Hu 2025, REINFORCE++)
    reinforce_pp_baseline
                 A_t = whiten_batch(G_t - mean_g G_0)                  (REINFORCE++-baseline)

The coefficients come from PPOConfig (gamma, lam, whiten_advantages), the one place with their
defaults. whiten_batch uses the population variance over the batch's valid tokens (verl divides by
n - 1: a relative difference of 1/n on thousands of tokens).

mean_g / std_g are over the rows of the group g of row i; std_g is the sample standard deviation
(n - 1 in the denominator, as torch.std in verl and OpenRLHF). A group of one row has no peer to
compare with: its baseline is 0 and its std 1 (verl's convention), so grpo and rloo then give G_t.
With a dense reward, G_t - baseline credits token t with what came after it, against the group's
average whole return: tokens early in a response carry more of the return than late ones.
"""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp

from rto_jax.objectives.masked import apply_mask, masked_whiten

GROUP_EPS = 1e-6  # added to the group std (verl's and OpenRLHF's value)


def returns_to_go(rewards, mask, *, gamma):
    """``G_t = r_t + gamma G_{t+1}`` by a reverse scan over time: ``[B, T] -> [B, T]``, 0 where ``mask`` is 0."""
    rewards = apply_mask(rewards, mask)

    def step(next_return, xs):
        r, m = xs
        g = jnp.where(m, r + gamma * next_return, 0.0)
        return g, g

    _, returns = jax.lax.scan(step, jnp.zeros(rewards.shape[:1], jnp.float32), (rewards.T, (mask > 0).T), reverse=True)
    return returns.T


def group_stats(x, group_ids):
    """Per-row mean, sample std and size of its group: ``x [B], group_ids [B] -> (mean [B], std [B], count [B])``.

    A group of one row gets mean 0 and std 1 (no peer to compare with)."""
    num = x.shape[0]  # ids lie in [0, B): a static segment count
    count = jax.ops.segment_sum(jnp.ones_like(x), group_ids, num_segments=num)
    total = jax.ops.segment_sum(x, group_ids, num_segments=num)
    mean = total / jnp.maximum(count, 1.0)
    squares = jax.ops.segment_sum(jnp.square(x - mean[group_ids]), group_ids, num_segments=num)
    std = jnp.sqrt(squares / jnp.maximum(count - 1.0, 1.0))
    count, mean, std = count[group_ids], mean[group_ids], std[group_ids]
    single = count < 2
    return jnp.where(single, 0.0, mean), jnp.where(single, 1.0, std), count


def _sequence_returns(rewards, mask, gamma):
    returns = returns_to_go(jnp.asarray(rewards, jnp.float32), mask, gamma=gamma)
    return returns, returns[:, 0]  # G_t and G_0 (rows are right-padded: column 0 is the first token)


def gae(rewards, values, mask, group_ids=None, *, gamma, lam, whiten=False):
    """Generalised advantage estimation with the critic's `values` (bootstrap 0 past the last valid
    token); `(advantages, returns)`, advantages whitened over the valid tokens when `whiten`."""
    del group_ids  # GAE's baseline is the critic
    rewards = apply_mask(jnp.asarray(rewards, jnp.float32), mask)
    values = apply_mask(jnp.asarray(values, jnp.float32), mask)
    valid = mask > 0

    def step(carry, xs):
        next_adv, next_value = carry
        r, v, m = xs
        delta = r + gamma * next_value - v
        adv = jnp.where(m, delta + gamma * lam * next_adv, 0.0)
        return (adv, v), adv

    init = (jnp.zeros(rewards.shape[:1], jnp.float32),) * 2
    _, adv_t = jax.lax.scan(step, init, (rewards.T, values.T, valid.T), reverse=True)
    advantages = adv_t.T
    returns = apply_mask(advantages + values, mask)
    return (masked_whiten(advantages, mask) if whiten else advantages), returns


def grpo(rewards, values, mask, group_ids, *, gamma):
    """GRPO: the return against its group's mean whole return, in units of the group's std."""
    del values
    returns, whole = _sequence_returns(rewards, mask, gamma)
    mean, std, _ = group_stats(whole, group_ids)
    return apply_mask((returns - mean[:, None]) / (std[:, None] + GROUP_EPS), mask), None


def dr_grpo(rewards, values, mask, group_ids, *, gamma):
    """Dr. GRPO: GRPO without the division by the group's std (no bias toward easy or hard prompts)."""
    del values
    returns, whole = _sequence_returns(rewards, mask, gamma)
    mean, _, _ = group_stats(whole, group_ids)
    return apply_mask(returns - mean[:, None], mask), None


def rloo(rewards, values, mask, group_ids, *, gamma):
    """REINFORCE leave-one-out: the return against the mean whole return of the group's other rows."""
    del values
    returns, whole = _sequence_returns(rewards, mask, gamma)
    mean, _, count = group_stats(whole, group_ids)
    others = jnp.where(count > 1, (mean * count - whole) / jnp.maximum(count - 1.0, 1.0), 0.0)
    return apply_mask(returns - others[:, None], mask), None


def reinforce_pp(rewards, values, mask, group_ids, *, gamma):
    """REINFORCE++: the returns-to-go whitened over the batch's valid tokens (the batch is the baseline)."""
    del values, group_ids
    returns, _ = _sequence_returns(rewards, mask, gamma)
    return masked_whiten(returns, mask), None


def reinforce_pp_baseline(rewards, values, mask, group_ids, *, gamma):
    """REINFORCE++-baseline: the return minus its group's mean whole return, then whitened over the batch."""
    del values
    returns, whole = _sequence_returns(rewards, mask, gamma)
    mean, _, _ = group_stats(whole, group_ids)
    return masked_whiten(apply_mask(returns - mean[:, None], mask), mask), None


ESTIMATORS = {fn.__name__: fn for fn in (gae, grpo, dr_grpo, rloo, reinforce_pp, reinforce_pp_baseline)}
# Estimators whose advantage compares rows of one prompt: they need samples_per_prompt > 1 to have a baseline.
GROUP_ESTIMATORS = ("grpo", "dr_grpo", "rloo", "reinforce_pp_baseline")


def needs_critic(name: str) -> bool:
    """Whether estimator `name` reads a critic's values (and PPO must train one)."""
    return name == "gae"


def estimator_args(name: str) -> tuple[str, ...]:
    """The coefficients estimator `name` takes (keyword-only), e.g. ('gamma', 'lam', 'whiten') for GAE."""
    params = inspect.signature(ESTIMATORS[name]).parameters.values()
    return tuple(p.name for p in params if p.kind is p.KEYWORD_ONLY)


def estimate(name: str, rewards, values, mask, group_ids, **available):
    """Estimator `name` with the coefficients it takes picked from `available` (PPO's gamma, lam, whiten)."""
    coefficients = {key: available[key] for key in estimator_args(name) if key in available}
    return ESTIMATORS[name](rewards, values, mask, group_ids, **coefficients)
