"""rto_jax.objectives against independent numpy references (plain per-row, per-token loops)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rto_jax import objectives as obj

TOL = dict(rtol=1e-5, atol=1e-5)
B, T, V = 6, 9, 11
JIT = pytest.mark.parametrize("wrap", [lambda f: f, jax.jit], ids=["eager", "jit"])


# ----------------------------------------------------------------------------- fixtures / data
def response_mask(rng, b=B, t=T):
    """Right-padded masks with ragged lengths: row 0 has length 1, row 1 is full, row 2 empty."""
    lengths = rng.integers(1, t + 1, size=b)
    lengths[:3] = [1, t, 0]
    return (np.arange(t)[None, :] < lengths[:, None]).astype(np.float32)


def window_mask(rng, b=B, t=T):
    """Zeros at the start (left-padding-like prompt) and at the end; row 0 has one token."""
    mask = np.zeros((b, t), np.float32)
    for i in range(b):
        start = rng.integers(0, t)
        stop = start + 1 if i == 0 else rng.integers(start + 1, t + 1)
        mask[i, start:stop] = 1
    return mask


def garbage_where_masked(rng, x, mask):
    """``x`` with large random values (and some -inf, as pad log-probs can be) where
    ``mask == 0``, broadcasting the mask over trailing dims."""
    m = mask.reshape(mask.shape + (1,) * (x.ndim - mask.ndim)) > 0
    if x.dtype.kind == "f":
        noise = rng.normal(size=x.shape).astype(x.dtype) * 50
        noise[rng.uniform(size=x.shape) < 0.3] = -np.inf
    else:
        noise = rng.integers(0, V, size=x.shape).astype(x.dtype)
    return np.where(m, x, noise)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def logps(rng, *shape):
    return (-rng.exponential(size=shape or (B, T))).astype(np.float32)


# ----------------------------------------------------------------------------- numpy references
def np_logprob(logits_row, target):
    m = max(logits_row)
    lse = m + math.log(sum(math.exp(float(l) - m) for l in logits_row))
    return float(logits_row[target]) - lse


def np_entropy(logits_row):
    m = max(logits_row)
    z = sum(math.exp(float(l) - m) for l in logits_row)
    return -sum(math.exp(float(l) - m) / z * (float(l) - m - math.log(z)) for l in logits_row)


def log_sigmoid(x):
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def np_masked_mean(values_and_masks):
    num = sum(v for v, m in values_and_masks if m > 0)
    den = sum(1 for v, m in values_and_masks if m > 0)
    return num / den if den else 0.0


def cells(mask):
    return [(b, t) for b in range(mask.shape[0]) for t in range(mask.shape[1])]


def np_last_index(mask_row):
    idx = -1
    for t, m in enumerate(mask_row):
        if m > 0:
            idx = t
    return idx


def np_rto_rewards(lo, lr, ld, score, mask, beta_dpo, c, beta_kl, beta_rm, placement):
    out = np.zeros(mask.shape, np.float64)
    for b in range(mask.shape[0]):
        last = np_last_index(mask[b])
        seq = 0.0
        for t in range(mask.shape[1]):
            if mask[b, t] == 0:
                continue
            d = beta_dpo * (float(ld[b, t]) - float(lr[b, t]))
            seq += d
            if placement == "token":
                out[b, t] += min(max(d, -c), c) if c > 0 else d
            out[b, t] += -beta_kl * (float(lo[b, t]) - float(lr[b, t]))
            if t == last:
                out[b, t] += beta_rm * float(score[b])
        if placement == "sequence_end" and last >= 0:
            out[b, last] += min(max(seq, -c), c) if c > 0 else seq
    return out


def np_gae(rewards, values, mask, gamma, lam):
    adv = np.zeros(mask.shape, np.float64)
    for b in range(mask.shape[0]):
        length = int(mask[b].sum())
        last_gae = 0.0
        for t in reversed(range(length)):
            next_value = float(values[b, t + 1]) if t + 1 < length else 0.0
            delta = float(rewards[b, t]) + gamma * next_value - float(values[b, t])
            last_gae = delta + gamma * lam * last_gae
            adv[b, t] = last_gae
    returns = np.where(mask > 0, adv + values, 0.0)
    return adv, returns


# ----------------------------------------------------------------------------- sft / log-probs
@JIT
def test_token_logprobs_and_entropy(rng, wrap):
    logits = rng.normal(size=(B, T, V)).astype(np.float32) * 3
    targets = rng.integers(0, V, size=(B, T))
    lp = wrap(obj.token_logprobs)(logits, targets)
    ent = wrap(obj.entropy_from_logits)(logits)
    assert lp.dtype == ent.dtype == jnp.float32 and lp.shape == ent.shape == (B, T)
    ref_lp = [[np_logprob(logits[b, t], targets[b, t]) for t in range(T)] for b in range(B)]
    ref_ent = [[np_entropy(logits[b, t]) for t in range(T)] for b in range(B)]
    np.testing.assert_allclose(lp, ref_lp, **TOL)
    np.testing.assert_allclose(ent, ref_ent, **TOL)


@JIT
def test_sft_loss(rng, wrap):
    logits = rng.normal(size=(B, T, V)).astype(np.float32) * 3
    targets = rng.integers(0, V, size=(B, T))
    mask = window_mask(rng)
    loss, metrics = wrap(obj.sft_loss)(logits, targets, mask)
    ref = np_masked_mean([(-np_logprob(logits[b, t], targets[b, t]), mask[b, t]) for b, t in cells(mask)])
    acc = np_masked_mean([(float(np.argmax(logits[b, t]) == targets[b, t]), mask[b, t]) for b, t in cells(mask)])
    assert loss.dtype == jnp.float32
    np.testing.assert_allclose(loss, ref, **TOL)
    np.testing.assert_allclose(metrics["accuracy"], acc, **TOL)
    assert metrics["num_tokens"] == mask.sum()
    # A target tied with the maximum counts as correct (argmax would pick the first tied index).
    tied = np.zeros((1, 2, V), np.float32)
    tied[0, 1, 0] = 1.0
    _, metrics = wrap(obj.sft_loss)(tied, np.array([[V - 1, V - 1]]), np.ones((1, 2), np.float32))
    assert float(metrics["accuracy"]) == 0.5


# ----------------------------------------------------------------------------- reward model
@JIT
@pytest.mark.parametrize("with_margin", [False, True])
def test_bradley_terry(rng, wrap, with_margin):
    rw, rl = rng.normal(size=(2, B)).astype(np.float32)
    margin = rng.uniform(size=B).astype(np.float32) if with_margin else None
    loss, metrics = wrap(obj.bradley_terry_loss)(rw, rl, margin)
    ref = np.mean([-log_sigmoid(float(rw[i] - rl[i] - (margin[i] if with_margin else 0))) for i in range(B)])
    np.testing.assert_allclose(loss, ref, **TOL)
    np.testing.assert_allclose(metrics["accuracy"], np.mean([rw[i] > rl[i] for i in range(B)]))
    np.testing.assert_allclose(metrics["rewards/margin"], np.mean(rw - rl), **TOL)
    np.testing.assert_allclose(metrics["rewards/chosen"], np.mean(rw), **TOL)


# ----------------------------------------------------------------------------- dpo
def np_dpo(pc, pr, rc, rr, beta, loss_type, eps, lc, lr):
    losses = []
    for i in range(len(pc)):
        u = beta * ((float(pc[i]) - float(rc[i])) - (float(pr[i]) - float(rr[i])))
        if loss_type == "sigmoid":
            losses.append(-(1 - eps) * log_sigmoid(u) - eps * log_sigmoid(-u))
        elif loss_type == "hinge":
            losses.append(max(0.0, 1 - u))
        elif loss_type == "robust":
            losses.append((-(1 - eps) * log_sigmoid(u) + eps * log_sigmoid(-u)) / (1 - 2 * eps))
        else:
            d = (float(pc[i]) - float(rc[i])) / lc[i] - (float(pr[i]) - float(rr[i])) / lr[i]
            losses.append((d - 1 / (2 * beta)) ** 2)
    return np.mean(losses)


@JIT
@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "robust", "ipo"])
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_dpo_loss(rng, wrap, loss_type, eps):
    pc, pr, rc, rr = (rng.normal(size=(4, B)) * 5 - 20).astype(np.float32)
    lc, lr = rng.integers(1, 30, size=(2, B))
    beta = 0.1
    fn = lambda *a: obj.dpo_loss(
        *a, beta=beta, loss_type=loss_type, label_smoothing=eps, chosen_lengths=lc, rejected_lengths=lr
    )
    loss, metrics = wrap(fn)(pc, pr, rc, rr)
    assert loss.dtype == jnp.float32
    np.testing.assert_allclose(loss, np_dpo(pc, pr, rc, rr, beta, loss_type, eps, lc, lr), **TOL)
    chosen = [beta * (float(pc[i]) - float(rc[i])) for i in range(B)]
    rejected = [beta * (float(pr[i]) - float(rr[i])) for i in range(B)]
    np.testing.assert_allclose(metrics["rewards/chosen"], np.mean(chosen), **TOL)
    np.testing.assert_allclose(metrics["rewards/rejected"], np.mean(rejected), **TOL)
    np.testing.assert_allclose(metrics["rewards/margin"], np.mean([c - r for c, r in zip(chosen, rejected)]), **TOL)
    np.testing.assert_allclose(metrics["rewards/accuracy"], np.mean([c > r for c, r in zip(chosen, rejected)]), **TOL)


@pytest.mark.parametrize("missing", ["chosen_lengths", "rejected_lengths"])
def test_ipo_without_lengths_raises(missing):
    x = jnp.zeros(B)
    lengths = {"chosen_lengths": jnp.ones(B), "rejected_lengths": jnp.ones(B)}
    del lengths[missing]
    with pytest.raises(ValueError, match=missing):
        obj.dpo_loss(x, x, x, x, beta=0.1, loss_type="ipo", **lengths)


def test_unknown_dpo_loss_type_lists_valid():
    x = jnp.zeros(B)
    with pytest.raises(ValueError, match="sigmoid.*hinge.*robust.*ipo"):
        obj.dpo_loss(x, x, x, x, beta=0.1, loss_type="kto")


@JIT
def test_dpo_token_rewards(rng, wrap):
    lp, lr, mask = logps(rng), logps(rng), response_mask(rng)
    out = wrap(obj.dpo_token_rewards)(lp, lr, mask, 0.1)
    ref = [[0.1 * (float(lp[b, t]) - float(lr[b, t])) if mask[b, t] else 0.0 for t in range(T)] for b in range(B)]
    np.testing.assert_allclose(out, ref, **TOL)


# ----------------------------------------------------------------------------- token rewards
def test_last_token_index(rng):
    mask = window_mask(rng)
    mask[2] = 0
    np.testing.assert_array_equal(obj.last_token_index(jnp.asarray(mask)), [np_last_index(row) for row in mask])


def rto_rewards(lo, lr, ld, score, mask, *, beta_dpo, dpo_clip, beta_kl, beta_rm, placement="token"):
    """The four token-reward functions as one, for the comparisons with the authors' formulas."""
    from rto_jax.objectives import token_rewards as tr

    logps = {"policy": lo, "ref": lr, "dpo": ld}
    logps.update({tr.untempered(k): v for k, v in list(logps.items())})  # temperature 1: the same log-probs
    if beta_dpo == 0:
        return tr.ppo(logps, score, mask, beta_kl=beta_kl, beta_rm=beta_rm)
    fn = tr.rto if placement == "token" else tr.rto_sequence_end
    return fn(logps, score, mask, beta_dpo=beta_dpo, dpo_clip=dpo_clip, beta_kl=beta_kl, beta_rm=beta_rm)


