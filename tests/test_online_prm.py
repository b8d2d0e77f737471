"""The online implicit PRM (PRIME): its loss against a numpy rebuild, what `online_prm_experience`
trains and which PRM scores the rollout ("before" / "after"), that it learns the outcome labels, a run
of experiments/rto_online_prm.py's method end to end on the synthetic task that resumes bit-identically,
and bad `ppo.online_prm` / `ppo.prm_*` values as one line naming the key."""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rto_jax.objectives.implicit_prm import implicit_prm_loss, outcome_labels
from rto_jax.pipeline import checkpoint, run, set_recipe
from rto_jax.pipeline.config import ConfigError, validate
from rto_jax.pipeline.logging import read_metrics
from rto_jax.train import OptimizerConfig, create_ppo_state, make_optimizer
from rto_jax.train.ppo import online_prm_experience, prm_update, rollout
from tests.faults import SimulatedFailure, kill_after_checkpoint
from tests.test_critic_free_pipeline import params_of
from tests.test_pipeline import ROOT, load_config
from tests.test_ppo_wiring import (
    B,
    BETA_DPO,
    DPO_CLIP,
    EOS,
    P,
    POLICY_TX,
    REWARD_MEAN,
    REWARD_STD,
    SCORE_CLIP,
    _config,
    _copy,
    _forward,
    _params,
    _prompts,
    _token_logps,
    models,  # noqa: F401  (fixture)
)

PRM_BETA = 0.5
PRM_TX = make_optimizer(OptimizerConfig(learning_rate=1e-2, schedule="constant", eps=1e-4, max_grad_norm=1.0))


# ----------------------------------------------------------------------------------------------
# The loss.


def np_bce(logp, logp_ref, mask, labels, beta):
    r = beta * np.sum(np.where(mask > 0, logp - logp_ref, 0.0), axis=1)
    p = 1.0 / (1.0 + np.exp(-r))
    return float(np.mean(-(labels * np.log(p) + (1 - labels) * np.log(1 - p)))), r


def test_the_loss_is_the_cross_entropy_of_the_implicit_sequence_reward():
    rng = np.random.default_rng(0)
    logp, logp_ref = rng.normal(-2, 1, (6, 5)), rng.normal(-2, 1, (6, 5))
    mask = (np.arange(5)[None] < np.array([5, 3, 1, 4, 2, 5])[:, None]).astype(np.float32)
    logp_garbage = np.where(mask > 0, logp, 1e6)  # what masked columns hold must not matter
    labels = np.array([1.0, 0.0, 0.3, 0.9, 0.5, 0.0])
    loss, metrics = implicit_prm_loss(logp_garbage, logp_ref, mask, labels, beta=0.7)
    expected, r = np_bce(logp, logp_ref, mask, labels, 0.7)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["prm/reward"]), r.mean(), rtol=1e-5)
    assert float(metrics["prm/accuracy"]) == pytest.approx(np.mean((r > 0) == (labels > 0.5)))
    # d loss / d logp_t = beta (sigmoid(r) - label) / B on valid tokens: descending it raises the implicit
    # reward of responses labelled above sigmoid(r) and lowers the others'.
    grad = jax.grad(lambda x: implicit_prm_loss(x, logp_ref, mask, labels, beta=0.7)[0])(jnp.asarray(logp))
    sigmoid = 1.0 / (1.0 + np.exp(-r))
    np.testing.assert_allclose(np.asarray(grad), 0.7 * (sigmoid - labels)[:, None] * mask / 6, rtol=1e-4, atol=1e-7)


def test_outcome_labels_from_the_normalized_score():
    score = jnp.array([-2.0, 0.0, 0.5, 3.0])
    np.testing.assert_allclose(np.asarray(outcome_labels(score, "soft")), 1 / (1 + np.exp(-np.asarray(score))), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(outcome_labels(score, "binary")), [0.0, 0.0, 1.0, 1.0])
    # "group": against the mean score of the rows answering the same prompt (groups {0, 1}, {2, 3}; a
    # group of one keeps its absolute score).
    groups = jnp.array([0, 0, 1, 1])
    centered = np.array([-1.0, 1.0, -1.25, 1.25])
    np.testing.assert_allclose(np.asarray(outcome_labels(score, "group", groups)), 1 / (1 + np.exp(-centered)), rtol=1e-6)
    alone = outcome_labels(score, "group", jnp.array([0, 1, 2, 2]))
    np.testing.assert_allclose(np.asarray(alone)[:2], 1 / (1 + np.exp(-np.asarray(score)[:2])), rtol=1e-6)
    with pytest.raises(ValueError, match="soft, binary, group"):
        outcome_labels(score, "hard")


