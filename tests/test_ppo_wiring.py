"""PPO wiring (issue 12): make_experience and ppo_update against independent rebuilds.

The experience maker is rebuilt in float64 numpy from full-sequence forward passes only (no
library log-prob, value, score, reward, GAE or whitening code); the update is rebuilt as plain
Python loops over epochs and minibatches with its own loss and the same optax transformation.
The models differ on purpose (policy != reference != DPO model, temperature != 1, reward mean
!= 0 and std != 1, some scores clipped, some rows without EOS), so that a wrong model, a wrong
temperature, a missing normalization or a sign slip changes a compared number.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from rto_jax.models import CausalLM, ModelConfig, ScalarHeadModel, default_positions
from rto_jax.objectives import policy_loss, value_loss
from rto_jax.objectives.token_rewards import bind, ppo, rto, rto_no_rm
from rto_jax.sampling import SamplingConfig, sample
from rto_jax.train import (
    OptimizerConfig,
    PPOConfig,
    create_ppo_state,
    jitted_ppo_fns,
    make_optimizer,
    make_ppo_fns,
)

VOCAB, PAD, EOS, GOOD = 16, 0, 1, 7
P, R, B = 4, 6, 16
TAU = 0.7
REWARD_MEAN, REWARD_STD = 0.3, 0.5
SCORE_CLIP = 2.0
BETA_DPO, DPO_CLIP, BETA_KL, BETA_RM = 0.5, 0.3, 0.2, 1.5
GAMMA, LAM = 0.9, 0.8
ITERATIONS = 8


def tiny_config():
    return ModelConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=8
    )


def _lm(seed, scale=3.0):
    """A random LM; weights scaled up so that different seeds give clearly different distributions."""
    model = CausalLM(tiny_config(), nnx.Rngs(seed))
    for var in jax.tree.leaves(nnx.state(model, nnx.Param), is_leaf=lambda v: isinstance(v, nnx.Variable)):
        if var[...].ndim == 2:
            var[...] = var[...] * scale
    return model


def _copy(module):
    """The same module on fresh buffers (the jitted update donates the state it is given)."""
    graphdef, state = nnx.split(module)
    return nnx.merge(graphdef, jax.tree.map(jnp.copy, state))


def _params(module):
    return jax.tree.map(jnp.copy, nnx.split(module)[1])


def _prompts(seed, batch):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, P + 1, batch)
    mask = (np.arange(P)[None] >= P - lengths[:, None]).astype(np.int32)
    ids = np.where(mask > 0, rng.integers(2, VOCAB, (batch, P)), PAD).astype(np.int32)
    return {"prompt_ids": jnp.asarray(ids), "prompt_mask": jnp.asarray(mask)}


REWARDS = {
    "rto": bind(rto, beta_dpo=BETA_DPO, dpo_clip=DPO_CLIP, beta_kl=BETA_KL, beta_rm=BETA_RM),
    "rto_no_rm": bind(rto_no_rm, beta_dpo=BETA_DPO, dpo_clip=DPO_CLIP, beta_kl=BETA_KL),
    "ppo": bind(ppo, beta_kl=BETA_KL, beta_rm=BETA_RM),
}


def _config(reward="rto", **kw):
    sampling = SamplingConfig(max_new_tokens=R, eos_id=EOS, pad_id=PAD, temperature=TAU)
    defaults = dict(
        gamma=GAMMA,
        lam=LAM,
        score_clip=SCORE_CLIP,
        missing_eos_penalty=1.0,
        whiten_advantages=True,
        ppo_epochs=2,
        num_minibatches=2,
        clip_eps=0.1,
        value_clip_eps=0.05,
        vf_coef=0.7,
        entropy_coef=0.01,
    )
    return PPOConfig(sampling=sampling, token_reward=REWARDS[reward], **{**defaults, **kw})


# One optimizer object each (a static part of the state: new objects would recompile every jitted function).
# Adam's eps is raised so that float32 noise in tiny gradients cannot flip update signs between two paths.
POLICY_TX = make_optimizer(OptimizerConfig(learning_rate=1e-2, schedule="constant", eps=1e-4, max_grad_norm=1.0))
CRITIC_TX = make_optimizer(OptimizerConfig(learning_rate=3e-2, schedule="constant", eps=1e-4, max_grad_norm=5.0))
_FNS = {}


def _ppo_fns(config):
    """make_ppo_fns(config), once per config (each call makes new jitted functions, compiled anew)."""
    if config not in _FNS:
        _FNS[config] = make_ppo_fns(config)
    return _FNS[config]


@pytest.fixture(scope="module")
def models():
    policy = _lm(0)
    return {
        "policy": policy,
        "ref": _lm(1),
        "dpo": _lm(2),
        "critic": ScalarHeadModel.from_causal_lm(policy, nnx.Rngs(3)),
        "reward": ScalarHeadModel(tiny_config(), nnx.Rngs(4)),
    }


def _state(models):
    """A fresh PPOState on copies of the models (so a donated update never touches the fixtures)."""
    return create_ppo_state(
        _copy(models["policy"]),
        _copy(models["critic"]),
        POLICY_TX,
        CRITIC_TX,
        frozen={"ref": _params(models["ref"]), "dpo": _params(models["dpo"])},
        reward_model=_copy(models["reward"]),
        reward_mean=REWARD_MEAN,
        reward_std=REWARD_STD,
    )


@pytest.fixture(scope="module")
def experiences(models):
    """{reward name: (config, Experience, metrics)} from one rollout each (same prompts and key)."""
    prompts = _prompts(0, B)
    out = {}
    for name in REWARDS:
        config = _config(name)
        experience_fn, _, _ = _ppo_fns(config)
        experience, metrics = experience_fn(_state(models), prompts, jax.random.key(0))
        out[name] = (config, jax.tree.map(np.asarray, experience), {k: float(v) for k, v in metrics.items()})
    return out


# ----------------------------------------------------------------------------------------------
# The numpy rebuild of make_experience.


@functools.partial(jax.jit, static_argnums=0)
def _full_forward(graphdef, params, input_ids, attention_mask, positions):
    return nnx.merge(graphdef, params)(input_ids, attention_mask=attention_mask, positions=positions)


def _forward(model, experience):
    """Full-sequence forward pass, float64 numpy: LM logits [B, T, V] or scalar head [B, T]."""
    graphdef, params = nnx.split(model)
    inputs = (experience.input_ids, experience.attention_mask, experience.positions)
    return np.asarray(_full_forward(graphdef, params, *map(jnp.asarray, inputs)), np.float64)


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _token_logps(model, experience, with_entropy=False, temperature=TAU):
    """log pi(y_h | x, y_<h) at `temperature` from the logits at column P-1+h; 0 past the mask.

    with_entropy: also the entropy [B, R] of those temperature-scaled distributions.
    """
    logp = _log_softmax(_forward(model, experience) / temperature)
    tokens, mask = experience.input_ids[:, P:], experience.response_mask
    out, entropy = np.zeros((B, R)), np.zeros((B, R))
    for b in range(B):
        for h in range(R):
            if mask[b, h] > 0:
                out[b, h] = logp[b, P - 1 + h, tokens[b, h]]
                entropy[b, h] = -np.sum(np.exp(logp[b, P - 1 + h]) * logp[b, P - 1 + h])
    return (out, entropy) if with_entropy else out


def _rebuild_experience(models, experience, reward):
    """Everything make_experience computes, from the rollout's token arrays alone."""
    ids, mask = experience.input_ids, experience.response_mask
    tokens = ids[:, P:]
    # Layout (CONTRACT.md): mask is 1 up to and including the first EOS; positions from the attention mask.
    expected_mask = np.ones((B, R))
    for b in range(B):
        hits = np.flatnonzero(tokens[b] == EOS)
        if hits.size:
            expected_mask[b, hits[0] + 1 :] = 0
    np.testing.assert_array_equal(mask, expected_mask)
    np.testing.assert_array_equal(experience.attention_mask[:, P:], expected_mask)
    np.testing.assert_array_equal(experience.positions, np.maximum(np.cumsum(experience.attention_mask, 1) - 1, 0))
    lengths = mask.sum(1).astype(int)
    last = lengths - 1
    has_eos = np.array([tokens[b, last[b]] == EOS for b in range(B)])

    logp = {name: _token_logps(models[name], experience) for name in ("ref", "dpo")}
    # DPO's implicit reward is a property of the models' own distributions: temperature 1.
    own = {name: _token_logps(models[name], experience, temperature=1.0) for name in ("ref", "dpo")}
    logp["policy"], entropy = _token_logps(models["policy"], experience, with_entropy=True)
    critic = _forward(models["critic"], experience)
    values = np.zeros((B, R))
    for b in range(B):
        for h in range(lengths[b]):
            values[b, h] = critic[b, P - 1 + h]  # V(s_h): the state just before token h
    rm = _forward(models["reward"], experience)
    raw = np.array([rm[b, P + last[b]] for b in range(B)])
    normalized = (raw - REWARD_MEAN) / REWARD_STD
    score = np.clip(normalized, -SCORE_CLIP, SCORE_CLIP) - 1.0 * (~has_eos)

    kind = reward.name
    parts = {"kl": np.zeros((B, R))}
    if kind != "ppo":
        parts["dpo"] = np.zeros((B, R))
    if kind != "rto_no_rm":
        parts["score"] = np.zeros((B, R))
    for b in range(B):
        for h in range(lengths[b]):
            parts["kl"][b, h] = -BETA_KL * (logp["policy"][b, h] - logp["ref"][b, h])
            if "dpo" in parts:
                parts["dpo"][b, h] = min(max(BETA_DPO * (own["dpo"][b, h] - own["ref"][b, h]), -DPO_CLIP), DPO_CLIP)
            if "score" in parts and h == last[b]:
                parts["score"][b, h] = BETA_RM * score[b]
    rewards = sum(parts.values())

    advantages, returns = np.zeros((B, R)), np.zeros((B, R))
    for b in range(B):
        next_adv = next_value = 0.0
        for h in reversed(range(lengths[b])):
            delta = rewards[b, h] + GAMMA * next_value - values[b, h]
            next_adv = delta + GAMMA * LAM * next_adv
            next_value = values[b, h]
            advantages[b, h] = next_adv
            returns[b, h] = next_adv + values[b, h]
    valid = mask > 0
    mean = advantages[valid].mean()
    var = np.mean((advantages[valid] - mean) ** 2)  # population variance, eps 1e-8 (masked_whiten)
    whitened = np.where(valid, (advantages - mean) / np.sqrt(var + 1e-8), 0.0)

    per_sequence = lambda x: float(np.mean(np.sum(x, 1)))
    metrics = {f"reward/{k}": per_sequence(v) for k, v in parts.items()}
    metrics.update(
        {
            "reward/total": per_sequence(rewards),
            "response_length": float(lengths.mean()),
            "eos_rate": float(has_eos.mean()),
            "value_mean": float(values[valid].mean()),
            "entropy": float(entropy[valid].mean()),
            "kl_to_ref": per_sequence(logp["policy"] - logp["ref"]),
        }
    )
    if kind != "rto_no_rm":
        metrics.update(score=float(raw.mean()), score_normalized=float(score.mean()))
    arrays = dict(logp_old=logp["policy"], values=values, advantages=whitened, returns=returns)
    facts = dict(has_eos=has_eos, normalized=normalized, logp=logp)
    return arrays, metrics, facts