@JIT
@pytest.mark.parametrize("placement", ["token", "sequence_end"])
@pytest.mark.parametrize("clip", [0.05, 0.0])
def test_rto_token_rewards(rng, wrap, placement, clip):
    lo, lr, ld = logps(rng), logps(rng), logps(rng)
    score, mask = rng.normal(size=B).astype(np.float32), response_mask(rng)
    kw = dict(beta_dpo=0.05, dpo_clip=clip, beta_kl=0.01, beta_rm=1.0, placement=placement)
    rewards, parts = wrap(lambda *a: rto_rewards(*a, **kw))(lo, lr, ld, score, mask)
    ref = np_rto_rewards(lo, lr, ld, score, mask, 0.05, clip, 0.01, 1.0, placement)
    assert rewards.dtype == jnp.float32 and rewards.shape == (B, T)
    np.testing.assert_allclose(rewards, ref, **TOL)
    assert set(parts) == {"dpo", "kl", "score"}
    np.testing.assert_allclose(parts["dpo"] + parts["kl"] + parts["score"], rewards, **TOL)
    assert not np.any(np.asarray(rewards)[2])  # the empty row contributes nothing


def test_ppo_reward_is_kl_and_score_at_the_last_token(rng):
    lo, lr, ld = logps(rng), logps(rng), logps(rng)
    score, mask = rng.normal(size=B).astype(np.float32), response_mask(rng)
    rewards, parts = rto_rewards(lo, lr, ld, score, mask, beta_dpo=0.0, dpo_clip=0.05, beta_kl=0.01, beta_rm=1.0)
    assert set(parts) == {"kl", "score"}
    ppo = np.zeros((B, T))
    for b in range(B):
        for t in range(T):
            if mask[b, t]:
                ppo[b, t] = -0.01 * (float(lo[b, t]) - float(lr[b, t]))
                if t == np_last_index(mask[b]):
                    ppo[b, t] += float(score[b])
    np.testing.assert_allclose(rewards, ppo, **TOL)


