"""Step functions: a tiny model learns, PPO's first ratio is 1, and every step compiles once."""

import dataclasses
import gc
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from rto_jax.models import CausalLM, ModelConfig, ScalarHeadModel, default_positions
from rto_jax.objectives.advantages import needs_critic
from rto_jax.objectives.token_rewards import bind, ppo, rto
from rto_jax.sampling import SamplingConfig
from rto_jax.train import (
    DPOLoss,
    OptimizerConfig,
    PPOConfig,
    TrainState,
    create_ppo_state,
    make_optimizer,
    make_ppo_fns,
    RewardModelLoss,
    SFTLoss,
    make_train_step,
    precompute_reference_logps,
    sequence_scores,
)

VOCAB, PAD, EOS, GOOD = 16, 0, 1, 7
P, R = 4, 6


def tiny_config(**kw):
    return ModelConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        **kw,
    )


def _sequences(prompts, prompt_mask, responses, response_mask):
    input_ids = np.concatenate([prompts, responses], 1).astype(np.int32)
    attention_mask = np.concatenate([prompt_mask, response_mask], 1).astype(np.int32)
    return {
        "input_ids": jnp.asarray(input_ids),
        "attention_mask": jnp.asarray(attention_mask),
        "positions": default_positions(jnp.asarray(attention_mask)),
        "response_mask": jnp.asarray(response_mask, jnp.float32),
    }


def _prompts(rng, batch):
    lengths = rng.integers(1, P + 1, batch)
    mask = (np.arange(P)[None] >= P - lengths[:, None]).astype(np.int32)
    ids = np.where(mask > 0, rng.integers(2, VOCAB, (batch, P)), PAD)
    return ids, mask


def _responses(rng, batch, good: bool):
    """Ragged responses ending in EOS: all GOOD tokens if `good`, else tokens that never are GOOD."""
    lengths = rng.integers(2, R + 1, batch)
    mask = (np.arange(R)[None] < lengths[:, None]).astype(np.float32)
    body = np.full((batch, R), GOOD) if good else rng.choice([t for t in range(2, VOCAB) if t != GOOD], (batch, R))
    ids = np.where(np.arange(R)[None] == lengths[:, None] - 1, EOS, body)
    return np.where(mask > 0, ids, PAD), mask


def preference_batch(seed, batch=8):
    rng = np.random.default_rng(seed)
    prompts, prompt_mask = _prompts(rng, batch)
    chosen, chosen_mask = _responses(rng, batch, good=True)
    rejected, rejected_mask = _responses(rng, batch, good=False)
    out = {"prompt_ids": jnp.asarray(prompts, jnp.int32), "prompt_mask": jnp.asarray(prompt_mask)}
    for name, ids, mask in [("chosen", chosen, chosen_mask), ("rejected", rejected, rejected_mask)]:
        out.update({f"{name}_{k}": v for k, v in _sequences(prompts, prompt_mask, ids, mask).items()})
    return out


def sft_batch(seed, batch=8):
    rng = np.random.default_rng(seed)
    prompts, prompt_mask = _prompts(rng, batch)
    responses, mask = _responses(rng, batch, good=False)
    return _sequences(prompts, prompt_mask, responses, mask)


def _state(model, lr=3e-3, **kw):
    return TrainState.create(model, make_optimizer(OptimizerConfig(learning_rate=lr, schedule="constant", **kw)))


def test_sft_loss_falls_and_step_compiles_once():
    step = make_train_step(SFTLoss())
    state = _state(CausalLM(tiny_config(), nnx.Rngs(0)))
    batch = sft_batch(0)
    losses = []
    for _ in range(40):
        state, metrics = step(state, batch, jax.random.key(0))
        losses.append(float(metrics["loss"]))
    assert losses[-1] < 0.5 * losses[0]
    assert int(state.step) == 40
    assert step._cache_size() == 1


def test_sft_gradient_accumulation_matches_full_batch():
    batch = sft_batch(1)
    full_rows = {k: v for k, v in batch.items()}
    # Equal token counts per micro-batch make the two token means identical.
    full_rows["response_mask"] = jnp.ones_like(batch["response_mask"])
    full_rows["attention_mask"] = full_rows["attention_mask"].at[:, P:].set(1)
    results = []
    for accum in (1, 2):
        # Plain SGD, so the parameter change is the gradient itself (Adam would amplify float noise).
        state = TrainState.create(CausalLM(tiny_config(), nnx.Rngs(0)), optax.sgd(1.0))
        state, metrics = make_train_step(SFTLoss(), grad_accum_steps=accum)(state, full_rows, jax.random.key(0))
        results.append((metrics["loss"], state.params))
    np.testing.assert_allclose(results[0][0], results[1][0], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(results[0][1]), jax.tree.leaves(results[1][1])):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-4)


