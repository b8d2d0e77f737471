"""Critic-free PPO through the pipeline (`ppo.estimator` other than "gae", `ppo.samples_per_prompt` > 1).

An RTO run on the synthetic task, on TL;DR's :tiny and with adapters on a shared base trains no
critic, exports none, checkpoints none and resumes bit-identically; bad estimator settings are one
line naming the key; the memory planner drops exactly the critic; configs/rto_rloo_tldr.py and
configs/rto_grpo_tldr.py are rto_tldr.py's presets with only the estimator changed."""

import json
import math
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from rto_jax.models import ModelConfig, ScalarHeadModel, load_pretrained
from rto_jax.objectives.advantages import ESTIMATORS, GROUP_ESTIMATORS
from rto_jax.pipeline import checkpoint, run, set_recipe
from rto_jax.pipeline.config import ConfigError, validate
from rto_jax.pipeline.logging import read_metrics
from rto_jax.tools import plan
from rto_jax.train import OptimizerConfig, make_optimizer
from tests.conftest import shared_data_skip_reason
from tests.faults import SimulatedFailure, _wrap_steps, count_steps, kill_after_checkpoint
from tests.test_lora_stages import adapter_run, fixture_data, ppo_adapter_config  # noqa: F401  (fixtures)
from tests.test_pipeline import ROOT, load_config, same_numbers, strip_time

ESTIMATOR, GROUP = "rloo", 4  # a leave-one-out baseline over 4 responses per prompt
CRITIC_KEYS = ("value_loss", "value_clipfrac", "critic_grad_norm", "value_mean")  # what only a critic logs

# RTO's stages on the synthetic task: experiments/rto.py needs preference data, which the synthetic task
# makes in its `preferences` stage (experiments/synthetic_compare.shared_models); then RTO's PPO and
# evaluation as experiments/rto.py composes them (evaluating sft and rto only: one policy fewer to sample).
SYNTHETIC_RTO = '''
from experiments import rto, synthetic_compare
from rto_jax.pipeline import model_path, stages

TOKEN_REWARD = rto.TOKEN_REWARD


def run(pipeline):
    sft, _, reward_model, dpo = synthetic_compare.shared_models(pipeline)
    models = {"ref": model_path(sft), "dpo": model_path(dpo)}
    policy = pipeline.stage("ppo", stages.run_ppo, token_reward=TOKEN_REWARD, models=models, reward=reward_model)
    evaluation = pipeline.stage(
        "evaluate", stages.run_evaluate, policies={"sft": model_path(sft), "rto": model_path(policy)},
        reward_path=model_path(reward_model), ref_path=model_path(sft), token_reward=TOKEN_REWARD, models=models,
        reward=reward_model,
    )
    return pipeline.results(evaluation)
'''


def synthetic_config(recipe):
    """configs/rto_synthetic.py:smoke (seconds per stage) with RLOO over groups of 4 and 4 PPO iterations."""
    config = load_config("rto_synthetic", "smoke")
    set_recipe(config, str(recipe))
    config.stages = "sft,preferences,reward_model,dpo,ppo,evaluate"
    config.ppo.estimator, config.ppo.samples_per_prompt = ESTIMATOR, GROUP
    config.ppo.total_episodes = 4 * config.ppo.rollout_batch_size  # 4 iterations of 16 responses (4 prompts)
    return config


def ppo_records(workdir, split="train"):
    return [r for r in read_metrics(workdir / "metrics.jsonl") if r["stage"] == "ppo" and r["split"] == split]


def params_of(folder):
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(load_pretrained(folder)))]


def assert_critic_free_ppo(workdir, steps, sft=None):
    """PPO trained `steps` iterations without a critic: the policy is exported and moved off pi_sft
    (`sft`, default the run's own), no critic folder, no critic metric, and every iteration logs its
    groups' reward spread."""
    done = json.loads((workdir / "ppo" / "done.json").read_text())
    assert done["steps"] == steps and done["source"] == "trained"
    assert (workdir / "ppo" / "model" / "model.safetensors").exists()
    assert not [p.name for p in (workdir / "ppo").iterdir() if p.name.startswith("critic")]  # critic, critic_adapter
    policy, sft = params_of(workdir / "ppo" / "model"), params_of(sft or workdir / "sft" / "model")
    assert any(not np.array_equal(a, b) for a, b in zip(policy, sft))  # it trained
    records = ppo_records(workdir)
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    for r in records:
        assert not set(CRITIC_KEYS) & r.keys(), r
        assert {"policy_loss", "policy_grad_norm", "advantage_abs"} <= r.keys()
        # Sampled at T > 0, the 4 answers to a prompt differ: a zero spread means they were not 4 samples.
        assert math.isfinite(r["group_reward_std"]) and r["group_reward_std"] > 0, r