@pytest.mark.parametrize("reward", list(REWARDS))
def test_experience_matches_numpy_rebuild(models, experiences, reward):
    config, experience, metrics = experiences[reward]
    arrays, expected_metrics, facts = _rebuild_experience(models, experience, config.token_reward)

    # The set-up exercises every branch: rows with and without EOS, clipped and unclipped scores,
    # clipped and unclipped DPO token rewards, three different language models.
    assert facts["has_eos"].any() and not facts["has_eos"].all()
    assert (np.abs(facts["normalized"]) > SCORE_CLIP).any() and (np.abs(facts["normalized"]) < SCORE_CLIP).any()
    valid = experience.response_mask > 0
    dpo_term = np.abs(BETA_DPO * (facts["logp"]["dpo"] - facts["logp"]["ref"]))[valid]
    assert (dpo_term > DPO_CLIP).any() and (dpo_term < DPO_CLIP).any()
    assert np.abs(facts["logp"]["policy"] - facts["logp"]["ref"])[valid].mean() > 0.05

    np.testing.assert_allclose(experience.logp_old, arrays["logp_old"], atol=1e-4)
    np.testing.assert_allclose(experience.values, arrays["values"], atol=1e-5)
    np.testing.assert_allclose(experience.returns, arrays["returns"], atol=1e-4)
    np.testing.assert_allclose(experience.advantages, arrays["advantages"], atol=1e-4)
    assert set(expected_metrics) <= set(metrics)
    for key, value in expected_metrics.items():
        assert metrics[key] == pytest.approx(value, rel=1e-4, abs=1e-5), key
    if reward == "rto_no_rm":
        assert "reward/score" not in metrics and "score" not in metrics
    if reward == "ppo":
        assert "reward/dpo" not in metrics