def test_reward_model_separates_toy_preferences():
    step = make_train_step(RewardModelLoss())
    state = _state(ScalarHeadModel(tiny_config(), nnx.Rngs(0)))
    for i in range(60):
        state, metrics = step(state, preference_batch(i % 4), jax.random.key(0))
    held_out = preference_batch(100, batch=32)
    model = state.model()
    chosen = sequence_scores(
        model,
        held_out["chosen_input_ids"],
        held_out["chosen_attention_mask"],
        held_out["chosen_positions"],
        held_out["chosen_response_mask"],
    )
    rejected = sequence_scores(
        model,
        held_out["rejected_input_ids"],
        held_out["rejected_attention_mask"],
        held_out["rejected_positions"],
        held_out["rejected_response_mask"],
    )
    assert float(jnp.mean(chosen > rejected)) == 1.0
    assert step._cache_size() == 1


@pytest.mark.parametrize("precomputed", [True, False])
def test_dpo_margin_grows(precomputed):
    policy = CausalLM(tiny_config(), nnx.Rngs(0))
    graphdef, ref_params = nnx.split(policy)
    ref_params = jax.tree.map(jnp.copy, ref_params)
    state = _state(policy, lr=2e-3, max_grad_norm=1.0)
    if not precomputed:
        state = state.replace(frozen={"ref": ref_params})
    step = make_train_step(DPOLoss(beta=0.1))
    margins = []
    for i in range(25):
        batch = preference_batch(i % 4)
        if precomputed:
            batch = {**batch, **precompute_reference_logps(graphdef, ref_params, batch)}
        state, metrics = step(state, batch, jax.random.key(0))
        margins.append(float(metrics["rewards/margin"]))
    assert margins[0] == pytest.approx(0.0, abs=1e-5)  # policy == reference at the start
    assert margins[-1] > 0.5
    assert step._cache_size() == 1


def _trained_reward_model():
    step = make_train_step(RewardModelLoss())
    state = _state(ScalarHeadModel(tiny_config(), nnx.Rngs(1)))
    for i in range(60):
        state, _ = step(state, preference_batch(i % 4), jax.random.key(0))
    return state.model()


@pytest.fixture(scope="module")
def reward_model():
    return _trained_reward_model()


def _ppo(reward_model, beta_dpo, lr=3e-3, **kw):
    policy = CausalLM(tiny_config(), nnx.Rngs(2))
    critic = ScalarHeadModel.from_causal_lm(policy, nnx.Rngs(3))
    tx = make_optimizer(OptimizerConfig(learning_rate=lr, schedule="constant"))
    frozen = {"ref": nnx.split(policy)[1]}
    if beta_dpo:
        frozen["dpo"] = nnx.split(CausalLM(tiny_config(), nnx.Rngs(4)))[1]
    beta_kl = kw.pop("beta_kl", 0.01)
    reward = bind(rto, beta_dpo=beta_dpo, beta_kl=beta_kl) if beta_dpo else bind(ppo, beta_kl=beta_kl)
    sampling = SamplingConfig(max_new_tokens=R, eos_id=EOS, pad_id=PAD, temperature=kw.pop("temperature", 1.0))
    config = PPOConfig(sampling=sampling, token_reward=reward, **kw)
    if not needs_critic(config.estimator):
        critic = None
    state = create_ppo_state(policy, critic, tx, tx, frozen=frozen, reward_model=reward_model)
    return state, make_ppo_fns(config)


@pytest.mark.parametrize("beta_dpo", [0.0, 0.05])
def test_first_ppo_epoch_has_ratio_one(reward_model, beta_dpo):
    state, (experience_fn, update_fn, _) = _ppo(reward_model, beta_dpo, ppo_epochs=2, num_minibatches=2)
    rng = np.random.default_rng(0)
    prompt_ids, prompt_mask = _prompts(rng, 16)
    prompts = {"prompt_ids": jnp.asarray(prompt_ids, jnp.int32), "prompt_mask": jnp.asarray(prompt_mask)}
    experience, rollout_metrics = experience_fn(state, prompts, jax.random.key(0))
    assert experience.advantages.dtype == jnp.float32 and experience.logp_old.dtype == jnp.float32
    state, metrics = update_fn(state, experience, jax.random.key(1))
    assert abs(float(metrics["first/ratio_mean"]) - 1.0) < 1e-5
    assert float(metrics["first/clipfrac"]) == 0.0
    assert float(metrics["first/approx_kl"]) < 1e-6
    assert np.isfinite(float(metrics["loss"]))
    assert float(rollout_metrics["kl_to_ref"]) == pytest.approx(0.0, abs=1e-5)  # policy == reference