def test_rto_no_rm_is_rto_without_the_score(rng):
    from rto_jax.objectives import token_rewards as tr

    lo, lr, ld = logps(rng), logps(rng), logps(rng)
    score, mask = rng.normal(size=B).astype(np.float32) + 3.0, response_mask(rng)
    logps_ = {"policy": lo, "ref": lr, "dpo": ld}
    logps_.update({tr.untempered(k): v for k, v in list(logps_.items())})
    rewards, parts = tr.rto_no_rm(logps_, None, mask)  # the score is never read: None is fine
    full, full_parts = tr.rto(logps_, score, mask)
    assert set(parts) == {"dpo", "kl"} and "reward" not in tr.rto_no_rm.uses
    np.testing.assert_allclose(rewards, full - full_parts["score"], **TOL)


def test_token_rewards_declare_what_they_read_and_bind_checks_coefficients():
    from rto_jax.objectives import token_rewards as tr

    assert tr.frozen_models(tr.ppo) == ("ref",) and tr.needs_reward_model(tr.ppo)
    assert tr.frozen_models(tr.rto) == ("ref", "dpo") and tr.needs_reward_model(tr.rto)
    assert tr.frozen_models(tr.rto_no_rm) == ("ref", "dpo") and not tr.needs_reward_model(tr.rto_no_rm)
    assert tr.reward_args(tr.rto) == {"beta_dpo": 0.05, "dpo_clip": 0.05, "beta_kl": 0.01, "beta_rm": 1.0}
    assert tr.bind(tr.rto, beta_kl=0.2) == tr.bind(tr.rto, beta_kl=0.2)  # hashable by value: a cache key
    assert hash(tr.bind(tr.rto, beta_kl=0.2)) == hash(tr.bind(tr.rto, beta_kl=0.2))
    with pytest.raises(TypeError, match="beta_dpo"):
        tr.bind(tr.ppo, beta_dpo=0.1)


