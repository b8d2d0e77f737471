"""The experiment pipeline: checkpoints, logging, end to end on the tiny preset, exact resume, NaN stop."""

import importlib.util
import json
import math
import os
import re
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rto_jax.models import CausalLM, ModelConfig, load_pretrained
from rto_jax.pipeline import checkpoint, run, set_recipe
from rto_jax.pipeline.common import NonFiniteError
from rto_jax.pipeline.logging import RunLog, read_metrics
from rto_jax.pipeline.tasks import train_bpe
from rto_jax.train import OptimizerConfig, TrainState, make_optimizer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from faults import SimulatedFailure, count_steps, kill_after_checkpoint, nan_params_at  # noqa: E402

os.environ.setdefault("RTO_JAX_NO_TQDM", "1")


def load_config(name: str, preset: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(preset)


# ----------------------------------------------------------------------------------------------
# Fixtures: a small prompt/chosen/rejected file (chosen responses use "good" words) and a BPE.

WORDS = [
    "apple",
    "river",
    "stone",
    "cloud",
    "green",
    "quick",
    "slow",
    "paper",
    "light",
    "house",
    "music",
    "field",
    "dream",
    "table",
]
GOOD, BAD = ["good", "great", "clear"], ["bad", "poor", "vague"]


@pytest.fixture(scope="module")
def fixture_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(96):
        post = " ".join(rng.choice(WORDS, rng.integers(6, 20)))
        prompt = f"SUBREDDIT: r/test{i % 5} TITLE: post {i} POST: {post} TL;DR:"
        chosen = " " + " ".join(rng.choice(GOOD, rng.integers(2, 6)))
        rejected = " " + " ".join(rng.choice(BAD, rng.integers(2, 6)))
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    data = folder / "pref.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    texts = [r[k] for r in rows for k in ("prompt", "chosen", "rejected")]
    tokenizer_dir = folder / "tokenizer"
    train_bpe(texts, 320, tokenizer_dir)
    return data, tokenizer_dir


def small_config(data, tokenizer_dir, stages="sft,reward_model,dpo,ppo,evaluate"):
    """The tiny preset shrunk further: a 2-layer d=32 model and a handful of steps per stage."""
    c = load_config("rto_tldr", "tiny")
    c.stages = stages
    c.tokenizer.path, c.tokenizer.bpe_vocab_size = str(tokenizer_dir), 0
    c.data.sft.path = ""
    c.data.preference.path, c.data.preference.format, c.data.preference.max_rows = (
        str(data),
        "prompt_chosen_rejected",
        None,
    )
    c.data.max_prompt_len, c.data.max_response_len, c.data.eval_size = 40, 8, 16
    c.model.hidden_size, c.model.intermediate_size, c.model.num_heads, c.model.num_kv_heads, c.model.head_dim = (
        32,
        64,
        2,
        2,
        16,
    )
    for stage, steps in (("sft", 5), ("reward_model", 4), ("dpo", 3)):
        c[stage].batch_size, c[stage].max_steps, c[stage].eval_every, c[stage].eval_batch_size = 8, steps, 2, 8
    c.reward_model.normalize_rows = 16
    c.ppo.rollout_batch_size, c.ppo.total_episodes, c.ppo.num_minibatches, c.ppo.ppo_epochs = 8, 8 * 4, 2, 1
    c.evaluate.num_prompts, c.evaluate.batch_size = 8, 8
    c.checkpoint.every_steps, c.checkpoint.keep = 2, 2
    return c


@pytest.fixture(scope="module")
def trained_models(fixture_data, tmp_path_factory):
    """SFT, reward model and DPO of `small_config`, trained once for the tests that start at PPO."""
    workdir = tmp_path_factory.mktemp("trained")
    run(small_config(*fixture_data, "sft,reward_model,dpo"), workdir)
    return workdir


def given_models(config, workdir):
    """Points config's sft / reward_model / dpo `init_from` at the models of `trained_models`."""
    for stage in ("sft", "reward_model", "dpo"):
        config[stage].init_from = str(workdir / stage / "model")


FORKED_REWARD = """
from rto_jax.objectives.token_rewards import at_last_token, log_ratio, token_reward


@token_reward("ref", "reward")
def length_bonus(logps, score, mask, *, bonus=0.5, beta_kl=0.01):
    \"\"\"A constant bonus per token, the KL penalty and the score at the last token.\"\"\"
    parts = {
        "bonus": bonus * mask,
        "kl": -beta_kl * log_ratio(logps, "policy", "ref", mask),
        "score": at_last_token(score, mask),
    }
    return parts["bonus"] + parts["kl"] + parts["score"], parts


TOKEN_REWARD = length_bonus
"""


def strip_time(records):
    return [{k: v for k, v in r.items() if k != "time"} for r in records]


def same_numbers(a, b):
    """Record lists equal, NaN == NaN."""
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys(), (x, y)
        for k in x:
            both_nan = isinstance(x[k], float) and math.isnan(x[k]) and math.isnan(y[k])
            assert both_nan or x[k] == y[k], (k, x, y)


# ----------------------------------------------------------------------------------------------
# Units.


def test_checkpoint_restores_any_pytree_onto_an_abstract_sharded_target(tmp_path):
    model = CausalLM(
        ModelConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_heads=2, num_kv_heads=2, head_dim=8),
        nnx.Rngs(0),
    )
    state = TrainState.create(model, make_optimizer(OptimizerConfig()))
    tree = {"policy": state, "rng": jax.random.key_data(jax.random.key(7))}
    manager = checkpoint.manager(tmp_path / "ckpt", keep=2)
    for step in (1, 2, 3):
        checkpoint.save(manager, step, tree, {"step": step, "data": {"epoch": 0, "index": step}})
    assert sorted(int(p.name) for p in (tmp_path / "ckpt").iterdir() if p.name.isdigit()) == [2, 3]  # keep=2
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)
    restored, meta, step = checkpoint.restore(manager, abstract)
    assert step == 3 and meta["data"] == {"epoch": 0, "index": 3}
    assert isinstance(restored["policy"], TrainState) and restored["policy"].graphdef is not None
    for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(restored)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert b.sharding == sharding