# ----------------------------------------------------------------------------------------------
# The PPO functions.


def _prm_config(update, **kw):
    return _config("rto", estimator="rloo", samples_per_prompt=2, online_prm="dpo", prm_beta=PRM_BETA, prm_update=update, **kw)


def _prm_state(models):
    return create_ppo_state(
        _copy(models["policy"]), None, POLICY_TX, None,
        frozen={"ref": _params(models["ref"]), "dpo": _params(models["dpo"])},
        reward_model=_copy(models["reward"]), reward_mean=REWARD_MEAN, reward_std=REWARD_STD,
        online_prm=("dpo", PRM_TX),
    )  # fmt: skip


def _score(models, batch):
    """The normalized, clipped score of the rollout's responses, rebuilt from the reward model's forward."""
    mask, tokens = np.asarray(batch.response_mask), np.asarray(batch.input_ids)[:, P:]
    last = mask.sum(1).astype(int) - 1
    rm = _forward(models["reward"], batch)
    raw = np.array([rm[b, P + last[b]] for b in range(B)])
    has_eos = np.array([tokens[b, last[b]] == EOS for b in range(B)])
    return np.clip((raw - REWARD_MEAN) / REWARD_STD, -SCORE_CLIP, SCORE_CLIP) - 1.0 * (~has_eos)


def _dpo_part(prm_model, ref_model, batch):
    own = {k: _token_logps(m, batch, temperature=1.0) for k, m in (("prm", prm_model), ("ref", ref_model))}
    part = np.clip(BETA_DPO * (own["prm"] - own["ref"]), -DPO_CLIP, DPO_CLIP) * np.asarray(batch.response_mask)
    return float(np.mean(part.sum(1)))


