"""The task's gold credit as a token-reward input (token_rewards.GOLD) and the credit measures
(rto_jax.eval.credit): the positive controls of the RTO-vs-PPO study stand on these.

- credit.pearson / credit_correlations against numpy's corrcoef on the kept entries;
- the synthetic task's jitted credit and its quality share against the numpy gold reward;
- PPO's experience maker gives a GOLD-reading reward the credit of the tokens it sampled (checked
  against the task's numpy credit of those tokens) and the same rollout as PPO's reward;
- the gold credit's arrays (a synthetic task's tables) are arguments of the compiled programs: two
  tables or two seeds, one program, each run reading its own;
- a GOLD-reading reward is refused, naming it, on a task without a gold reward.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.synthetic_study import oracle_dense, oracle_rm
from rto_jax.data.synthetic import SyntheticTask, SyntheticTaskConfig
from rto_jax.errors import ConfigError
from rto_jax.eval.credit import credit_correlations, pearson, token_scale
from rto_jax.objectives.token_rewards import GOLD, bind, frozen_models, needs_gold
from rto_jax.pipeline.config import base_config
from rto_jax.pipeline.recipes import set_recipe
from rto_jax.pipeline.runner import with_seed
from rto_jax.pipeline.tasks import build_task
from rto_jax.pipeline.reward_check import check_recipe_rewards, fake_inputs
from tests import test_ppo_wiring as wiring
from tests.test_reward_check import RECIPE_WITH_METHODS


def test_pearson_is_numpys_on_the_kept_entries():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(6, 5)), rng.normal(size=(6, 5))
    b += 0.7 * a  # a clearly non-zero correlation
    mask = rng.random((6, 5)) < 0.6
    want = np.corrcoef(a[mask], b[mask])[0, 1]
    assert pearson(a, b, mask) == pytest.approx(want, rel=1e-12)
    assert pearson(a, b) == pytest.approx(np.corrcoef(a.ravel(), b.ravel())[0, 1], rel=1e-12)
    assert np.isnan(pearson(np.ones(5), b[0]))  # a constant side has no correlation
    assert np.isnan(pearson(a[:1, :1], b[:1, :1]))


def test_credit_correlations_per_token_per_response_and_quality():
    rng = np.random.default_rng(1)
    mask = (np.arange(6)[None] < rng.integers(1, 7, 8)[:, None]).astype(np.float32)
    gold = rng.normal(size=(8, 6)) * mask
    quality = rng.normal(size=(8, 6)) * mask
    noisy = (gold + rng.normal(size=(8, 6))) * mask
    out = credit_correlations({"same": 3.0 * gold, "noisy": noisy}, gold, mask, quality_credit=quality)
    assert out["same_token"] == pytest.approx(1.0) and out["same_response"] == pytest.approx(1.0)
    keep = mask > 0
    assert out["noisy_token"] == pytest.approx(np.corrcoef(noisy[keep], gold[keep])[0, 1])
    assert out["noisy_quality"] == pytest.approx(np.corrcoef(noisy[keep], quality[keep])[0, 1])
    assert out["noisy_response"] == pytest.approx(np.corrcoef(noisy.sum(1), gold.sum(1))[0, 1])
    assert token_scale(2.0 * gold + 5.0, mask) == pytest.approx(2.0 * gold[keep].std())  # offsets do not count


@pytest.fixture(scope="module")
def task():
    return SyntheticTask.create(SyntheticTaskConfig(), seed=3)


def _responses(task, n=64, seed=0):
    rng = np.random.default_rng(seed)
    prompts = task.sample_prompts(rng, n)
    responses = task.sample_reference_responses(rng, prompts)
    return prompts["prompt_ids"], prompts["prompt_mask"], responses["response_ids"], responses["response_mask"]


def test_the_jitted_credit_and_its_quality_share_match_the_numpy_gold_reward(task):
    args = _responses(task)
    credit = np.asarray(jax.jit(task.gold_credit_jax)(*args))
    np.testing.assert_allclose(credit, task.gold_token_credit(*args), atol=1e-6)
    np.testing.assert_allclose(credit.sum(1), task.gold_reward(*args), atol=1e-5)
    quality = task.gold_quality_credit(*args)
    parts = task.gold_components(*args)
    np.testing.assert_allclose(quality.sum(1), task.config.quality_weight * parts["quality"], atol=1e-6)
    eos = np.asarray(args[2]) == 1
    assert np.all(quality[eos] == 0)  # no quality credit on EOS: it is not a content token


def test_the_oracle_rewards_read_gold_and_no_dpo_model():
    assert needs_gold(oracle_dense) and needs_gold(oracle_rm)
    assert frozen_models(oracle_dense) == ("ref",) and frozen_models(oracle_rm) == ("ref",)
    logps, score, mask = fake_inputs(oracle_rm)
    assert GOLD in logps and score is None
    _, parts = bind(oracle_rm, gold_mean=0.1, gold_std=0.5, beta_kl=0.0)(logps, score, mask)
    last = np.asarray(mask).sum(1).astype(int) - 1
    gold = np.asarray(logps[GOLD]).sum(1)
    np.testing.assert_allclose(np.asarray(parts["gold"])[np.arange(3), last], (gold - 0.1) / 0.5, rtol=1e-6)
    assert np.count_nonzero(np.asarray(parts["gold"])) == 3  # sparse: the last token only


# A hashable, jittable gold credit of (prompt, response) tokens for the tiny PPO models of test_ppo_wiring.
def _toy_credit(prompt_ids, prompt_mask, response_ids, response_mask, xp=jnp):
    first = xp.sum(prompt_ids * prompt_mask, axis=1, keepdims=True) % 3
    return ((response_ids % 4 - 1.5 + first) * 0.1 * response_mask).astype(xp.float32)


def _models():
    return {
        "policy": wiring._lm(0),
        "ref": wiring._lm(1),
        "dpo": wiring._lm(2),
        "critic": wiring.ScalarHeadModel.from_causal_lm(wiring._lm(0), wiring.nnx.Rngs(3)),
        "reward": wiring.ScalarHeadModel(wiring.tiny_config(), wiring.nnx.Rngs(4)),
    }


def test_ppo_gives_a_gold_reward_the_credit_of_the_sampled_tokens():
    models = _models()
    prompts = wiring._prompts(0, wiring.B)
    beta_gold = 2.5
    ppo_config = wiring._config("ppo")
    gold_config = wiring.dataclasses.replace(
        ppo_config,
        token_reward=bind(oracle_dense, beta_gold=beta_gold, beta_kl=wiring.BETA_KL, beta_rm=wiring.BETA_RM),
        gold_credit=_toy_credit,
    )
    outs = {}
    for name, config in (("ppo", ppo_config), ("gold", gold_config)):
        experience_fn, _, _ = wiring.make_ppo_fns(config)
        experience, metrics = experience_fn(wiring._state(models), prompts, jax.random.key(0))
        outs[name] = (jax.tree.map(np.asarray, experience), {k: float(v) for k, v in metrics.items()})
    (experience, metrics), (ppo_experience, ppo_metrics) = outs["gold"], outs["ppo"]
    np.testing.assert_array_equal(experience.input_ids, ppo_experience.input_ids)  # the same rollout
    p = wiring.P
    response = experience.input_ids[:, p:]
    credit = _toy_credit(
        np.asarray(prompts["prompt_ids"]), np.asarray(prompts["prompt_mask"]), response, experience.response_mask, np
    )
    assert np.abs(credit).sum() > 0
    assert metrics["reward/gold"] == pytest.approx(beta_gold * credit.sum(1).mean(), rel=1e-5)
    for part in ("kl", "score"):  # PPO's reward, untouched
        assert metrics[f"reward/{part}"] == pytest.approx(ppo_metrics[f"reward/{part}"], rel=1e-5, abs=1e-7)
    with pytest.raises(ValueError, match="gold_credit is None"):
        wiring.make_ppo_fns(wiring.dataclasses.replace(gold_config, gold_credit=None))[0](
            wiring._state(models), prompts, jax.random.key(0)
        )


def _table_credit(table, prompt_ids, prompt_mask, response_ids, response_mask, xp=jnp):
    """A gold credit read from a table [V'] (a task's tables stand for it): table[token % V'] per token."""
    return (xp.asarray(table)[response_ids % table.shape[0]] * response_mask).astype(xp.float32)


def test_tasks_that_differ_only_in_their_tables_share_one_compiled_ppo_program():
    """The gold credit's arrays are arguments of PPO's compiled step (the seeds of a study share its
    programs), and each run still reads its own table."""
    models = _models()
    prompts = wiring._prompts(0, wiring.B)
    beta_gold = 2.5
    token_reward = bind(oracle_dense, beta_gold=beta_gold, beta_kl=wiring.BETA_KL, beta_rm=wiring.BETA_RM)
    cache = functools.lru_cache(wiring.jitted_ppo_fns)
    for seed in (0, 1):
        table = np.random.default_rng(seed).normal(size=7).astype(np.float32)
        gold_credit = jax.tree_util.Partial(_table_credit, table)
        config = wiring.dataclasses.replace(wiring._config("ppo"), token_reward=token_reward, gold_credit=gold_credit)
        experience_fn, _, _ = wiring.make_ppo_fns(config, jitted=cache)
        experience, metrics = experience_fn(wiring._state(models), prompts, jax.random.key(0))
        response, mask = np.asarray(experience.input_ids)[:, wiring.P :], np.asarray(experience.response_mask)
        credit = _table_credit(table, None, None, response, mask, np)
        assert metrics["reward/gold"] == pytest.approx(beta_gold * credit.sum(1).mean(), rel=1e-5)
    assert cache.cache_info().misses == 1 and experience_fn.__wrapped__._cache_size() == 1


def test_the_synthetic_tasks_gold_functions_trace_its_tables(task):
    """Two seeds' gold functions (as build_synthetic_task gives them): one compiled program, each
    seed's own credit (numpy's)."""
    other = SyntheticTask.create(SyntheticTaskConfig(), seed=4)
    config = base_config()
    config.data.source = "synthetic"
    built = build_task(with_seed(config, 0), workdir=None)
    for gold in (built.gold_credit, built.gold_reward):  # PPO's and the evaluation's
        assert isinstance(gold, jax.tree_util.Partial) and jax.tree.leaves(gold)
    credit_fn = jax.jit(lambda gold_credit, *args: gold_credit(*args))
    for source in (task, other):
        args = _responses(source)
        credit = credit_fn(jax.tree_util.Partial(SyntheticTask.gold_credit_jax, source), *args)
        np.testing.assert_allclose(np.asarray(credit), source.gold_token_credit(*args), atol=1e-6)
    assert credit_fn._cache_size() == 1


# test_reward_check's recipe with the study's oracle_dense as its one method.
RECIPE = RECIPE_WITH_METHODS.replace(
    "METHODS = (ppo, rto, relative_kl)", "from experiments.synthetic_study import oracle_dense\n\nMETHODS = (rto, oracle_dense)"
)


def test_a_gold_reward_is_refused_on_a_task_without_gold_and_passes_on_the_synthetic_task(tmp_path):
    path = tmp_path / "oracle.py"
    path.write_text(RECIPE)
    config = base_config()  # a text task: no gold reward
    set_recipe(config, str(path))
    with pytest.raises(ConfigError, match=r"token reward 'oracle_dense' .*uses 'gold', which .*oracle\.py does not offer"):
        check_recipe_rewards(config)
    config.data.source = "synthetic"
    check_recipe_rewards(config)