@pytest.fixture(scope="module")
def synthetic_runs(tmp_path_factory):
    """One uninterrupted critic-free run (a), and one killed right after PPO's checkpoint 2, then run
    again (b); the prompts each PPO iteration was given, and b's checkpoint as the kill left it."""
    folder = tmp_path_factory.mktemp("critic_free")
    recipe = folder / "synthetic_rto.py"
    recipe.write_text(SYNTHETIC_RTO)
    prompts_per_step = []

    def record_prompts(stage, step_fn):
        if stage != "ppo":
            return step_fn

        def recorded(state, batch, rng):
            prompts_per_step.append(batch["prompt_ids"].shape[0])
            return step_fn(state, batch, rng)

        return recorded

    with _wrap_steps(record_prompts):
        run(synthetic_config(recipe), folder / "a")
    with kill_after_checkpoint("ppo", 2), pytest.raises(SimulatedFailure):
        run(synthetic_config(recipe), folder / "b")
    killed = folder / "b" / "ppo" / "checkpoints" / "2"
    stored = sorted(checkpoint._stored_shapes(killed))  # noqa: SLF001  (the key paths the checkpoint holds)
    with count_steps() as resumed:
        run(synthetic_config(recipe), folder / "b")
    return {"a": folder / "a", "b": folder / "b", "prompts": prompts_per_step, "stored": stored, "resumed": resumed}


def test_a_critic_free_rto_run_on_the_synthetic_task_trains_no_critic(synthetic_runs):
    a = synthetic_runs["a"]
    assert_critic_free_ppo(a, steps=4)
    # rollout_batch_size (16) counts responses: each iteration draws 16 / 4 prompts, each answered 4 times.
    assert synthetic_runs["prompts"] == [4] * 4
    assert len(ppo_records(a, "eval")) == 4  # the gold reward along training (eval_every 1)
    results = json.loads((a / "results.json").read_text())
    assert set(results["policies"]) >= {"sft", "rto"} and math.isfinite(results["policies"]["rto"]["gold_reward"])


def test_its_checkpoint_holds_the_policy_and_no_critic(synthetic_runs):
    state_paths = [p for p in synthetic_runs["stored"] if p[0] == "0"]  # (state tree, rng key)
    assert {p[1] for p in state_paths} == {"policy"}, sorted({p[1] for p in state_paths})
    assert any("opt_state" in p for p in state_paths)  # the policy's optimizer resumes too


def test_an_interrupted_critic_free_run_resumes_bit_identically(synthetic_runs):
    """Killed after PPO's checkpoint 2 of 4 and run again: it restored iteration 2 (ran only 3 and 4, then
    the evaluation) and logged the same numbers and exported the same policy as the uninterrupted run."""
    a, b = synthetic_runs["a"], synthetic_runs["b"]
    assert synthetic_runs["resumed"] == {"ppo": 2}
    assert json.loads((b / "ppo" / "done.json").read_text())["resumed_from"] == 2
    assert_critic_free_ppo(b, steps=4)
    same_numbers(strip_time(read_metrics(a / "metrics.jsonl")), strip_time(read_metrics(b / "metrics.jsonl")))
    for x, y in zip(params_of(a / "ppo" / "model"), params_of(b / "ppo" / "model"), strict=True):
        np.testing.assert_array_equal(x, y)  # bit-identical on CPU