def test_run_log_drops_partial_lines_and_truncates_a_stage(tmp_path):
    log = RunLog(tmp_path, tensorboard=False)
    for step in (1, 2, 3):
        log.log("sft", step, {"loss": 1.0 / step})
    log.log("ppo", 1, {"score": jnp.float32(0.5)})
    log.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"stage": "sft", "st')  # a write cut by a kill
    log = RunLog(tmp_path, tensorboard=False)
    assert len(read_metrics(tmp_path / "metrics.jsonl")) == 4
    assert log.truncate("sft", 1) == 2
    log.close()
    assert [(r["stage"], r["step"]) for r in read_metrics(tmp_path / "metrics.jsonl")] == [("sft", 1), ("ppo", 1)]


# ----------------------------------------------------------------------------------------------
# Whole runs.


@pytest.mark.slow
def test_interrupted_run_resumes_to_identical_metrics_and_params(fixture_data, tmp_path):
    data, tokenizer_dir = fixture_data
    stages = "sft,reward_model,dpo,ppo"
    with count_steps() as full:
        run(small_config(data, tokenizer_dir, stages), tmp_path / "a")
    assert full == {"sft": 5, "reward_model": 4, "dpo": 3, "ppo": 4}

    interrupted = tmp_path / "b"
    for stage in ("sft", "ppo"):  # killed right after SFT's checkpoint 2, then after PPO's (every 2 steps)
        with kill_after_checkpoint(stage, 2), pytest.raises(SimulatedFailure):
            run(small_config(data, tokenizer_dir, stages), interrupted)
    assert (interrupted / "sft" / "done.json").exists() and not (interrupted / "ppo" / "done.json").exists()
    with count_steps() as resumed:
        run(small_config(data, tokenizer_dir, stages), interrupted)
    # The resumed PPO restored iteration 2 and ran only the two after it: a silent restart would not.
    assert resumed == {"ppo": 2}
    assert json.loads((interrupted / "ppo" / "done.json").read_text())["resumed_from"] == 2
    assert json.loads((tmp_path / "a" / "ppo" / "done.json").read_text())["resumed_from"] == 0

    same_numbers(
        strip_time(read_metrics(tmp_path / "a" / "metrics.jsonl")),
        strip_time(read_metrics(interrupted / "metrics.jsonl")),
    )
    for stage in ("sft", "ppo"):
        a = jax.tree.leaves(nnx.state(load_pretrained(tmp_path / "a" / stage / "model")))
        b = jax.tree.leaves(nnx.state(load_pretrained(interrupted / stage / "model")))
        for x, y in zip(a, b):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))  # bit-identical on CPU