def test_a_bound_rewards_float_coefficients_are_its_pytree_leaves():
    """A jitted step takes the reward as an argument: its floats are traced (one program for every value),
    anything else (an int, a bool, a string) is static; `structure()` is what the program depends on."""
    from rto_jax.objectives import token_rewards as tr

    @tr.token_reward("ref")
    def knobs(logps, score, mask, *, beta_kl=0.01, window=3, causal=True, label="x"):
        return tr.ppo(logps, score, mask, beta_kl=beta_kl)

    reward = tr.bind(knobs, beta_kl=0.2, window=4, causal=False, label="y")
    leaves, treedef = jax.tree.flatten(reward)
    assert leaves == [0.2]
    assert jax.tree.unflatten(treedef, [0.5]) == tr.bind(knobs, beta_kl=0.5, window=4, causal=False, label="y")
    assert reward.structure() == tr.bind(knobs, beta_kl=0.7, window=4, causal=False, label="y").structure()
    assert reward.structure() != tr.bind(knobs, beta_kl=0.2, window=5, causal=False, label="y").structure()
    assert reward.structure() != tr.bind(tr.ppo, beta_kl=0.2).structure()
    with pytest.raises(TypeError):  # the structure holds no value to compute with
        reward.structure()({"policy": jnp.zeros((1, 2)), "ref": jnp.zeros((1, 2))}, None, jnp.ones((1, 2)))

    # Under jit, one compiled program serves both values, and each call computes with its own.
    logps = {"policy": jnp.full((1, 3), -1.0), "ref": jnp.full((1, 3), -2.0)}
    mask, score = jnp.ones((1, 3)), jnp.zeros(1)
    kl = jax.jit(lambda r: r(logps, score, mask)[1]["kl"])
    for beta in (0.2, 0.5):
        np.testing.assert_allclose(kl(tr.bind(knobs, beta_kl=beta)), np.full((1, 3), -beta), rtol=1e-6)
    assert kl._cache_size() == 1