@pytest.mark.needs_shared_data
def test_rto_rloo_tldr_tiny_runs_end_to_end_without_a_critic(tmp_path):
    """configs/rto_rloo_tldr.py:tiny on the offline TL;DR samples, budgets cut to a few steps per stage."""
    config = load_config("rto_rloo_tldr", "tiny")
    assert config.name == "rto_rloo_tldr_tiny" and config.ppo.estimator == "rloo"
    config.data.sft.max_rows, config.data.preference.max_rows, config.data.eval_size = 96, 96, 16
    config.tokenizer.bpe_vocab_size, config.tokenizer.bpe_max_texts = 300, 200  # the smallest BPE
    config.data.max_prompt_len, config.data.max_response_len = 64, 8
    config.model.hidden_size, config.model.intermediate_size, config.model.num_heads = 32, 64, 2
    config.model.num_kv_heads = 2
    for stage in ("sft", "reward_model", "dpo"):
        config[stage].batch_size, config[stage].max_steps, config[stage].eval_every = 8, 2, 0
        config[stage].eval_batch_size = 16
    config.reward_model.normalize_rows = 16
    config.ppo.total_episodes = 2 * config.ppo.rollout_batch_size  # 2 iterations of 16 responses
    config.evaluate.num_prompts, config.evaluate.batch_size = 8, 8
    results = run(config, tmp_path)
    assert_critic_free_ppo(tmp_path, steps=2)
    assert set(results["policies"]) >= {"sft", "dpo", "rto"}


def test_a_critic_free_run_on_a_shared_base_exports_the_policy_adapter_only(ppo_adapter_config, tmp_path):
    """PPO with adapters on one shared base (stages._shared_base_state): no critic adapter is made,
    trained or exported; the policy's adapter is."""
    config = ppo_adapter_config.copy_and_resolve_references()
    config.ppo.estimator, config.ppo.samples_per_prompt = ESTIMATOR, GROUP
    run(config, tmp_path)
    assert_critic_free_ppo(tmp_path, steps=4, sft=config.sft.init_from)
    assert (tmp_path / "ppo" / "adapter" / "adapter_model.safetensors").is_file()


# ----------------------------------------------------------------------------------------------
# Bad settings: one line naming the key, before any work.


def _one_reward():
    """rto_tldr.py:1b: a recipe of one token reward (experiments/rto.py), rollout_batch_size 512; reads no files."""
    return load_config("rto_tldr", "1b")


@pytest.mark.parametrize(
    "estimator,samples,message",
    [
        ("ppo2", 1, "config.ppo.estimator: must be one of gae, grpo, dr_grpo, rloo, reinforce_pp, "),
        ("GAE", 1, "config.ppo.estimator: must be one of "),
        ("rloo", 3, "config.ppo.samples_per_prompt: 3 does not divide rollout_batch_size 512"),
        ("gae", 1024, "config.ppo.samples_per_prompt: 1024 does not divide rollout_batch_size 512"),
        *((name, 1, f"config.ppo.samples_per_prompt: estimator '{name}' compares") for name in GROUP_ESTIMATORS),
        ("gae", 0, "config.ppo.samples_per_prompt: must be an integer >= 1, got 0"),
        ("gae", None, "config.ppo.samples_per_prompt: must be an integer >= 1, got None"),
    ],
)
def test_bad_estimator_settings_name_their_key(estimator, samples, message):
    config = _one_reward()
    config.ppo.estimator, config.ppo.samples_per_prompt = estimator, samples
    with pytest.raises(ConfigError) as error:
        validate(config)
    assert str(error.value).startswith(message), str(error.value)


@pytest.mark.parametrize("estimator", list(ESTIMATORS))
def test_every_estimator_validates_with_groups_and_the_ungrouped_ones_without(estimator):
    config = _one_reward()
    config.ppo.estimator, config.ppo.samples_per_prompt = estimator, 4
    validate(config)
    config.ppo.samples_per_prompt = 1
    if estimator in GROUP_ESTIMATORS:
        with pytest.raises(ConfigError, match="config.ppo.samples_per_prompt: "):
            validate(config)
    else:  # GAE and REINFORCE++ have a baseline without groups
        assert estimator in ("gae", "reinforce_pp")
        validate(config)


@pytest.mark.parametrize(
    "override,needle",
    [
        ("--config.ppo.estimator=ppo2", "config.ppo.estimator: must be one of"),
        ("--config.ppo.samples_per_prompt=3", "config.ppo.samples_per_prompt: 3 does not divide"),
        ("--config.ppo.samples_per_prompt=1", "config.ppo.samples_per_prompt: estimator 'rloo' compares"),
        ("--config.ppo.samples_per_prompt=2.5", "--config.ppo.samples_per_prompt=2.5"),
    ],
)
def test_the_command_line_says_it_in_one_line_and_writes_nothing(tmp_path, override, needle):
    cmd = [sys.executable, str(ROOT / "experiments" / "run.py"), "--config=configs/rto_rloo_tldr.py:1b"]
    done = subprocess.run(
        [*cmd, f"--workdir={tmp_path / 'run'}", override], capture_output=True, text=True, cwd=ROOT, timeout=300
    )
    assert done.returncode == 2, (done.returncode, done.stderr[-3000:])
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], done.stderr[-3000:]
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------------------------
# The memory planner.