def test_runs_that_differ_only_in_coefficients_share_one_compiled_program(models, experiences):
    """A sweep over a token reward's coefficients (a study's KL cell, each method's own values) compiles
    PPO's step once: the coefficients are arguments of the program, and each run computes with its own
    (a half beta_kl halves the KL reward of the same samples; the full one matches the rebuilt fixture)."""
    cache = functools.lru_cache(jitted_ppo_fns)
    prompts = _prompts(0, B)
    runs = {}
    for beta_kl in (BETA_KL, BETA_KL / 2):
        reward = bind(rto, beta_dpo=BETA_DPO, dpo_clip=DPO_CLIP, beta_kl=beta_kl, beta_rm=BETA_RM)
        experience_fn, _, _ = make_ppo_fns(dataclasses.replace(_config("rto"), token_reward=reward), jitted=cache)
        metrics = experience_fn(_state(models), prompts, jax.random.key(0))[1]
        runs[beta_kl] = {k: float(v) for k, v in metrics.items()}
    assert cache.cache_info().misses == 1
    structure = dataclasses.replace(_config("rto"), token_reward=REWARDS["rto"].structure())
    assert cache(structure, None)[0]._cache_size() == 1  # one trace and compile for both values
    full, half = runs[BETA_KL], runs[BETA_KL / 2]
    assert full["reward/kl"] == pytest.approx(experiences["rto"][2]["reward/kl"], rel=1e-5)
    assert abs(full["reward/kl"]) > 1e-3 and half["reward/kl"] == pytest.approx(full["reward/kl"] / 2, rel=1e-5)
    assert half["reward/dpo"] == pytest.approx(full["reward/dpo"], rel=1e-5)  # the same samples