@pytest.mark.parametrize("placement", ["token", "sequence_end"])
def test_rto_dpo_only_sums_to_sequence_log_ratio(rng, placement):
    lo, lr, ld = logps(rng), logps(rng), logps(rng)
    score, mask = rng.normal(size=B).astype(np.float32), response_mask(rng)
    rewards, _ = rto_rewards(
        lo, lr, ld, score, mask, beta_dpo=0.05, dpo_clip=0.0, beta_kl=0.0, beta_rm=0.0, placement=placement
    )
    expected = [0.05 * sum(float(ld[b, t] - lr[b, t]) for t in range(T) if mask[b, t]) for b in range(B)]
    np.testing.assert_allclose(np.asarray(rewards).sum(-1), expected, **TOL)


def test_rto_rewards_float32_from_int_inputs(rng):
    ints = lambda: rng.integers(-5, 1, size=(B, T)).astype(np.int32)
    score = rng.integers(-3, 4, size=B).astype(np.int32)
    mask = response_mask(rng).astype(np.int32)
    rewards, parts = rto_rewards(
        ints(), ints(), ints(), score, mask, beta_dpo=0.05, dpo_clip=0.05, beta_kl=0.01, beta_rm=1.0
    )
    assert rewards.dtype == jnp.float32
    assert all(p.dtype == jnp.float32 for p in parts.values())
    assert np.any(np.abs(np.asarray(rewards) - np.round(rewards)) > 1e-4)  # not rounded


# ----------------------------------------------------------------------------- ppo
@JIT
@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 1.0), (0.99, 0.0)])
def test_gae(rng, wrap, gamma, lam):
    rewards, values = rng.normal(size=(2, B, T)).astype(np.float32)
    mask = response_mask(rng)
    adv, ret = wrap(lambda *a: obj.gae(*a, gamma=gamma, lam=lam))(rewards, values, mask)
    ref_adv, ref_ret = np_gae(rewards, values, mask, gamma, lam)
    assert adv.dtype == ret.dtype == jnp.float32
    np.testing.assert_allclose(adv, ref_adv, **TOL)
    np.testing.assert_allclose(ret, ref_ret, **TOL)


@pytest.mark.parametrize("shift_mean", [True, False])
def test_masked_whiten(rng, shift_mean):
    x, mask = rng.normal(size=(B, T)).astype(np.float32) * 3 + 1, response_mask(rng)
    out = jax.jit(obj.masked_whiten, static_argnums=2)(x, mask, shift_mean)
    valid = [float(x[b, t]) for b, t in cells(mask) if mask[b, t]]
    mean = sum(valid) / len(valid)
    std = math.sqrt(sum((v - mean) ** 2 for v in valid) / len(valid) + 1e-8)
    ref = np.zeros((B, T))
    for b, t in cells(mask):
        if mask[b, t]:
            ref[b, t] = (float(x[b, t]) - mean) / std + (0.0 if shift_mean else mean)
    np.testing.assert_allclose(out, ref, **TOL)