MODEL = ModelConfig(
    vocab_size=96, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8
)


def _bytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def _reference_activation_bytes(config: ModelConfig, rows: int, length: int, response: int, vocab: int) -> int:
    """activation_bytes_per_device's documented estimate on one device, float32, no remat, written out."""
    h, k, c, d, f = config.num_heads, config.num_kv_heads, config.head_dim, config.hidden_size, config.intermediate_size
    per_layer = 4 * (6 * d + 3 * (h + 2 * k) * c + 3 * f) + 8 * h * length
    return int(rows * length * config.num_layers * per_layer + 3 * 4 * vocab * rows * response)


def test_a_critic_free_ppo_plans_exactly_the_critic_less():
    """The ppo row without a critic is smaller by the scalar-head model's float32 params, its AdamW state
    and its activations (counted here from a real model); the frozen models (the reward model included),
    the KV cache and the other stages are unchanged."""
    workload = plan.Workload(prompt_len=12, response_len=4, rollout_batch=16, ppo_minibatches=2)
    with_critic = plan.plan_memory(MODEL, (1, 1, 1), workload)
    critic_free = plan.plan_memory(MODEL, (1, 1, 1), plan.Workload(**{**workload.__dict__, "critic": False}))
    head = nnx.state(ScalarHeadModel(MODEL, nnx.Rngs(0)), nnx.Param)
    head_params, head_opt = _bytes(head), _bytes(make_optimizer(OptimizerConfig()).init(head))
    head_act = _reference_activation_bytes(MODEL, 8, 16, 4, vocab=1)  # minibatches of 16 / 2 rollouts
    ppo, free = with_critic["ppo"], critic_free["ppo"]
    assert ppo["params"] - free["params"] == head_params
    assert ppo["optimizer"] - free["optimizer"] == head_opt
    assert ppo["activations"] - free["activations"] == head_act
    assert (free["frozen"], free["kv_cache"]) == (ppo["frozen"], ppo["kv_cache"])
    assert ppo["total"] - free["total"] == head_params + head_opt + head_act
    assert {k: v for k, v in critic_free.items() if k != "ppo"} == {k: v for k, v in with_critic.items() if k != "ppo"}


@pytest.mark.parametrize("estimator", list(ESTIMATORS))
def test_the_planner_reads_the_estimator_from_the_config(estimator):
    config = load_config("rto_tldr", "1b")
    config.ppo.estimator = estimator
    assert plan.workload_from_config(config).critic == (estimator == "gae")


def test_the_planner_plans_the_rloo_and_grpo_configs_without_a_critic():
    for name in ("rto_rloo_tldr", "rto_grpo_tldr"):
        assert plan.workload_from_config(load_config(name, "1b")).critic is False, name
    assert plan.workload_from_config(load_config("rto_tldr", "1b")).critic is True


# ----------------------------------------------------------------------------------------------
# configs/rto_rloo_tldr.py and configs/rto_grpo_tldr.py.

DERIVED = {"rto_rloo_tldr": "rloo", "rto_grpo_tldr": "grpo"}
TLDR_PRESETS = ("1b", "2.8b", "6.9b", "tiny")  # smollm2 needs the GGUF `make smollm2` caches


@pytest.mark.parametrize("name,preset", [(n, p) for n in DERIVED for p in TLDR_PRESETS])
def test_the_rloo_and_grpo_configs_are_rto_tldr_with_only_the_estimator_changed(name, preset):
    if preset == "tiny" and (reason := shared_data_skip_reason()):
        pytest.skip(reason)  # the tiny presets read the offline samples
    config = load_config(name, preset)
    validate(config)
    assert config.name == f"{name}_{preset}" and config.recipe == "experiments/rto.py"
    assert (config.ppo.estimator, config.ppo.samples_per_prompt) == (DERIVED[name], 4)
    base, derived = load_config("rto_tldr", preset).to_dict(), config.to_dict()
    for tree in (base, derived):
        del tree["name"], tree["ppo"]["estimator"], tree["ppo"]["samples_per_prompt"]
    assert derived == base  # rollout_batch_size (responses), budgets and reward unchanged