def test_experience_is_the_same_however_it_is_scored(reward_model):
    """The policy's log-probs and entropy from the sampler (default) or a teacher-forced pass, the frozen
    models one pass each or stacked in one, the LM head whole or over vocabulary slices (5 does not
    divide the vocabulary of 16): the same experience and metrics, at temperature 0.7 (so tempered and
    untempered log-probs differ)."""
    rng = np.random.default_rng(0)
    prompt_ids, prompt_mask = _prompts(rng, 16)
    prompts = {"prompt_ids": jnp.asarray(prompt_ids, jnp.int32), "prompt_mask": jnp.asarray(prompt_mask)}
    variants = {
        "recompute": {"recompute_policy_logprobs": True, "vocab_chunk": 0},
        "sampler": {"vocab_chunk": 0},
        "stacked": {"stack_frozen": True, "vocab_chunk": 0},
        "sliced": {"vocab_chunk": 5},
    }
    results = {}
    for name, kw in variants.items():
        state, (experience_fn, _, _) = _ppo(reward_model, 0.05, temperature=0.7, beta_kl=0.1, **kw)
        results[name] = experience_fn(state, prompts, jax.random.key(0))
    expected, expected_metrics = results.pop("recompute")
    assert float(expected_metrics["reward/dpo"]) != 0.0 and float(expected_metrics["entropy"]) > 0.1
    for name, (experience, metrics) in results.items():
        for field in experience._fields:
            np.testing.assert_allclose(getattr(experience, field), getattr(expected, field), atol=1e-4, err_msg=name)
        for key, value in expected_metrics.items():
            np.testing.assert_allclose(metrics[key], value, atol=1e-4, rtol=1e-5, err_msg=f"{name}: {key}")


def test_ppo_iteration_raises_the_score_and_compiles_once(reward_model):
    state, (experience_fn, _, iteration_fn) = _ppo(
        reward_model, 0.0, lr=1e-2, ppo_epochs=4, num_minibatches=2, beta_kl=0.0
    )
    rng = np.random.default_rng(0)
    prompt_ids, prompt_mask = _prompts(rng, 64)
    prompts = {"prompt_ids": jnp.asarray(prompt_ids, jnp.int32), "prompt_mask": jnp.asarray(prompt_mask)}
    _, before = experience_fn(state, prompts, jax.random.key(123))
    for i in range(3):
        state, metrics = iteration_fn(state, prompts, jax.random.key(i))
    _, after = experience_fn(state, prompts, jax.random.key(123))
    assert float(after["score"]) > float(before["score"]) + 0.5, (before["score"], after["score"])
    assert iteration_fn.__wrapped__._cache_size() == 1


@pytest.mark.parametrize("estimator", ["rloo", "grpo", "reinforce_pp"])
def test_a_critic_free_estimator_raises_the_score_without_a_critic(reward_model, estimator):
    """16 prompts x 4 samples: the rows of one prompt are its group, the state holds and trains no
    critic, and the estimator's advantages (a numpy rebuild from the rollout's own rewards) drive the policy."""
    state, (experience_fn, update_fn, iteration_fn) = _ppo(
        reward_model, 0.0, lr=1e-2, ppo_epochs=4, num_minibatches=2, beta_kl=0.0,
        estimator=estimator, samples_per_prompt=4,
    )  # fmt: skip
    assert state.critic is None
    rng = np.random.default_rng(0)
    prompt_ids, prompt_mask = _prompts(rng, 16)
    prompts = {"prompt_ids": jnp.asarray(prompt_ids, jnp.int32), "prompt_mask": jnp.asarray(prompt_mask)}
    experience, before = experience_fn(state, prompts, jax.random.key(123))
    assert experience.input_ids.shape[0] == 64 and experience.values is None and experience.returns is None
    np.testing.assert_array_equal(experience.group_ids, np.repeat(np.arange(16), 4))
    prompt_part = np.asarray(experience.input_ids[:, :P]).reshape(16, 4, P)
    assert (prompt_part == np.asarray(prompt_ids)[:, None, :]).all()  # each prompt answered 4 times
    assert len({tuple(r) for r in np.asarray(experience.input_ids[:4, P:])}) > 1  # by different samples
    if estimator == "rloo":  # the score sits at the last token, gamma 1: every token has its row's advantage
        score = np.asarray(reward_model_scores(state, experience)).reshape(16, 4)
        others = (score.sum(1, keepdims=True) - score) / 3
        mask = np.asarray(experience.response_mask)
        want = ((score - others).reshape(-1)[:, None] * mask)
        np.testing.assert_allclose(experience.advantages, want, rtol=1e-4, atol=1e-4)
    state, metrics = update_fn(state, experience, jax.random.key(1))
    assert "value_loss" not in metrics and "critic_grad_norm" not in metrics and state.critic is None
    assert abs(float(metrics["first/ratio_mean"]) - 1.0) < 1e-5
    for i in range(3):
        state, metrics = iteration_fn(state, prompts, jax.random.key(i))
    _, after = experience_fn(state, prompts, jax.random.key(123))
    assert float(after["score"]) > float(before["score"]) + 0.5, (before["score"], after["score"])
    assert float(before["group_reward_std"]) > 0.0