@JIT
def test_policy_loss(rng, wrap):
    logp_old = logps(rng)
    logp = logp_old + rng.normal(size=(B, T)).astype(np.float32) * 0.3
    adv, mask = rng.normal(size=(B, T)).astype(np.float32), response_mask(rng)
    loss, metrics = wrap(obj.policy_loss)(logp, logp_old, adv, mask, 0.2)
    rows = []
    for b, t in cells(mask):
        ratio = math.exp(float(logp[b, t]) - float(logp_old[b, t]))
        a = float(adv[b, t])
        unclipped, clipped = -a * ratio, -a * min(max(ratio, 0.8), 1.2)
        rows.append(
            (max(unclipped, clipped), float(clipped > unclipped), ratio - 1 - math.log(ratio), ratio, mask[b, t])
        )
    for i, key in enumerate([None, "clipfrac", "approx_kl", "ratio_mean"]):
        got = loss if key is None else metrics[key]
        np.testing.assert_allclose(got, np_masked_mean([(r[i], r[4]) for r in rows]), **TOL)


def test_policy_loss_at_rollout_policy(rng):
    logp, adv, mask = logps(rng), rng.normal(size=(B, T)), response_mask(rng)
    loss, metrics = jax.jit(obj.policy_loss)(logp, logp, adv, mask, 0.2)
    assert metrics["ratio_mean"] == 1.0 and metrics["clipfrac"] == 0.0
    assert metrics["approx_kl"] == 0.0
    np.testing.assert_allclose(loss, -np_masked_mean([(adv[b, t], mask[b, t]) for b, t in cells(mask)]), **TOL)


@JIT
def test_value_loss(rng, wrap):
    old, returns = rng.normal(size=(2, B, T)).astype(np.float32)
    values = old + rng.normal(size=(B, T)).astype(np.float32) * 0.4
    mask = response_mask(rng)
    loss, metrics = wrap(obj.value_loss)(values, old, returns, mask, 0.2)
    rows = []
    for b, t in cells(mask):
        v, o, r = float(values[b, t]), float(old[b, t]), float(returns[b, t])
        vc = o + min(max(v - o, -0.2), 0.2)
        rows.append(
            (max((v - r) ** 2, (vc - r) ** 2), float((vc - r) ** 2 > (v - r) ** 2), (v - r) ** 2, v, mask[b, t])
        )
    for i, key in enumerate([None, "vf_clipfrac", "value_mse", "value_mean"]):
        got = loss if key is None else metrics[key]
        np.testing.assert_allclose(got, np_masked_mean([(r[i], r[4]) for r in rows]), **TOL)


def np_sequence_mean(values, mask):
    """Each row's mean over its valid tokens, then the mean over rows with any (the RTO authors')."""
    rows = [np_masked_mean([(values[b][t], mask[b, t]) for t in range(T)]) for b in range(B) if mask[b].any()]
    return sum(rows) / len(rows)