# ----------------------------------------------------------------------------------------------
# The rebuild of ppo_update.


def _rebuild_loss(params, batch, graphdefs, config):
    """Clipped surrogate + vf_coef * clipped value loss - entropy_coef * entropy, from full forwards."""
    policy = nnx.merge(graphdefs[0], params[0])
    critic = nnx.merge(graphdefs[1], params[1])
    inputs = dict(attention_mask=batch.attention_mask, positions=batch.positions)
    logits = policy(batch.input_ids, **inputs)[:, P - 1 : -1] / config.sampling.temperature
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    tokens = batch.input_ids[:, P:]
    mask = batch.response_mask
    logp = jnp.where(mask > 0, jnp.take_along_axis(log_probs, tokens[..., None], axis=-1)[..., 0], 0.0)
    pg, _ = policy_loss(logp, batch.logp_old, batch.advantages, mask, config.clip_eps, config.loss_average)
    values = critic(batch.input_ids, **inputs)[:, P - 1 : -1]
    vf, _ = value_loss(values, batch.values, batch.returns, mask, config.value_clip_eps, config.loss_average)
    token_entropy = -jnp.sum(jnp.exp(log_probs) * log_probs, axis=-1)
    entropy = jnp.sum(token_entropy * mask) / jnp.sum(mask)
    return pg + config.vf_coef * vf - config.entropy_coef * entropy


@functools.partial(jax.jit, static_argnums=(3, 4, 5))
def _rebuild_step(params, opt_states, batch, graphdefs, txs, config):
    """One minibatch: gradients of the loss above, then each model's own optax transformation."""
    loss, grads = jax.value_and_grad(_rebuild_loss)(params, batch, graphdefs, config)
    new_params, new_states = [], []
    for tx, p, g, o in zip(txs, params, grads, opt_states):
        updates, o = tx.update(g, o, p)
        new_params.append(optax.apply_updates(p, updates))
        new_states.append(o)
    return tuple(new_params), tuple(new_states), loss


