"""Advantage estimators (rto_jax/objectives/advantages.py) against numpy references written from their
equations with explicit Python loops over rows, groups and time (not the vectorized form under test)."""

import jax
import numpy as np
import pytest

from rto_jax.objectives import advantages as adv

B, R = 12, 7


def ragged_batch(seed, groups=3, dense=True):
    """rewards, values, mask [B, R] (right-padded, lengths 1..R) and group ids [B] (`groups` shuffled prompts)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, R + 1, size=B)
    lengths[0] = 1  # a one-token response
    mask = (np.arange(R)[None, :] < lengths[:, None]).astype(np.float32)
    if dense:
        rewards = rng.normal(size=(B, R)).astype(np.float32) * mask
    else:  # everything at the last valid token
        rewards = np.zeros((B, R), np.float32)
        rewards[np.arange(B), lengths - 1] = rng.normal(size=B)
    values = rng.normal(size=(B, R)).astype(np.float32) * mask
    group_ids = rng.permutation(np.repeat(np.arange(groups), B // groups)).astype(np.int32)
    return rewards, values, mask, group_ids


def np_returns(rewards, mask, gamma):
    out = np.zeros_like(rewards, dtype=np.float64)
    for i in range(rewards.shape[0]):
        running = 0.0
        for t in reversed(range(rewards.shape[1])):
            if mask[i, t]:
                running = rewards[i, t] + gamma * running
                out[i, t] = running
    return out


def np_gae(rewards, values, mask, gamma, lam):
    advantages = np.zeros_like(rewards, dtype=np.float64)
    for i in range(rewards.shape[0]):
        last, next_value = 0.0, 0.0
        for t in reversed(range(rewards.shape[1])):
            if mask[i, t]:
                delta = rewards[i, t] + gamma * next_value - values[i, t]
                last = delta + gamma * lam * last
                advantages[i, t], next_value = last, values[i, t]
    return advantages, (advantages + values) * mask


def np_whiten(x, mask):
    valid = x[mask > 0]
    return (x - valid.mean()) / np.sqrt(valid.var() + 1e-8) * mask


def np_group_baselines(whole, group_ids):
    """For each row: its group's mean, sample std (n-1), and the mean of the other rows; 0 / 1 / 0 alone."""
    mean, std, others = np.zeros(len(whole)), np.ones(len(whole)), np.zeros(len(whole))
    for i, g in enumerate(group_ids):
        members = [j for j in range(len(whole)) if group_ids[j] == g]
        if len(members) > 1:
            mean[i] = np.mean(whole[members])
            std[i] = np.std(whole[members], ddof=1)
            others[i] = np.mean([whole[j] for j in members if j != i])
    return mean, std, others


def np_estimator(name, rewards, values, mask, group_ids, gamma):
    returns = np_returns(rewards, mask, gamma)
    mean, std, others = np_group_baselines(returns[:, 0], group_ids)
    if name == "grpo":
        return (returns - mean[:, None]) / (std[:, None] + adv.GROUP_EPS) * mask
    if name == "dr_grpo":
        return (returns - mean[:, None]) * mask
    if name == "rloo":
        return (returns - others[:, None]) * mask
    if name == "reinforce_pp":
        return np_whiten(returns, mask)
    if name == "reinforce_pp_baseline":
        return np_whiten((returns - mean[:, None]) * mask, mask)
    raise KeyError(name)


CRITIC_FREE = ("grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline")


@pytest.mark.parametrize("name", CRITIC_FREE)
@pytest.mark.parametrize("dense", [True, False])
@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_critic_free_estimators_match_their_equations(name, dense, gamma):
    rewards, values, mask, group_ids = ragged_batch(0 if dense else 1, dense=dense)
    fn = jax.jit(lambda r, m, g: adv.estimate(name, r, None, m, g, gamma=gamma, lam=0.95, whiten=True))
    got, returns = fn(rewards, mask, group_ids)
    assert returns is None
    np.testing.assert_allclose(got, np_estimator(name, rewards, values, mask, group_ids, gamma), rtol=2e-5, atol=2e-5)
    assert np.all(np.asarray(got)[mask == 0] == 0.0)


@pytest.mark.parametrize("whiten", [False, True])
def test_gae_matches_its_recursion(whiten):
    rewards, values, mask, group_ids = ragged_batch(2)
    got, returns = adv.estimate("gae", rewards, values, mask, group_ids, gamma=0.97, lam=0.9, whiten=whiten)
    want, want_returns = np_gae(rewards, values, mask, 0.97, 0.9)
    np.testing.assert_allclose(got, np_whiten(want, mask) if whiten else want, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(returns, want_returns, rtol=2e-5, atol=2e-5)


def test_sparse_reward_gives_every_token_the_sequence_advantage():
    """With everything at the last token and gamma 1, G_t = G_0: the published sequence-level forms."""
    rewards, _, mask, group_ids = ragged_batch(3, dense=False)
    score = rewards.sum(axis=1)
    for name in ("grpo", "rloo"):
        got = np.asarray(adv.estimate(name, rewards, None, mask, group_ids, gamma=1.0)[0])
        for i in range(B):
            peers = score[group_ids == group_ids[i]]
            if name == "grpo":
                want = (score[i] - peers.mean()) / (peers.std(ddof=1) + adv.GROUP_EPS)
            else:  # RLOO's baseline: the other n - 1 responses' mean
                want = score[i] - (peers.sum() - score[i]) / (len(peers) - 1)
            np.testing.assert_allclose(got[i][mask[i] > 0], want, rtol=1e-5, atol=1e-5)


def test_a_group_of_one_has_no_baseline_and_group_ids_decide_the_peers():
    rewards, _, mask, _ = ragged_batch(4, dense=False)
    alone = np.arange(B, dtype=np.int32)  # samples_per_prompt = 1: every row its own group
    returns = np_returns(rewards, mask, 1.0)
    for name in ("grpo", "dr_grpo", "rloo"):
        got = adv.estimate(name, rewards, None, mask, alone, gamma=1.0)[0]
        np.testing.assert_allclose(got, returns / (1.0 + adv.GROUP_EPS if name == "grpo" else 1.0), rtol=1e-5)
    # Regrouping the same rows changes the advantages (the estimator reads the ids, not the row order).
    a = adv.estimate("rloo", rewards, None, mask, np.repeat(np.arange(3), 4).astype(np.int32), gamma=1.0)[0]
    b = adv.estimate("rloo", rewards, None, mask, np.tile(np.arange(3), 4).astype(np.int32), gamma=1.0)[0]
    assert not np.allclose(a, b)


def test_registry_lists_the_coefficients_and_which_estimators_train_a_critic():
    assert set(adv.ESTIMATORS) == {"gae", *CRITIC_FREE}
    assert adv.estimator_args("gae") == ("gamma", "lam", "whiten")
    assert all(adv.estimator_args(name) == ("gamma",) for name in CRITIC_FREE)
    assert adv.needs_critic("gae") and not any(adv.needs_critic(name) for name in CRITIC_FREE)
    assert set(adv.GROUP_ESTIMATORS) == {"grpo", "dr_grpo", "rloo", "reinforce_pp_baseline"}
