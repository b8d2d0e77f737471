"""Our advantage estimators (rto_jax/objectives/advantages.py) against verl's own functions
(third_party/verl_advantages, verl 0.9.1 core_algos): same rewards in, same advantages out.

verl's critic-free estimators are sequence-level: each row's summed reward, compared within its group,
broadcast to every token. Ours work on returns-to-go, so they must agree exactly when the reward sits at
the last valid token and gamma = 1 (G_t = G_0); with a dense reward the first token's advantage still is
the sequence-level one. verl whitens (GAE, REINFORCE++, REINFORCE++-baseline) with the sample variance
over the n valid tokens, ours with the population variance: ours = verl * sqrt(n / (n - 1)) up to the
1e-8 inside the square root, so those are compared after that factor at the same float32 tolerance
(and, as stated in the README, within rtol 1 / (2 (n - 1)) without it).
"""

import numpy as np
import pytest

from rto_jax.objectives import advantages as adv

B, R = 16, 12
TOL = {"rtol": 1e-5, "atol": 1e-5}  # ours in float32 against verl in float64, values of order 1
INSTALL = (
    "pip install --no-deps verl==0.9.1 && pip install 'ray>=2.41' 'tensordict>=0.8,<0.9' "
    "'omegaconf>=2.3,<3' 'codetiming>=1.4,<2' (third_party/verl_advantages/README.md)"
)
# Rows per prompt: groups of 4 (the usual layout), and a layout with groups of one (no peer: verl's
# baseline 0, std 1) and of 2 and 3 next to groups of 4.
GROUP_SIZES = {"groups_of_4": (4, 4, 4, 4), "with_groups_of_one": (4, 4, 3, 2, 1, 1, 1)}
WHITENED = ("reinforce_pp", "reinforce_pp_baseline")


@pytest.fixture(scope="module")
def verl():
    """The adapter module, with verl imported (lazily: only when a test here runs, not at collection)."""
    from third_party import verl_advantages

    try:
        verl_advantages._core_algos()
    except ImportError as error:
        pytest.skip(f"verl is not importable ({error}); install it with: {INSTALL}")
    return verl_advantages


def batch(seed, sizes, *, sparse=True, binary=False):
    """rewards, values, mask [B, R] (right-padded, lengths 1..R) and group ids [B] (shuffled).

    sparse: the score sits at each row's last valid token (binary: a 0/1 verifier score, so some groups
    have all-equal scores and std 0), else a reward on every valid token. Values are random everywhere,
    padding included: nothing may read them there."""
    assert sum(sizes) == B
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, R + 1, size=B)
    lengths[:2] = 1, R  # a one-token response and a full-width one
    mask = (np.arange(R)[None, :] < lengths[:, None]).astype(np.float32)
    if sparse:
        scores = rng.integers(0, 2, size=B) if binary else rng.normal(size=B)
        rewards = np.zeros((B, R), np.float32)
        rewards[np.arange(B), lengths - 1] = scores
    else:
        rewards = (rng.normal(size=(B, R)) * mask).astype(np.float32)
    values = rng.normal(size=(B, R)).astype(np.float32)
    group_ids = rng.permutation(np.repeat(np.arange(len(sizes)), sizes)).astype(np.int32)
    return rewards, values, mask, group_ids


def bessel(mask):
    """verl's whitening std over ours: sqrt(n / (n - 1)) for the batch's n valid tokens."""
    n = float(mask.sum())
    return np.sqrt(n / (n - 1.0))


def ours(name, rewards, values, mask, group_ids, **coefficients):
    advantages, returns = adv.ESTIMATORS[name](rewards, values, mask, group_ids, **coefficients)
    return np.asarray(advantages), None if returns is None else np.asarray(returns)


def verl_outcome(verl, name, rewards, mask, group_ids):
    """verl's advantages [B, R] for our critic-free estimator `name` (as verl returns them)."""
    if name == "grpo":
        return verl.verl_grpo(rewards, mask, group_ids, norm_by_std=True)
    if name == "dr_grpo":
        return verl.verl_grpo(rewards, mask, group_ids, norm_by_std=False)
    if name == "rloo":
        return verl.verl_rloo(rewards, mask, group_ids)
    if name == "reinforce_pp":
        return verl.verl_reinforce_pp(rewards, mask, gamma=1.0)[0]
    return verl.verl_reinforce_pp_baseline(rewards, mask, group_ids)