def _rebuild_update(state, experience, rng, config, same_rows=False):
    """ppo_update as nested Python loops; returns the final (policy, critic) params and the minibatches used."""
    graphdefs = (state.policy.graphdef, state.critic.graphdef)
    params = (state.policy.params, state.critic.params)
    txs = (state.policy.tx, state.critic.tx)
    opt_states = tuple(tx.init(p) for tx, p in zip(txs, params))
    used, losses = [], []
    for epoch_rng in jax.random.split(rng, config.ppo_epochs):
        order = np.asarray(jax.random.permutation(epoch_rng, B)).reshape(config.num_minibatches, -1)
        used.append(order)
        for minibatch in order:
            indices = order[0] if same_rows else minibatch
            batch = jax.tree.map(lambda x: jnp.asarray(x[indices]), experience)
            params, opt_states, loss = _rebuild_step(params, opt_states, batch, graphdefs, txs, config)
            losses.append(float(loss))
    return params, used, losses


@pytest.fixture(scope="module")
def update_run(models, experiences):
    config, experience, _ = experiences["rto"]
    _, update_fn, _ = _ppo_fns(config)
    rng = jax.random.key(7)
    state = _state(models)
    initial = jax.tree.map(jnp.copy, (state.policy.params, state.critic.params))
    new_state, metrics = update_fn(state, jax.tree.map(jnp.asarray, experience), rng)
    final = (new_state.policy.params, new_state.critic.params)
    return config, experience, rng, initial, final, {k: float(v) for k, v in metrics.items()}


def _max_diff(a, b):
    return max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_update_matches_loop_rebuild(models, update_run):
    config, experience, rng, initial, final, metrics = update_run
    assert (config.ppo_epochs, config.num_minibatches) == (2, 2)
    (policy, critic), used, losses = _rebuild_update(_state(models), experience, rng, config)
    for order in used:  # each epoch is a permutation: every row once
        np.testing.assert_array_equal(np.sort(order.ravel()), np.arange(B))
    for i, (got, want) in enumerate([(final[0], policy), (final[1], critic)]):
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_allclose(a, b, atol=1e-5, err_msg=("policy", "critic")[i])
    # Both models moved, by much more than the tolerance.
    assert _max_diff(initial[0], final[0]) > 1e-3
    assert _max_diff(initial[1], final[1]) > 1e-3
    assert metrics["loss"] == pytest.approx(np.mean(losses), rel=1e-4, abs=1e-6)
    # The comparison can tell the minibatches apart: reusing one minibatch's rows lands elsewhere.
    (policy_same, critic_same), _, _ = _rebuild_update(_state(models), experience, rng, config, same_rows=True)
    assert _max_diff(final[0], policy_same) > 1e-4 and _max_diff(final[1], critic_same) > 1e-4


def test_sequence_averaged_update_matches_loop_rebuild(models, update_run):
    """loss_average="sequence" reaches both losses: the update equals the rebuild with per-response
    means, and lands elsewhere than the token-mean update of the same rollout."""
    config, experience, rng, _, token_final, _ = update_run
    config = dataclasses.replace(config, loss_average="sequence")
    assert len({int(m.sum()) for m in experience.response_mask}) > 2  # ragged: the two averages differ
    _, update_fn, _ = _ppo_fns(config)
    new_state, _ = update_fn(_state(models), jax.tree.map(jnp.asarray, experience), rng)
    final = (new_state.policy.params, new_state.critic.params)
    (policy, critic), _, _ = _rebuild_update(_state(models), experience, rng, config)
    for got, want in [(final[0], policy), (final[1], critic)]:
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_allclose(a, b, atol=1e-5)
    assert _max_diff(final[0], token_final[0]) > 1e-4 and _max_diff(final[1], token_final[1]) > 1e-4


def _numpy_average(x, mask, average):
    x, mask = np.asarray(x, np.float64), np.asarray(mask, np.float64)
    if average == "token":
        return float((x * mask).sum() / mask.sum())
    rows = mask.sum(1) > 0
    return float(((x * mask).sum(1)[rows] / mask.sum(1)[rows]).mean())