@pytest.mark.parametrize("stage,step", [("sft", 2), ("ppo", 4)])
def test_nan_parameters_with_a_finite_loss_stop_the_stage_before_its_checkpoint(
    fixture_data, tmp_path, request, stage, step
):
    """NaN parameters at a checkpoint step (2, 4: checkpoints every 2 steps) while the step's loss is
    finite: the stage stops naming the step, and the NaN state is never saved."""
    data, tokenizer_dir = fixture_data
    config = small_config(data, tokenizer_dir, stage)
    if stage == "ppo":
        given_models(config, request.getfixturevalue("trained_models"))
    with nan_params_at(stage, step), pytest.raises(NonFiniteError) as error:
        run(config, tmp_path)
    last_good = step - 2
    where = rf"checkpoints/{last_good} \(step {last_good}\)" if last_good else "none yet"
    assert re.search(rf"{stage}: non-finite parameters .* at step {step}.*{where}", str(error.value)), error.value
    assert checkpoint.manager(tmp_path / stage / "checkpoints").latest_step() == (last_good or None)
    assert not (tmp_path / stage / "done.json").exists()
    metrics = [r for r in read_metrics(tmp_path / "metrics.jsonl") if r["stage"] == stage and r["split"] == "train"]
    assert metrics[-1]["step"] == step and all(math.isfinite(v) for v in metrics[-1].values() if isinstance(v, float))


def test_the_critic_starts_on_the_normalized_reward_scale(fixture_data, trained_models, tmp_path):
    """PPO's critic is the reward model with (r - mean) / std folded into its head: the returns it
    learns are built from normalized scores. With learning rates of 1e-12 the exported critic is
    the critic PPO started from."""
    config = small_config(*fixture_data, "ppo")
    given_models(config, trained_models)
    config.ppo.lr, config.ppo.critic_lr, config.ppo.max_steps = 1e-12, 1e-12, 1
    run(config, tmp_path)
    stats = json.loads((trained_models / "reward_model" / "done.json").read_text())
    mean, std = stats["reward_mean"], stats["reward_std"]
    assert abs(mean) > 0.05 or abs(std - 1.0) > 0.05, (mean, std)  # the fold changes the numbers
    ids = jnp.asarray(np.random.default_rng(0).integers(3, 300, (4, 20)))
    raw = np.asarray(load_pretrained(trained_models / "reward_model" / "model", kind="scalar")(ids))
    critic = np.asarray(load_pretrained(tmp_path / "ppo" / "critic", kind="scalar")(ids))
    np.testing.assert_allclose(critic, (raw - mean) / std, rtol=1e-4, atol=1e-4)


def test_a_forked_recipe_trains_with_its_own_token_reward(fixture_data, trained_models, tmp_path):
    """README's "fork an experiment": copy experiments/rto.py outside the package, change its reward,
    point a config at it. The logged reward parts show the new reward was the one used."""
    recipe = (ROOT / "experiments" / "rto.py").read_text()
    assert "\nTOKEN_REWARD = rto\n" in recipe
    fork = tmp_path / "my_reward.py"
    fork.write_text(recipe.replace("\nTOKEN_REWARD = rto\n", FORKED_REWARD))
    config = small_config(*fixture_data, "ppo,evaluate")
    given_models(config, trained_models)
    config.dpo.init_from = ""  # the new reward reads no DPO policy: none is needed
    set_recipe(config, str(fork))
    assert config.ppo.reward_args.to_dict() == {"bonus": 0.5, "beta_kl": 0.01}
    config.ppo.reward_args.bonus = 0.25
    results = run(config, tmp_path / "run")
    records = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["stage"] == "ppo"]
    assert len(records) == 4
    for r in records:
        assert "reward/dpo" not in r and {"reward/bonus", "reward/kl", "reward/score"} <= r.keys()
        assert r["reward/bonus"] == pytest.approx(0.25 * r["response_length"], rel=1e-5)
        parts = r["reward/bonus"] + r["reward/kl"] + r["reward/score"]
        assert r["reward/total"] == pytest.approx(parts, rel=1e-4, abs=1e-5)
    assert set(results["policies"]) == {"reference", "sft", "length_bonus"}
    assert json.loads((tmp_path / "run" / "ppo" / "done.json").read_text())["token_reward"] == "length_bonus"