@JIT
def test_sequence_averaged_losses_weigh_each_response_equally(rng, wrap):
    """average="sequence": per response, then over responses; on this ragged batch (lengths differ,
    one row empty) it differs from the token mean by a sizeable fraction of the loss."""
    logp_old = logps(rng)
    logp = logp_old + rng.normal(size=(B, T)).astype(np.float32) * 0.3
    adv, mask = rng.normal(size=(B, T)).astype(np.float32), response_mask(rng)
    assert len({int(m.sum()) for m in mask}) > 2 and not mask[2].any()
    loss, metrics = wrap(lambda *a: obj.policy_loss(*a, 0.2, "sequence"))(logp, logp_old, adv, mask)
    per_token = np.zeros((B, T))
    for b, t in cells(mask):
        ratio = math.exp(float(logp[b, t]) - float(logp_old[b, t]))
        a = float(adv[b, t])
        per_token[b, t] = max(-a * ratio, -a * min(max(ratio, 0.8), 1.2))
    np.testing.assert_allclose(loss, np_sequence_mean(per_token, mask), **TOL)
    token_loss, token_metrics = obj.policy_loss(logp, logp_old, adv, mask, 0.2, "token")
    assert abs(float(loss) - float(token_loss)) > 0.05 * abs(float(token_loss))
    for key, value in token_metrics.items():  # metrics stay token means
        np.testing.assert_allclose(metrics[key], value, **TOL)

    old, returns = rng.normal(size=(2, B, T)).astype(np.float32)
    values = old + rng.normal(size=(B, T)).astype(np.float32) * 0.4
    loss, _ = wrap(lambda *a: obj.value_loss(*a, 0.2, "sequence"))(values, old, returns, mask)
    per_token = np.zeros((B, T))
    for b, t in cells(mask):
        v, o, r = float(values[b, t]), float(old[b, t]), float(returns[b, t])
        vc = o + min(max(v - o, -0.2), 0.2)
        per_token[b, t] = max((v - r) ** 2, (vc - r) ** 2)
    np.testing.assert_allclose(loss, np_sequence_mean(per_token, mask), **TOL)
    with pytest.raises(ValueError, match="token.*sequence"):
        obj.value_loss(values, old, returns, mask, 0.2, "row")


def test_masked_entropy(rng):
    logits, mask = rng.normal(size=(B, T, V)).astype(np.float32), window_mask(rng)
    ref = np_masked_mean([(np_entropy(logits[b, t]), mask[b, t]) for b, t in cells(mask)])
    np.testing.assert_allclose(jax.jit(obj.masked_entropy)(logits, mask), ref, **TOL)


# ----------------------------------------------------------------------------- masked positions
CASES = {
    "sft": (lambda lg, tg, a, b, c, s, m: obj.sft_loss(lg, tg, m)),
    "entropy": (lambda lg, tg, a, b, c, s, m: obj.masked_entropy(lg, m)),
    "policy": (lambda lg, tg, a, b, c, s, m: obj.policy_loss(a, b, c, m, 0.2)),
    "value": (lambda lg, tg, a, b, c, s, m: obj.value_loss(a, b, c, m, 0.2)),
    "gae": (lambda lg, tg, a, b, c, s, m: obj.gae(a, b, m, gamma=1.0, lam=0.95)),
    "whiten": (lambda lg, tg, a, b, c, s, m: obj.masked_whiten(a, m)),
    "rto": (
        lambda lg, tg, a, b, c, s, m: rto_rewards(
            a, b, c, s, m, beta_dpo=0.05, dpo_clip=0.05, beta_kl=0.01, beta_rm=1.0
        )
    ),
    "rto_seq_end": (
        lambda lg, tg, a, b, c, s, m: rto_rewards(
            a, b, c, s, m, beta_dpo=0.05, dpo_clip=0.0, beta_kl=0.01, beta_rm=1.0, placement="sequence_end"
        )
    ),
    "dpo_token": (lambda lg, tg, a, b, c, s, m: obj.dpo_token_rewards(a, b, m, 0.1)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_masked_positions_change_nothing(rng, name):
    mask = window_mask(rng) if name in ("sft", "entropy") else response_mask(rng)
    logits = rng.normal(size=(B, T, V)).astype(np.float32)
    targets = rng.integers(0, V, size=(B, T))
    a, b, c = logps(rng), logps(rng), logps(rng)
    score = rng.normal(size=B).astype(np.float32)
    fn = jax.jit(CASES[name])
    clean = fn(logits, targets, a, b, c, score, mask)
    dirty = fn(*(garbage_where_masked(rng, x, mask) for x in (logits, targets, a, b, c)), score, mask)
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(x, y), clean, dirty)


def test_first_argmax_is_argmax_including_ties():
    from rto_jax.objectives.sft import first_argmax

    rng = np.random.default_rng(0)
    x = rng.integers(0, 4, size=(64, 3, 50)).astype(np.float32)  # many tied maxima per row
    x[0, 0] = -np.inf
    x[1, 1, :] = 2.0  # all equal: index 0
    np.testing.assert_array_equal(np.asarray(first_argmax(jnp.asarray(x))), np.argmax(x, axis=-1))
    assert first_argmax(jnp.asarray(x)).dtype == jnp.int32