@pytest.mark.parametrize("average", ["token", "sequence"])
def test_one_minibatch_update_reports_the_numpy_averages_of_both_losses(models, experiences, average):
    """One epoch, one minibatch: the update's losses are those of the rollout's own models, where the
    ratio is 1 and V = V_old, so policy loss = average(-A) and value loss = average((V_old - G)^2),
    each averaged over tokens or per response as config.loss_average says."""
    config, experience, _ = experiences["rto"]
    config = dataclasses.replace(config, ppo_epochs=1, num_minibatches=1, loss_average=average)
    _, update_fn, _ = _ppo_fns(config)
    _, metrics = update_fn(_state(models), jax.tree.map(jnp.asarray, experience), jax.random.key(3))
    mask = experience.response_mask
    assert len({int(m.sum()) for m in mask}) > 2  # ragged: the two averages differ
    losses = {
        "policy_loss": -experience.advantages,
        "value_loss": np.square(experience.values.astype(np.float64) - experience.returns),
    }
    for key, per_token in losses.items():
        expected = _numpy_average(per_token, mask, average)
        other = _numpy_average(per_token, mask, "sequence" if average == "token" else "token")
        assert abs(expected - other) > 1e-3, key  # the comparison can tell the averages apart
        assert float(metrics[key]) == pytest.approx(expected, rel=1e-4, abs=1e-5), key


def test_first_minibatch_ratio_is_one(models, update_run):
    config, experience, _, _, _, metrics = update_run
    assert config.sampling.temperature == TAU != 1.0
    # The reference really differs from the policy (so a ratio of 1 is not an accident of equal models).
    valid = experience.response_mask > 0
    gap = _token_logps(models["policy"], experience) - _token_logps(models["ref"], experience)
    assert np.abs(gap[valid]).mean() > 0.05
    assert abs(metrics["first/ratio_mean"] - 1.0) < 1e-5
    assert metrics["first/clipfrac"] == 0.0
    assert metrics["first/approx_kl"] < 1e-6


# ----------------------------------------------------------------------------------------------
# Learning: a few RTO iterations raise the reward model's score.


def _preference_batch(seed, batch=8):
    """Toy preferences: chosen responses are GOOD tokens, rejected ones never are; both end in EOS."""
    rng = np.random.default_rng(seed)
    prompts = _prompts(seed, batch)
    out = dict(prompts)
    for name, good in (("chosen", True), ("rejected", False)):
        lengths = rng.integers(2, R + 1, batch)
        mask = (np.arange(R)[None] < lengths[:, None]).astype(np.float32)
        others = [t for t in range(2, VOCAB) if t != GOOD]
        body = np.full((batch, R), GOOD) if good else rng.choice(others, (batch, R))
        ids = np.where(np.arange(R)[None] == lengths[:, None] - 1, EOS, body)
        ids = np.where(mask > 0, ids, PAD)
        input_ids = np.concatenate([np.asarray(prompts["prompt_ids"]), ids], 1).astype(np.int32)
        attention = np.concatenate([np.asarray(prompts["prompt_mask"]), mask], 1).astype(np.int32)
        out.update(
            {
                f"{name}_input_ids": jnp.asarray(input_ids),
                f"{name}_attention_mask": jnp.asarray(attention),
                f"{name}_response_mask": jnp.asarray(mask),
            }
        )
    return out


def _last_token_scores(model, input_ids, attention_mask, response_mask):
    scores = model(input_ids, attention_mask=attention_mask, positions=default_positions(attention_mask))
    last = P + jnp.sum(response_mask, axis=1).astype(jnp.int32) - 1
    return jnp.take_along_axis(scores, last[:, None], axis=1)[:, 0]


@functools.partial(jax.jit, static_argnums=(0, 1))
def _reward_model_step(graphdef, tx, params, opt_state, batch):
    """One Bradley-Terry step, -log sigmoid(score(chosen) - score(rejected)), written here."""

    def loss_fn(params):
        model = nnx.merge(graphdef, params)
        chosen, rejected = (
            _last_token_scores(model, *(batch[f"{name}_{k}"] for k in ("input_ids", "attention_mask", "response_mask")))
            for name in ("chosen", "rejected")
        )
        return -jnp.mean(jax.nn.log_sigmoid(chosen - rejected))

    grads = jax.grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state


def _trained_reward_model():
    graphdef, params = nnx.split(ScalarHeadModel(tiny_config(), nnx.Rngs(11)))
    tx = optax.adam(3e-3)
    opt_state = tx.init(params)
    batches = [_preference_batch(i) for i in range(4)]
    for i in range(60):
        params, opt_state = _reward_model_step(graphdef, tx, params, opt_state, batches[i % 4])
    return nnx.merge(graphdef, params)


def _rollout_scores(experience, reward_model):
    """Reward-model scores [B] of a rollout, read in numpy at each row's last real response token."""
    scores = _forward(reward_model, experience)
    last = P + experience.response_mask.sum(1).astype(int) - 1
    return scores[np.arange(len(last)), last]