def check_whitened(our_advantages, verl_advantages, mask):
    """Ours = verl * sqrt(n / (n - 1)) at float32 tolerance; without the factor within 1 / (2 (n - 1))."""
    valid = mask > 0
    np.testing.assert_allclose(our_advantages[valid], verl_advantages[valid] * bessel(mask), **TOL)
    n = float(mask.sum())  # sqrt(n / (n - 1)) - 1 <= 1 / (2 (n - 1))
    np.testing.assert_allclose(our_advantages[valid], verl_advantages[valid], rtol=0.5 / (n - 1) + 1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", GROUP_SIZES)
@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline"])
@pytest.mark.parametrize("seed,binary", [(0, False), (1, False), (2, True)])
def test_sparse_reward_estimators_match_verl(verl, name, layout, seed, binary):
    rewards, _, mask, group_ids = batch(seed, GROUP_SIZES[layout], binary=binary)
    our_advantages, _ = ours(name, rewards, None, mask, group_ids, gamma=1.0)
    theirs = verl_outcome(verl, name, rewards, mask, group_ids)
    if name in WHITENED:
        check_whitened(our_advantages, theirs, mask)
    else:
        np.testing.assert_allclose(our_advantages, theirs, **TOL)  # padding included: 0 in both
    np.testing.assert_array_equal(our_advantages[mask == 0], 0.0)


@pytest.mark.parametrize("layout", GROUP_SIZES)
@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "rloo"])
def test_dense_reward_first_token_gets_verls_sequence_advantage(verl, name, layout):
    """With gamma = 1, G_0 is the row's summed reward, which is what verl's outcome estimators score."""
    rewards, _, mask, group_ids = batch(3, GROUP_SIZES[layout], sparse=False)
    our_advantages, _ = ours(name, rewards, None, mask, group_ids, gamma=1.0)
    theirs = verl_outcome(verl, name, rewards, mask, group_ids)
    np.testing.assert_allclose(our_advantages[:, 0], theirs[:, 0], **TOL)


@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_reinforce_pp_with_dense_discounted_rewards_matches_verl(verl, gamma):
    """verl's REINFORCE++ discounts token rewards too: same returns-to-go, same whitened advantages."""
    rewards, _, mask, group_ids = batch(4, GROUP_SIZES["groups_of_4"], sparse=False)
    our_advantages, _ = ours("reinforce_pp", rewards, None, mask, group_ids, gamma=gamma)
    verl_advantages, verl_returns = verl.verl_reinforce_pp(rewards, mask, gamma=gamma)
    np.testing.assert_allclose(np.asarray(adv.returns_to_go(rewards, mask, gamma=gamma)), verl_returns, **TOL)
    check_whitened(our_advantages, verl_advantages, mask)


@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (1.0, 0.95), (0.99, 0.95), (0.9, 0.0)])
@pytest.mark.parametrize("sparse", [False, True])
def test_gae_matches_verl(verl, gamma, lam, sparse):
    """verl returns whitened advantages and returns = unwhitened advantages + values; ours returns the
    same returns and, whitened or not, the same advantages (padding ignored: verl leaves values there)."""
    rewards, values, mask, group_ids = batch(5, GROUP_SIZES["groups_of_4"], sparse=sparse)
    verl_advantages, verl_returns = verl.verl_gae(rewards, values, mask, gamma=gamma, lam=lam)
    valid = mask > 0
    raw, returns = ours("gae", rewards, values, mask, group_ids, gamma=gamma, lam=lam, whiten=False)
    whitened, _ = ours("gae", rewards, values, mask, group_ids, gamma=gamma, lam=lam, whiten=True)
    np.testing.assert_allclose(returns[valid], verl_returns[valid], **TOL)
    np.testing.assert_allclose(raw[valid], (verl_returns - values)[valid], **TOL)
    check_whitened(whitened, verl_advantages, mask)
