"""The stages' wiring against independent rebuilds (issue 27): what a stage hands its loss, its critic
and its config, checked with numpy recomputations from the exported models, not only "a resumed run
equals an uninterrupted one" (a wiring bug is the same in both).

One small run of SFT -> reward model -> DPO (`small_config` of tests/test_pipeline.py, the reward
model's learning rate raised so that its learned margin is far from its random start) records what
DPO's jitted step was given; the tests below read it, its workdir and its exports.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import signal
import sys
from pathlib import Path
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rto_jax.errors import ConfigError
from rto_jax.models import load_pretrained
from rto_jax.objectives.token_rewards import ppo, reward_args, rto
from rto_jax.pipeline import loop, run, stages
from rto_jax.pipeline.config import parse_per_method
from rto_jax.pipeline.logging import read_metrics
from rto_jax.pipeline.loop import Preempted
from rto_jax.pipeline.runner import open_pipeline, with_seed
from rto_jax.pipeline.tasks import build_task
from rto_jax.pipeline.workdir import LOCK_NAME, WorkdirInUse, WorkdirLock
from tests.test_pipeline import (  # noqa: F401  (fixture_data: a pytest fixture)
    BAD,
    GOOD,
    fixture_data,
    given_models,
    same_numbers,
    small_config,
    strip_time,
)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from faults import _wrap_steps, count_steps  # noqa: E402

DPO_STEPS = 3  # small_config's


def trained_config(data, tokenizer_dir, stages_="sft,reward_model,dpo"):
    config = small_config(data, tokenizer_dir, stages_)
    # A reward model that learns in its 4 steps: its margin moves far from its fresh head's.
    config.reward_model.lr = 1e-2
    return config


def _copy_tree(tree):
    return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)


@contextlib.contextmanager
def steps_given(stage: str):
    """[(graphdef, params of the model before the step, the batch it was given)] of each `stage` step
    (copies: the jitted step donates its state)."""
    seen = []

    def wrap(name, step_fn):
        if name != stage:
            return step_fn

        def recorded(state, batch, rng):
            graphdef, params = nnx.split(state.model())
            seen.append((graphdef, _copy_tree(params), jax.tree.map(np.asarray, batch)))
            return step_fn(state, batch, rng)

        return recorded

    with _wrap_steps(wrap):
        yield seen


@pytest.fixture(scope="module")
def trained(fixture_data, tmp_path_factory):  # noqa: F811
    """(workdir, the DPO steps' inputs) of one SFT -> reward model -> DPO run."""
    workdir = tmp_path_factory.mktemp("wiring")
    with steps_given("dpo") as dpo_steps:
        run(trained_config(*fixture_data), workdir)
    assert len(dpo_steps) == DPO_STEPS
    return workdir, dpo_steps


def _task(config, workdir):
    return build_task(with_seed(config, 0), workdir)


# ----------------------------------------------------------------------------------------------
# Independent numbers: numpy from the models' logits / scores.


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _forward(model, arrays, side):
    keys = ("input_ids", "attention_mask", "positions")
    return np.asarray(model(*(jnp.asarray(arrays[f"{side}_{k}"]) for k in keys)), np.float64)


def sequence_logps(model, arrays, side):
    """Summed log-probs `[B]` of the `side` ("chosen"/"rejected") responses, from full-sequence logits."""
    ids, response_mask = np.asarray(arrays[f"{side}_input_ids"]), np.asarray(arrays[f"{side}_response_mask"])
    prompt_len = ids.shape[1] - response_mask.shape[1]
    logp = _log_softmax(_forward(model, arrays, side)[:, prompt_len - 1 : -1])
    picked = np.take_along_axis(logp, ids[:, prompt_len:, None], axis=-1)[..., 0]
    return (picked * response_mask).sum(1)


def dpo_numbers(policy, reference, arrays, beta):
    """DPO's sigmoid loss and implicit rewards (batch means) of `policy` against `reference`."""
    chosen = beta * (sequence_logps(policy, arrays, "chosen") - sequence_logps(reference, arrays, "chosen"))
    rejected = beta * (sequence_logps(policy, arrays, "rejected") - sequence_logps(reference, arrays, "rejected"))
    return {
        "loss": float(np.mean(np.logaddexp(0.0, -(chosen - rejected)))),  # -log sigmoid(u)
        "rewards/chosen": float(np.mean(chosen)),
        "rewards/rejected": float(np.mean(rejected)),
        "rewards/margin": float(np.mean(chosen - rejected)),
    }


def last_token_scores(model, arrays, side):
    """A scalar-head model's score `[B]` at each row's last response token."""
    scores = _forward(model, arrays, side)
    response_mask = np.asarray(arrays[f"{side}_response_mask"])
    last = arrays[f"{side}_input_ids"].shape[1] - response_mask.shape[1] + response_mask.sum(1).astype(int) - 1
    return scores[np.arange(len(last)), last]


def _records(workdir, stage, split="train"):
    records = read_metrics(workdir / "metrics.jsonl")
    return {r["step"]: r for r in records if r["stage"] == stage and r["split"] == split}


# ----------------------------------------------------------------------------------------------
# DPO: the reference is the SFT model, never the policy being trained.


def test_dpo_steps_use_the_sft_model_as_reference_and_log_the_loss_of_a_numpy_rebuild(fixture_data, trained):
    workdir, dpo_steps = trained
    config = trained_config(*fixture_data)
    sft = load_pretrained(workdir / "sft" / "model")
    records = _records(workdir, "dpo")
    assert sorted(records) == list(range(1, DPO_STEPS + 1))
    for step, (graphdef, params, batch) in enumerate(dpo_steps, start=1):
        # What the step is given as the reference: the SFT model's log-probs of these very rows.
        assert {"ref_chosen_logps", "ref_rejected_logps"} <= batch.keys(), sorted(batch)
        for side in ("chosen", "rejected"):
            expected = sequence_logps(sft, batch, side)
            np.testing.assert_allclose(batch[f"ref_{side}_logps"], expected, rtol=1e-5, atol=1e-4)
        expected = dpo_numbers(nnx.merge(graphdef, params), sft, batch, config.dpo.beta)
        for key, value in expected.items():
            assert records[step][key] == pytest.approx(value, rel=1e-4, abs=1e-5), (step, key)
        if step == 1:  # the policy starts as its reference: every implicit reward is 0, the loss ln 2
            assert records[1]["loss"] == pytest.approx(np.log(2.0), abs=1e-6)
        else:  # the trained policy has moved away from pi_sft (a reference that follows it stays at 0)
            assert abs(records[step]["rewards/chosen"]) > 1e-4 and abs(records[step]["rewards/margin"]) > 1e-4


def test_dpo_held_out_numbers_equal_a_numpy_rebuild_from_the_exported_models(fixture_data, trained):
    """done.json's evaluation: the exported DPO policy against the exported SFT model on the held-out
    pairs (rebuilt here: a reference that is the policy itself gives margin 0 and loss ln 2)."""
    workdir, _ = trained
    config = trained_config(*fixture_data)
    task = _task(config, workdir)
    eval_rows = len(task.preference_eval["chosen_input_ids"])
    assert eval_rows % config.dpo.eval_batch_size == 0  # (a padded last batch is averaged otherwise)
    assert_dpo_done_equals_numpy(workdir, task, config.dpo.beta, rel=1e-4)


def assert_dpo_done_equals_numpy(workdir, task, beta, rel):
    """done.json's held-out DPO numbers equal numpy's DPO of the exported DPO policy against the
    exported SFT model; a reference that is the policy itself gives margin 0 and loss ln 2."""
    policy, sft = (load_pretrained(workdir / stage / "model") for stage in ("dpo", "sft"))
    expected = dpo_numbers(policy, sft, task.preference_eval, beta)
    done = json.loads((workdir / "dpo" / "done.json").read_text())
    for key, value in expected.items():
        assert done[key] == pytest.approx(value, rel=rel, abs=1e-5), key
    assert abs(expected["rewards/margin"]) > 1e-4 and abs(expected["loss"] - np.log(2.0)) > 1e-5


# ----------------------------------------------------------------------------------------------
# Reward model: chosen is chosen.


def _swapped(data: Path, folder: Path) -> Path:
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    path = folder / "swapped.jsonl"
    path.write_text("".join(json.dumps({**r, "chosen": r["rejected"], "rejected": r["chosen"]}) + "\n" for r in rows))
    return path


def test_the_reward_model_learns_chosen_over_rejected_and_swapping_them_flips_its_margin(
    fixture_data, trained, tmp_path
):
    """On the fixture's pairs the chosen responses are made of GOOD words, the rejected ones of BAD
    words. The trained reward model scores GOOD above BAD on the held-out pairs (numpy, from its
    export); trained on the same file with the columns swapped it scores them the other way round.
    The stage's reported held-out numbers are those of its export."""
    workdir, _ = trained
    data, tokenizer_dir = fixture_data
    config = trained_config(data, tokenizer_dir)
    task = _task(config, workdir)
    held_out = task.preference_eval
    p = task.prompt_length
    for side, words in (("chosen", GOOD), ("rejected", BAD)):  # the task's columns are the file's
        for ids, mask in zip(held_out[f"{side}_input_ids"][:4], held_out[f"{side}_response_mask"][:4]):
            text = task.decode(ids[p:][mask > 0]).replace(task.tokenizer.eos_token, " ")
            assert text.split() and set(text.split()) <= set(words), text

    def margin(path):
        model = load_pretrained(path, kind="scalar")
        chosen, rejected = (last_token_scores(model, held_out, side) for side in ("chosen", "rejected"))
        return chosen - rejected

    learned = margin(workdir / "reward_model" / "model")
    done = json.loads((workdir / "reward_model" / "done.json").read_text())
    assert done["margin"] == pytest.approx(float(np.mean(learned)), rel=1e-4, abs=1e-5)
    assert done["accuracy"] == pytest.approx(float(np.mean(learned > 0)))

    swapped = small_config(_swapped(data, tmp_path), tokenizer_dir, "reward_model")
    swapped.reward_model.lr = config.reward_model.lr
    swapped.sft.init_from = str(workdir / "sft" / "model")
    run(swapped, tmp_path / "swapped")
    reversed_ = margin(tmp_path / "swapped" / "reward_model" / "model")
    assert np.mean(learned) > 0.5 and np.mean(learned > 0) > 0.9, learned
    assert np.mean(reversed_) < -0.5 and np.mean(reversed_ < 0) > 0.9, reversed_


# ----------------------------------------------------------------------------------------------
# PPO's start: the critic is the reward model with the normalization folded in; per-method values.


class Captured(Exception):
    """Stops a stage at its first step, carrying what the step was given."""

    def __init__(self, state):
        super().__init__("captured")
        self.state = state


def _capture_first_step(stage):
    def wrap(name, step_fn):
        if name != stage:
            return step_fn

        def capture(state, batch, rng):
            raise Captured(state)

        return capture

    return _wrap_steps(wrap)


def test_ppo_starts_its_critic_as_the_normalized_reward_model(fixture_data, trained, tmp_path):
    """The critic PPO's first step is given scores (r - mean) / std at every position, r the reward
    model's raw score and mean/std the reward-model stage's statistics (no training involved)."""
    workdir, _ = trained
    config = small_config(*fixture_data, "ppo")
    given_models(config, workdir)
    with _capture_first_step("ppo"), pytest.raises(Captured) as captured:
        run(config, tmp_path)
    state = captured.value.state
    stats = json.loads((tmp_path / "reward_model" / "done.json").read_text())
    mean, std = stats["reward_mean"], stats["reward_std"]
    assert abs(mean) > 0.05 and abs(std - 1.0) > 0.05, (mean, std)  # the fold changes the numbers
    ids = np.random.default_rng(1).integers(3, 300, (4, 20))
    critic = np.asarray(state.critic_model(state.critic.params)(jnp.asarray(ids)), np.float64)
    raw = np.asarray(load_pretrained(workdir / "reward_model" / "model", kind="scalar")(jnp.asarray(ids)), np.float64)
    np.testing.assert_allclose(critic, (raw - mean) / std, rtol=1e-4, atol=1e-4)
    # The reward model PPO scores with stays raw (normalized in the reward, not in its head).
    reward_model = nnx.merge(state.reward_graphdef, state.frozen["reward"])
    np.testing.assert_allclose(np.asarray(reward_model(jnp.asarray(ids))), raw, rtol=1e-5, atol=1e-5)


def test_each_method_trains_with_its_own_values_over_the_shared_ones(fixture_data, trained, tmp_path):
    """`config.ppo.per_method` through Pipeline.ppo into the PPO stage: the method's lr replaces the
    shared one in the config the stage trains with, its coefficients replace the shared ones in its
    token reward; another method keeps every shared value; no coefficient a reward lacks is bound."""
    workdir, _ = trained
    config = small_config(*fixture_data, "ppo")
    given_models(config, workdir)
    config.ppo.reward_args.update(beta_dpo=0.05, beta_kl=0.02, beta_rm=1.5)
    config.ppo.per_method = "rto:lr=3e-6,beta_dpo=0.3"
    per_method = parse_per_method(config.ppo.per_method)
    seen = {}
    real = stages.ppo_config

    def recorded(cfg, task, token_reward, args=None):
        seen[token_reward.__name__] = (cfg.ppo.lr, cfg.ppo.critic_lr, real(cfg, task, token_reward, args))
        raise Captured(None)

    models = {"ref": str(workdir / "sft" / "model"), "dpo": str(workdir / "dpo" / "model")}
    reward = json.loads((workdir / "reward_model" / "done.json").read_text())
    reward["model_path"] = str(workdir / "reward_model" / "model")
    with mock.patch.object(stages, "ppo_config", recorded), open_pipeline(with_seed(config, 0), tmp_path) as pipeline:
        for fn in (rto, ppo):
            with pytest.raises(Captured):
                pipeline.ppo(fn.__name__, fn, models=models, reward=reward, values=per_method.get(fn.__name__, {}))
    shared = config.ppo.reward_args.to_dict()
    lr, critic_lr, rto_config = seen["rto"]
    assert (lr, critic_lr) == (3e-6, config.ppo.critic_lr) and config.ppo.lr != 3e-6
    expected = {k: v for k, v in shared.items() if k in reward_args(rto)} | {"beta_dpo": 0.3}
    assert dict(rto_config.token_reward.args) == expected
    lr, critic_lr, ppo_config = seen["ppo"]
    assert (lr, critic_lr) == (config.ppo.lr, config.ppo.critic_lr)
    assert dict(ppo_config.token_reward.args) == {"beta_kl": 0.02, "beta_rm": 1.5}


def test_the_stage_ppo_config_takes_the_loss_average_and_the_other_ppo_fields_of_the_config(fixture_data, trained):
    workdir, _ = trained
    config = small_config(*fixture_data, "ppo")
    config.ppo.loss_average, config.ppo.gamma, config.ppo.clip_eps = "sequence", 0.93, 0.17
    built = stages.ppo_config(config, _task(config, workdir), rto)
    assert (built.loss_average, built.gamma, built.clip_eps) == ("sequence", 0.93, 0.17)


# ----------------------------------------------------------------------------------------------
# Evaluation: the win rate against the data's references.


def test_the_win_rate_counts_wins_over_each_prompts_reference_by_the_judge(fixture_data, trained, tmp_path):
    """Every held-out row logged: each row's reference judge score is the reward model's score of that
    prompt's reference (numpy, from the export), and a policy's win rate is the share of rows whose
    sample the judge scores above it (ties half)."""
    workdir, _ = trained
    config = small_config(*fixture_data, "evaluate")
    given_models(config, workdir)
    config.evaluate.num_samples_logged = config.evaluate.num_prompts
    results = run(config, tmp_path)
    task = _task(config, tmp_path)
    references = task.eval_references
    assert len(references["input_ids"]) == config.evaluate.num_prompts
    judge = load_pretrained(workdir / "reward_model" / "model", kind="scalar")
    as_pair = {f"ref_{k}": v for k, v in references.items()}
    reference_scores = last_token_scores(judge, as_pair, "ref")
    rates = []
    for policy in ("sft", "dpo"):
        lines = (tmp_path / "evaluate" / f"samples_{policy}.jsonl").read_text().splitlines()
        rows = [json.loads(line) for line in lines]
        assert len(rows) == len(reference_scores)
        judged = np.array([r["judge_score"] for r in rows])
        np.testing.assert_allclose([r["reference_judge_score"] for r in rows], reference_scores, rtol=1e-4, atol=1e-4)
        expected = np.mean((judged > reference_scores) + 0.5 * (judged == reference_scores))
        assert results["policies"][policy]["win_rate"] == pytest.approx(expected), policy
        rates.append(expected)
    assert any(rate != 0.5 for rate in rates)  # a win rate taken the other way round would differ


# ----------------------------------------------------------------------------------------------
# Resume guards: a changed PPO section is refused; the lock.


def test_a_changed_ppo_section_is_refused_on_resume_unless_resume_with_changes(fixture_data, trained, tmp_path):
    """The workdir's finished stages were made with config.ppo's values as they were: a resume with
    other PPO values is refused naming each key, before any work; with resume_with_changes the change
    is recorded."""
    workdir = tmp_path / "run"
    shutil.copytree(trained[0], workdir)
    written = (workdir / "config.json").read_text()
    changed = trained_config(*fixture_data)
    changed.ppo.lr, changed.ppo.reward_args.beta_kl = 3e-6, 0.5
    with count_steps() as steps, pytest.raises(ConfigError) as error:
        run(changed, workdir)
    message = str(error.value)
    assert message.startswith("config.resume_with_changes: "), message
    assert f"ppo.lr: {trained_config(*fixture_data).ppo.lr!r} -> 3e-06" in message, message
    assert "ppo.reward_args.beta_kl: " in message and "-> 0.5" in message, message
    assert steps == {} and (workdir / "config.json").read_text() == written

    changed.resume_with_changes = True
    run(changed, workdir)
    (entry,) = json.loads((workdir / "config.json").read_text())["resume_history"]
    assert entry["changes"]["ppo.lr"]["to"] == 3e-6 and entry["changes"]["ppo.reward_args.beta_kl"]["to"] == 0.5
    assert entry["finished_stages"] == ["dpo", "reward_model", "sft"]


def test_a_held_workdir_refuses_a_run_before_it_writes_anything(fixture_data, tmp_path):
    workdir = tmp_path / "run"
    with WorkdirLock(workdir):
        with pytest.raises(WorkdirInUse, match=f"{workdir} is in use by another run: host "):
            WorkdirLock(workdir).__enter__()
        with count_steps() as steps, pytest.raises(WorkdirInUse):
            run(small_config(*fixture_data, "sft"), workdir)
        assert steps == {} and sorted(p.name for p in workdir.iterdir()) == [LOCK_NAME]
    assert not (workdir / LOCK_NAME).exists()  # released (and removed) on exit


# ----------------------------------------------------------------------------------------------
# SIGTERM: the stage stops at its next step boundary with a checkpoint, and resumes from it.


class UnhandledSignal(Exception):
    pass


@contextlib.contextmanager
def sigterm_fails_unless_handled():
    """While the block runs, a SIGTERM the run does not handle fails the test (instead of killing pytest)."""

    def unhandled(signum, frame):
        raise UnhandledSignal("SIGTERM reached the default handler: the run installed none")

    previous = signal.signal(signal.SIGTERM, unhandled)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def sigterm_after_step(stage: str, step: int):
    """Sends this process SIGTERM right after `stage`'s `step`-th step (a preemption notice mid-stage)."""

    def wrap(name, step_fn):
        if name != stage:
            return step_fn
        calls = itertools.count(1)

        def step_then_signal(state, batch, rng):
            out = step_fn(state, batch, rng)
            if next(calls) == step:
                os.kill(os.getpid(), signal.SIGTERM)
            return out

        return step_then_signal

    return _wrap_steps(wrap)


def test_sigterm_mid_stage_stops_at_a_checkpoint_and_the_rerun_resumes_from_it(
    fixture_data, trained, tmp_path, monkeypatch
):
    workdir = tmp_path / "run"
    config = small_config(*fixture_data, "sft")
    config.checkpoint.every_steps = 100  # the cadence alone would write no checkpoint before the end
    # The request is per process (a signal in a stage's last step stops the next stage): reset it
    # around this test's runs, which share pytest's process.
    monkeypatch.setitem(loop._REQUEST, "signal", None)
    with sigterm_fails_unless_handled(), sigterm_after_step("sft", 2), count_steps() as steps:
        with pytest.raises(Preempted) as stopped:
            run(config, workdir)
    assert (stopped.value.stage, stopped.value.step, stopped.value.signal_name) == ("sft", 2, "SIGTERM")
    assert steps == {"sft": 2}  # of 5: it stopped, it did not run on
    assert f"checkpoint written to {workdir / 'sft' / 'checkpoints' / '2'}" in str(stopped.value)
    assert sorted(p.name for p in (workdir / "sft" / "checkpoints").iterdir() if p.name.isdigit()) == ["2"]
    assert not (workdir / "sft" / "done.json").exists() and not (workdir / LOCK_NAME).exists()

    loop._REQUEST["signal"] = None  # a new process in real life
    with count_steps() as steps:
        run(config, workdir)
    assert steps == {"sft": 3}
    assert json.loads((workdir / "sft" / "done.json").read_text())["resumed_from"] == 2
    uninterrupted = [r for r in strip_time(read_metrics(trained[0] / "metrics.jsonl")) if r["stage"] == "sft"]
    same_numbers(uninterrupted, strip_time(read_metrics(workdir / "metrics.jsonl")))


def test_a_new_run_starts_without_the_stop_request_an_earlier_run_honoured():
    """A SIGTERM honoured by one run() must not stop the next run() in the same process at its first
    step, while a signal between two stages of one run still stops the next stage (nested blocks)."""
    from rto_jax.pipeline import loop

    with loop.stop_requests() as outer:
        outer["signal"] = "SIGTERM"  # as the handler sets it during a stage's last step
        with loop.stop_requests() as stage:  # the next stage's loop, inside the same run
            assert stage["signal"] == "SIGTERM"
    with loop.stop_requests() as next_run:
        assert next_run["signal"] is None


def test_a_finished_evaluation_runs_again_when_the_recipe_asks_for_a_policy_it_lacks(tmp_path):
    """A comparison resumed with one more method (`resume_with_changes`): its finished evaluation did not
    cover the new policy, so it runs again; asked for the policies it covered, it stays skipped."""
    from tests.test_pipeline import load_config

    config = with_seed(load_config("rto_synthetic", "smoke"), 0)
    calls = []

    def evaluate(config, workdir, task, run_log, *, policies):
        calls.append(sorted(policies))
        return {"num_prompts": 4, "policies": {name: {"score": 0.0} for name in policies}}

    def run_stage(policies):
        with open_pipeline(config, tmp_path) as pipeline:
            return pipeline.stage("evaluate", evaluate, policies=dict.fromkeys(policies, "path"))

    run_stage(["sft", "ppo"])
    run_stage(["ppo", "sft"])  # the same policies: skipped
    result = run_stage(["sft", "ppo", "rloo"])
    assert calls == [["ppo", "sft"], ["ppo", "rloo", "sft"]]
    assert set(result["policies"]) == {"sft", "ppo", "rloo"}
    assert set(json.loads((tmp_path / "evaluate" / "done.json").read_text())["policies"]) == {"sft", "ppo", "rloo"}