def test_rto_iterations_raise_the_score():
    """The RTO reward (DPO and KL terms non-zero) with a reward model trained to prefer GOOD tokens.

    Same config and shapes as the rebuild tests, so the jitted functions are reused.
    """
    reward_model = _trained_reward_model()
    policy = _lm(12, scale=1.0)
    state = create_ppo_state(
        _copy(policy),
        ScalarHeadModel.from_causal_lm(policy, nnx.Rngs(13)),
        POLICY_TX,
        CRITIC_TX,
        frozen={"ref": _params(policy), "dpo": _params(_lm(14))},
        reward_model=reward_model,
        reward_mean=REWARD_MEAN,
        reward_std=REWARD_STD,
    )
    experience_fn, update_fn, _ = _ppo_fns(_config("rto"))
    prompts, eval_prompts = _prompts(1, B), _prompts(2, B)

    def evaluate(state):
        rollouts = [experience_fn(state, eval_prompts, jax.random.key(1000 + i))[0] for i in range(3)]
        return np.concatenate([_rollout_scores(jax.tree.map(np.asarray, e), reward_model) for e in rollouts])

    initial = evaluate(state)
    # Center the score on the initial policy's mean (as the pipeline's normalization does); a unit std
    # keeps the normalized scores inside the score clip.
    stats = {"reward_mean": jnp.float32(initial.mean()), "reward_std": jnp.float32(1.0)}
    state = state.replace(frozen={**state.frozen, **stats})
    before = initial.mean()
    for i in range(ITERATIONS):
        experience, metrics = experience_fn(state, prompts, jax.random.key(2 * i))
        assert abs(float(metrics["reward/dpo"])) > 1e-3
        if i:
            assert abs(float(metrics["reward/kl"])) > 1e-4
        state, _ = update_fn(state, experience, jax.random.key(2 * i + 1))
    after = evaluate(state).mean()
    assert after > before + 0.6, (before, after)


# ----------------------------------------------------------------------------------------------
# The sampler stops as soon as every row has emitted EOS.


def test_sampler_stops_early_when_every_row_is_done():
    """Greedy decoding, so the EOS can be chosen from a free run (EOS out of the vocabulary, never emitted)."""
    model, length, batch = _lm(0), 8, 8
    prompts = _prompts(3, batch)
    greedy = lambda eos: SamplingConfig(max_new_tokens=length, eos_id=eos, pad_id=PAD, greedy=True)
    free = sample(model, prompts["prompt_ids"], prompts["prompt_mask"], jax.random.key(0), greedy(VOCAB))
    assert int(free.steps) == length
    tokens = np.asarray(free.tokens)

    # An EOS that one row emits first and other rows emit later (but before the last step).
    def first_hits(eos):
        return {b: int(np.flatnonzero(tokens[b, :-1] == eos)[0]) for b in range(batch) if eos in tokens[b, :-1]}

    candidates = [e for e in range(1, VOCAB) if 0 in first_hits(e).values() and len(set(first_hits(e).values())) > 1]
    assert candidates
    eos = max(candidates, key=lambda e: len(first_hits(e)))
    hits = first_hits(eos)
    rows = np.resize(np.array(sorted(hits)), batch)  # only rows that reach this EOS, repeated to the batch size
    lengths = np.array([hits[b] + 1 for b in rows])
    out = sample(model, prompts["prompt_ids"][rows], prompts["prompt_mask"][rows], jax.random.key(0), greedy(eos))
    np.testing.assert_array_equal(np.asarray(out.response_mask).sum(1), lengths)
    for i, (row, n) in enumerate(zip(rows, lengths)):  # the free run's tokens up to and including the EOS
        np.testing.assert_array_equal(np.asarray(out.tokens)[i, :n], tokens[row, :n])
    assert int(out.steps) == lengths.max() < length

    # Every row emits EOS at once (a row whose first token is the EOS, repeated): one decode step.
    rows = np.full(batch, [b for b, first in hits.items() if first == 0][0])
    out = sample(model, prompts["prompt_ids"][rows], prompts["prompt_mask"][rows], jax.random.key(0), greedy(eos))
    np.testing.assert_array_equal(np.asarray(out.response_mask).sum(1), 1)
    assert int(out.steps) == 1