@pytest.fixture(scope="module")
def iterations(models):
    """{update: (config, the rollout, the state before, after, metrics)}: one online-PRM experience each."""
    prompts, key = _prompts(0, B // 2), jax.random.key(3)
    out = {}
    for update in ("before", "after"):
        config = _prm_config(update, num_minibatches=1)
        batch = jax.jit(rollout, static_argnums=3)(_prm_state(models), prompts, key, config)
        state, _, metrics = jax.jit(online_prm_experience, static_argnums=3)(_prm_state(models), prompts, key, config)
        out[update] = (config, jax.tree.map(np.asarray, batch), state, {k: float(v) for k, v in metrics.items()})
    return out


@pytest.mark.parametrize("update", ["before", "after"])
def test_the_prm_trains_on_the_rollout_and_nothing_else_does(models, iterations, update):
    config, batch, state, metrics = iterations[update]
    dpo = jax.tree.leaves(_params(models["dpo"]))
    prm = jax.tree.leaves(state.prm.params)
    assert int(state.prm.step) == 1  # one minibatch, one pass
    assert any(not np.array_equal(a, b) for a, b in zip(dpo, prm))
    for name in ("policy", "ref"):  # the experience step updates neither the policy nor pi_ref
        held = state.policy.params if name == "policy" else state.frozen["models"]["ref"]
        for a, b in zip(jax.tree.leaves(_params(models[name])), jax.tree.leaves(held)):
            np.testing.assert_array_equal(a, b)
    assert set(state.frozen["models"]) == {"ref"} and set(state.reward_lms()) == {"ref", "dpo"}
    # Its loss is the cross-entropy of the DPO model's implicit reward against the default "group"
    # labels: sigmoid(normalized score - the mean score of the prompt's 2 responses).
    score = _score(models, batch)
    centered = score - np.repeat(score.reshape(-1, 2).mean(1), 2)
    labels = 1.0 / (1.0 + np.exp(-centered))
    own = {k: _token_logps(models[k], batch, temperature=1.0) for k in ("dpo", "ref")}
    expected, _ = np_bce(own["dpo"], own["ref"], batch.response_mask, labels, PRM_BETA)
    assert metrics["prm/loss"] == pytest.approx(expected, rel=1e-4)
    trained = nnx.merge(nnx.split(models["dpo"])[0], state.prm.params)
    after, _ = np_bce(_token_logps(trained, batch, temperature=1.0), own["ref"], batch.response_mask, labels, PRM_BETA)
    assert after < expected  # the step descended it


def test_before_scores_the_rollout_with_the_trained_prm_and_after_with_the_old_one(models, iterations):
    trained = {u: nnx.merge(nnx.split(models["dpo"])[0], iterations[u][2].prm.params) for u in iterations}
    scorer = {"before": trained["before"], "after": models["dpo"]}  # "after" trains it once the rollout is scored
    for update, (_, batch, _, metrics) in iterations.items():
        assert metrics["reward/dpo"] == pytest.approx(_dpo_part(scorer[update], models["ref"], batch), rel=1e-4, abs=1e-6)
        # The trained and the old PRM give the rollout different DPO terms, so the check tells them apart.
        assert abs(_dpo_part(trained[update], models["ref"], batch) - _dpo_part(models["dpo"], models["ref"], batch)) > 1e-3


def test_the_prm_learns_the_outcome_labels(models):
    """Trained on one rollout with binary labels, its implicit reward comes to rank the responses as they do."""
    config = _prm_config("before", num_minibatches=2, prm_labels="binary")
    state = _prm_state(models)
    batch = jax.jit(rollout, static_argnums=3)(state, _prompts(1, B // 2), jax.random.key(5), config)
    update = jax.jit(prm_update, static_argnums=3)
    history = []
    for i in range(40):
        state, metrics = update(state, batch, jax.random.key(i), config)
        history.append({k: float(v) for k, v in metrics.items()})
    assert 0 < history[0]["prm/label"] < 1  # both labels occur
    assert history[-1]["prm/loss"] < 0.5 * history[0]["prm/loss"]
    assert history[-1]["prm/accuracy"] == 1.0 and history[0]["prm/accuracy"] < 1.0


def test_a_state_without_the_prm_the_config_names_is_refused(models):
    config = _prm_config("before")
    plain = create_ppo_state(
        _copy(models["policy"]), None, POLICY_TX, None,
        frozen={"ref": _params(models["ref"]), "dpo": _params(models["dpo"])},
        reward_model=_copy(models["reward"]), reward_mean=REWARD_MEAN, reward_std=REWARD_STD,
    )  # fmt: skip
    with pytest.raises(ValueError, match="online_prm='dpo' but the PPOState trains 'no PRM'"):
        rollout(plain, _prompts(0, B // 2), jax.random.key(0), config)
    with pytest.raises(ValueError, match="not among the frozen models"):
        create_ppo_state(_copy(models["policy"]), None, POLICY_TX, None, frozen={"ref": _params(models["ref"])}, online_prm=("dpo", PRM_TX))


# ----------------------------------------------------------------------------------------------
# The recipe end to end.

# experiments/rto_online_prm.py's method on the synthetic task, whose DPO needs the pairs of its
# `preferences` stage (experiments/synthetic_compare.shared_models).
SYNTHETIC_ONLINE_PRM = '''
from experiments import rto_online_prm, synthetic_compare
from rto_jax.pipeline import model_path

TOKEN_REWARD = rto_online_prm.TOKEN_REWARD


def run(pipeline):
    sft, _, reward_model, dpo = synthetic_compare.shared_models(pipeline)
    models = {"ref": model_path(sft), "dpo": model_path(dpo)}
    policy, _ = pipeline.ppo("ppo", TOKEN_REWARD, models=models, reward=reward_model)
    return pipeline.results(policy)
'''


def synthetic_config(recipe):
    """configs/rto_synthetic.py:smoke with 4 PPO iterations of the online-PRM method (RLOO over 4 responses)."""
    config = load_config("rto_synthetic", "smoke")
    set_recipe(config, str(recipe))
    config.stages = "sft,preferences,reward_model,dpo,ppo"
    config.ppo.total_episodes = 4 * config.ppo.rollout_batch_size
    config.ppo.prm_lr = 1e-3
    return config


@pytest.fixture(scope="module")
def synthetic_runs(tmp_path_factory):
    """An uninterrupted run (a) and one killed right after PPO's checkpoint 2, then run again (b)."""
    folder = tmp_path_factory.mktemp("online_prm")
    recipe = folder / "synthetic_online_prm.py"
    recipe.write_text(SYNTHETIC_ONLINE_PRM)
    run(synthetic_config(recipe), folder / "a")
    with kill_after_checkpoint("ppo", 2), pytest.raises(SimulatedFailure):
        run(synthetic_config(recipe), folder / "b")
    stored = sorted(checkpoint._stored_shapes(folder / "b" / "ppo" / "checkpoints" / "2"))  # noqa: SLF001
    run(synthetic_config(recipe), folder / "b")
    return {"a": folder / "a", "b": folder / "b", "stored": stored}


def test_the_recipe_trains_the_dpo_policy_online_and_exports_it(synthetic_runs):
    workdir = synthetic_runs["a"]
    done = json.loads((workdir / "ppo" / "done.json").read_text())
    assert done["token_reward"] == "rto_online_prm" and done["steps"] == 4
    assert (workdir / "ppo" / "prm" / "model.safetensors").exists()
    assert not (workdir / "ppo" / "critic").exists()  # PRIME's RLOO: no critic
    prm, dpo = params_of(workdir / "ppo" / "prm"), params_of(workdir / "dpo" / "model")
    assert any(not np.array_equal(a, b) for a, b in zip(prm, dpo))  # the DPO policy moved during PPO
    records = [r for r in read_metrics(workdir / "metrics.jsonl") if r["stage"] == "ppo" and r["split"] == "train"]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for r in records:
        assert {"prm/loss", "prm/accuracy", "prm/grad_norm", "reward/dpo"} <= r.keys(), r
        assert r["prm/grad_norm"] > 0 and 0 < r["prm/label"] < 1
    assert any("prm" in key for key in synthetic_runs["stored"])  # the checkpoint holds the PRM and its optimizer


def test_a_killed_run_resumes_the_prm_bit_identically(synthetic_runs):
    for folder in ("model", "prm"):
        a, b = (params_of(synthetic_runs[k] / "ppo" / folder) for k in ("a", "b"))
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y)


# ----------------------------------------------------------------------------------------------
# Config errors.


def online_config(**ppo):
    """RTO's recipe with `ppo.online_prm = "dpo"` and `ppo` set in the config (the online PRM as a config
    choice; experiments/rto_online_prm.py fixes online_prm in its method, whose settings win)."""
    config = load_config("rto_synthetic", "smoke")
    set_recipe(config, "experiments/rto.py")
    config.stages = "sft,preferences,reward_model,dpo,ppo"
    config.ppo.online_prm = "dpo"
    for key, value in ppo.items():
        section, _, name = key.rpartition(".")
        (config.ppo[section] if section else config.ppo)[name] = value
    return config


def test_the_recipe_and_the_config_choice_validate():
    validate(online_config())
    config = load_config("rto_synthetic", "smoke")
    set_recipe(config, "experiments/rto_online_prm.py")
    config.ppo.prm_update = "during"  # the recipe's method sets online_prm; the other keys stay the config's
    with pytest.raises(ConfigError, match="ppo.prm_update"):
        validate(config)


@pytest.mark.parametrize(
    "values, key, message",
    [
        ({"online_prm": "ref"}, "ppo.online_prm", "the online PRM must be one of them, got 'ref'"),
        ({"online_prm": "critic"}, "ppo.online_prm", "reads ['dpo']"),
        ({"prm_labels": "hard"}, "ppo.prm_labels", "soft, binary, group"),
        ({"prm_update": "during"}, "ppo.prm_update", "'before' or 'after'"),
        ({"prm_beta": 0.0}, "ppo.prm_beta", "must be > 0"),
        ({"prm_lr": -1e-3}, "ppo.prm_lr", "must be > 0"),
        ({"lora.rank": 8}, "ppo.online_prm", "ppo.lora.rank=0"),
    ],
)
def test_bad_online_prm_settings_name_the_key(values, key, message):
    with pytest.raises(ConfigError) as error:
        validate(online_config(**values))
    assert error.value.key == key and message in str(error.value)


def test_a_reward_without_a_dpo_model_cannot_train_one_online():
    config = online_config()  # the synthetic task: no data files to find first
    set_recipe(config, "experiments/ppo.py")
    with pytest.raises(ConfigError, match="experiments/ppo.py: token reward 'ppo' reads no model but pi_ref"):
        validate(config)


def test_the_cli_reports_a_bad_value_in_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "experiments/run.py", "--config=configs/rto_synthetic.py:smoke",
         "--config.recipe=experiments/rto_online_prm.py", "--config.ppo.prm_update=during", f"--workdir={tmp_path / 'w'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "ppo.prm_update" in lines[0] and "Traceback" not in result.stderr, result.stderr
    assert not (tmp_path / "w").exists()