def reward_model_scores(state, experience):
    """The PPO reward's score part: the normalized reward-model score (beta_kl 0, no DPO term)."""
    from rto_jax.objectives.ppo import normalized_score  # noqa: PLC0415
    from rto_jax.train.ppo import _has_eos  # noqa: PLC0415

    model = nnx.merge(state.reward_graphdef, state.frozen["reward"])
    inputs = (experience.input_ids, experience.attention_mask, experience.positions)
    raw = sequence_scores(model, *inputs, experience.response_mask)
    has_eos = _has_eos(experience.input_ids[:, P:], experience.response_mask, EOS)
    return normalized_score(raw, has_eos, mean=0.0, std=1.0, clip=10.0, missing_eos_penalty=1.0)


def test_an_estimator_and_a_state_that_disagree_on_the_critic_are_refused(reward_model):
    state, (experience_fn, _, _) = _ppo(reward_model, 0.0)  # GAE: a critic
    rng = np.random.default_rng(0)
    prompt_ids, prompt_mask = _prompts(rng, 8)
    prompts = {"prompt_ids": jnp.asarray(prompt_ids, jnp.int32), "prompt_mask": jnp.asarray(prompt_mask)}
    _, (rloo_fn, _, _) = _ppo(reward_model, 0.0, estimator="rloo", samples_per_prompt=2)
    with pytest.raises(ValueError, match="estimator 'rloo': the PPOState holds a critic"):
        rloo_fn(state, prompts, jax.random.key(0))


@dataclasses.dataclass(frozen=True)
class _ScaledSFT:
    """SFT's loss times `scale`: a distinct (hashable) step configuration per value."""

    scale: float

    def __call__(self, params, batch, state):
        loss, metrics = SFTLoss()(params, batch, state)
        return self.scale * loss, metrics


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="counts the process's memory maps (Linux /proc)")
def test_a_long_process_frees_the_compiled_steps_of_earlier_runs(monkeypatch, reward_model):
    """A study runs hundreds of stages in one process. Each compiled XLA program holds hundreds of memory
    maps while its jitted closure lives (stages' comment), and at vm.max_map_count (65530) the next compile segfaults (seen in
    CI). The stages' step caches keep the last STEP_CACHE_SIZE (PPO_STEP_CACHE_SIZE) configurations'
    steps only, so the map count levels off instead of growing with every run; full, they hold under
    half the limit.

    The same cache over make_train_step, at size 4 (16 compiles, not 4 x STEP_CACHE_SIZE): an evicted
    step frees its program's maps; then one PPO iteration's maps bound the full caches'."""
    import functools  # noqa: PLC0415

    from rto_jax.pipeline import stages  # noqa: PLC0415

    assert stages.train_step.cache_info().maxsize == stages.STEP_CACHE_SIZE
    assert stages._jitted_ppo_fns.cache_info().maxsize == stages.PPO_STEP_CACHE_SIZE
    size = 4
    monkeypatch.setattr(stages, "train_step", functools.lru_cache(maxsize=size)(stages.make_train_step))
    maps = lambda: sum(1 for _ in open("/proc/self/maps"))
    batch = sft_batch(0)
    counts = []
    for i in range(4 * size):
        state = _state(CausalLM(tiny_config(), nnx.Rngs(0)))
        stages.train_step(_ScaledSFT(1.0 + i))(state, batch, jax.random.key(0))
        gc.collect()
        counts.append(maps())
    per_step = (counts[size - 1] - counts[0]) / (size - 1)  # while the cache fills, every step is kept
    assert per_step > 5, counts
    later = counts[-1] - counts[2 * size - 1]  # 2 * size more steps once it is full
    assert later < 0.5 * 2 * size * per_step, counts
    # One PPO iteration's program, held: both caches full (a PPO entry runs its iteration) stay under
    # half the kernel's default limit (65530).
    state, (_, _, iteration_fn) = _ppo(reward_model, 0.05)
    prompt_ids, prompt_mask = _prompts(np.random.default_rng(0), 8)
    before = maps()
    prompts = {"prompt_ids": jnp.asarray(prompt_ids), "prompt_mask": jnp.asarray(prompt_mask)}
    iteration_fn(state, prompts, jax.random.key(0))
    gc.collect()
    per_ppo = maps() - before
    full = stages.STEP_CACHE_SIZE * per_step + stages.PPO_STEP_CACHE_SIZE * per_ppo
    assert per_ppo > per_step and full < 65530 / 2, (per_step, per_ppo)
