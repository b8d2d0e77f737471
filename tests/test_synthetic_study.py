"""The RTO-vs-PPO study (experiments/synthetic_study.py) at toy sizes (configs/rto_synthetic.py:study_smoke):
every cell changes what it says it changes, the statistics are the textbook ones, a restart redoes
nothing, and a bad design is refused before any work."""

import json

import numpy as np
import pytest

from rto_jax.errors import ConfigError
from rto_jax.eval.report import mean_ci, paired_difference
from rto_jax.pipeline import run, validate
from rto_jax.pipeline.logging import read_metrics
from rto_jax.pipeline.recipes import load_recipe
from tests.test_synthetic_benchmark import _config

CELLS = {"horizon_8", "dpo_24_pairs", "dpo_96_pairs", "beta_kl_0.2", "horizon_12"}


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("study")
    config = _config("study_smoke")
    return config, workdir, run(config, workdir)


def _first_train_record(folder, stage, step=1):
    records = read_metrics(folder / "metrics.jsonl")
    return next(r for r in records if r["stage"] == stage and r["split"] == "train" and r["step"] == step)


def test_every_cell_and_output_for_every_seed(study):
    _, workdir, results = study
    figures = ("study_gold_vs_episodes.png", "study_rto_minus_ppo.png", "study_gold_vs_kl.png")
    for name in ("results.json", "results.md", *figures):
        assert (workdir / name).stat().st_size > 0, name
    assert results["seeds"] == [1, 2] and set(results["cells"]) == CELLS
    table = (workdir / "results.md").read_text()
    for name, cell in results["cells"].items():
        assert f"| {name} |" in table
        for m in cell["methods"].values():
            assert len(m["gold_per_seed"]) == 2 and m["gold_reward"]["n"] == 2
            assert m["curve"][0]["episodes"] == 0 and len(m["curve"]) == 4  # pi_sft + 3 iterations
        # The curve starts at pi_sft's held-out gold reward (the same samples' keys).
        assert cell["methods"]["ppo"]["curve"][0]["gold"]["mean"] == pytest.approx(cell["sft_gold"]["mean"])
    for seed in (1, 2):  # the center in seed_N/, the other horizon in its own pipeline
        assert (workdir / f"seed_{seed}" / "ppo_rto_dpo_24_pairs" / "done.json").exists()
        assert (workdir / f"seed_{seed}" / "horizon_12" / "ppo_rto" / "done.json").exists()
        assert not (workdir / f"seed_{seed}" / "horizon_12" / "dpo_24_pairs").exists()  # DPO cells: center only


def test_the_horizon_cell_runs_the_scaled_task(study):
    _, workdir, _ = study
    task = json.loads((workdir / "seed_1" / "horizon_12" / "config.json").read_text())["synthetic"]["task"]
    assert (task["target_length"], task["min_response_length"], task["max_response_length"]) == (12, 3, 36)
    assert task["eos_hazard"] == pytest.approx(0.12 * 8 / 12)
    center = json.loads((workdir / "seed_1" / "config.json").read_text())["synthetic"]["task"]
    assert (center["target_length"], center["max_response_length"]) == (8, 24)
    # Its SFT learned the longer source: pi_sft's rollouts there are longer than at the center.
    long = _first_train_record(workdir / "seed_1" / "horizon_12", "ppo_ppo")["response_length"]
    short = _first_train_record(workdir / "seed_1", "ppo_ppo")["response_length"]
    assert long > short


def test_dpo_cells_train_on_nested_subsets_and_share_the_center_ppo(study):
    _, workdir, results = study
    seed = workdir / "seed_1"
    # 1 epoch of full batches of 16: 24, 48 and 96 pairs are 1, 3 and 6 steps.
    steps = {n: json.loads((seed / stage / "done.json").read_text())["steps"] for n, stage in
             ((24, "dpo_24_pairs"), (48, "dpo"), (96, "dpo_96_pairs"))}  # fmt: skip
    assert steps == {24: 1, 48: 3, 96: 6}
    cells = results["cells"]
    for cell in ("dpo_24_pairs", "dpo_96_pairs"):  # PPO reads no DPO model: the center's run
        assert cells[cell]["methods"]["ppo"]["gold_per_seed"] == cells["horizon_8"]["methods"]["ppo"]["gold_per_seed"]
    # RTO reads its cell's DPO model: the same first rollout (common random numbers), another DPO part.
    center, fewer = _first_train_record(seed, "ppo_rto"), _first_train_record(seed, "ppo_rto_dpo_24_pairs")
    assert center["response_length"] == fewer["response_length"]
    assert center["reward/dpo"] != pytest.approx(fewer["reward/dpo"], rel=1e-3)


def test_the_kl_cell_sets_both_methods_coefficient(study):
    _, workdir, results = study
    cell = results["cells"]["beta_kl_0.2"]
    assert {m: v["reward_args"]["beta_kl"] for m, v in cell["methods"].items()} == {"ppo": 0.2, "rto": 0.2}
    assert results["cells"]["horizon_8"]["methods"]["rto"]["reward_args"]["beta_kl"] == 0.05  # the tuned value
    # The coefficient each run trained with, from its own log: its KL part is -beta_kl times its KL to
    # pi_ref (both the same rollout's per-sequence sums). Not a comparison across runs: the first
    # rollout's KL is not exactly 0 (the sampler's log-probs and the reference's forward pass round
    # differently, ~1e-6), so the first update, and every later number, differs between the center
    # and the cell by beta_kl times that rounding (1e-5 relative at step 2 seen on other machines).
    # Steps 2 and 3 only: step 1's KL is that rounding, a sum of signed noise with no relative accuracy.
    # Bound: both sides reduce the same 16 x 24 float32 log-ratios, one scaled by beta_kl, maybe in
    # another order: <= 384 * 6e-8 = 2.3e-5 relative times the sum's cancellation (seen: <= 5e-7);
    # 1e-3 allows cancellation up to 40x while a wrong coefficient (0.05 for 0.2) is 300% off.
    expected = {"": 0.05, "_kl_0.2": 0.2}  # the center's tuned value for both methods (TUNED), the cell's
    for method in ("ppo", "rto"):
        for suffix, beta_kl in expected.items():
            for step in (2, 3):
                record = _first_train_record(workdir / "seed_2", f"ppo_{method}{suffix}", step=step)
                assert record["kl_to_ref"] > 1e-3, (method, suffix, step)  # the policy moved: a real KL
                ratio = record["reward/kl"] / record["kl_to_ref"]
                assert ratio == pytest.approx(-beta_kl, rel=1e-3), (method, suffix, step)
        # The cell changes only the coefficient: the same first rollout as the center's (same models, keys).
        center, strong = (_first_train_record(workdir / "seed_2", f"ppo_{method}{s}") for s in expected)
        assert strong["response_length"] == center["response_length"]


def test_a_restart_redoes_nothing_and_gives_the_same_results(study):
    config, workdir, results = study
    logs = sorted(workdir.glob("seed_*/**/metrics.jsonl"))
    assert len(logs) == 4  # two seeds, each with the center and horizon 12
    before = [len(read_metrics(p)) for p in logs]
    again = run(config, workdir)
    assert [len(read_metrics(p)) for p in logs] == before
    assert json.dumps(again["cells"], sort_keys=True) == json.dumps(results["cells"], sort_keys=True)


def test_intervals_use_student_t_and_the_paired_difference_is_per_seed():
    ci = mean_ci([1.0, 2.0, 3.0, 4.0, 5.0])
    half = 2.7764451051977987 * np.sqrt(2.5 / 5)  # t(0.975, 4 dof) x the standard error
    assert (ci["mean"], ci["n"]) == (3.0, 5)
    assert ci["low"] == pytest.approx(3.0 - half) and ci["high"] == pytest.approx(3.0 + half)
    # Paired: a constant shift has a zero-width interval although each method's spread is large.
    diff = paired_difference([1.1, 5.1, 3.1], [1.0, 5.0, 3.0])
    assert diff["mean"] == pytest.approx(0.1) and diff["high"] - diff["low"] == pytest.approx(0.0, abs=1e-12)
    assert (diff["wins"], diff["ties"], diff["losses"]) == (3, 0, 0)
    assert paired_difference([0.0, 1.0], [1.0, 1.0])["losses"] == 1


def test_horizon_config_scales_every_length_of_the_task():
    recipe = load_recipe("experiments/synthetic_study.py")
    config = _config("study")
    long = recipe.horizon_config(config, 96, 4096)
    task = long.synthetic.task
    assert (task.target_length, task.min_response_length, task.max_response_length) == (96, 24, 288)
    assert task.eos_hazard == pytest.approx(0.01)
    assert long.data.max_response_len == 288 and long.model.max_position_embeddings >= 6 + 288
    assert long.synthetic.preference_pairs == 4096 + 256
    for weight in ("quality_weight", "coverage_weight", "length_weight", "eos_weight"):
        assert task[weight] == config.synthetic.task[weight]  # the gold reward keeps its form
    assert config.synthetic.task.target_length == 8  # the study's own config is untouched


@pytest.mark.parametrize(
    "key,value,message",
    [
        ("seeds", "1,1000", "the tuning seed 1000"),
        ("study.horizons", "32,96", "must hold the center task's target_length 8"),
        ("study.dpo_pairs", "1024,16384", "must hold study.reward_pairs (4096)"),
        ("synthetic.preference_pairs", 4096, "fewer than the largest of study.dpo_pairs"),
        ("ppo.per_method", "ppo:beta_kl=0.05", "give rto's tuned values"),
        ("study.beta_kl", "0.1,-1", "distinct positive numbers"),
    ],
)
def test_a_bad_design_is_refused_before_any_work(key, value, message):
    config = _config("study")
    with config.unlocked():
        section, _, name = key.rpartition(".")
        (config[section] if section else config)[name] = value
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        validate(config)


def test_aggregate_pairs_each_seeds_methods_and_counts_episodes_over_ppo(tmp_path):
    """Two seeds, one cell: intervals over seeds, RTO - PPO seed by seed, the episode ratio only where
    PPO's final is above pi_sft's, and "never" where RTO did not get there."""
    recipe = load_recipe("experiments/synthetic_study.py")

    def seed(number, ppo_gold, rto_gold, rto_reach, ppo_reach):
        def method(gold, reach):
            return {"gold_reward": gold, "kl_to_ref": 1.0, "reward_args": {"beta_kl": 0.05},
                    "curve": [(0, 0.0, 0.0), (10, gold, 1.0)], "episodes_to_ppo_final": reach}  # fmt: skip

        references = {"held_out": {"sft": {"gold_reward": 0.0}, "dpo_16": {"gold_reward": 0.1}},
                      "best_of_n": [{"n": 1, "kl": 0.0, "gold_reward": 0.0}]}  # fmt: skip
        cell = {
            "horizon": 8,
            "dpo_pairs": 16,
            "methods": {"ppo": method(ppo_gold, ppo_reach), "rto": method(rto_gold, rto_reach)},
        }
        return {"seed": number, "center": 8, "cells": {"horizon_8": cell}, "references": {"8": references}}

    per_seed = [seed(1, 0.10, 0.30, 5.0, 10.0), seed(2, 0.20, 0.10, None, 8.0), seed(3, 0.0, 0.1, 0.0, 0.0)]
    out = recipe.aggregate(per_seed, tmp_path)
    cell = out["cells"]["horizon_8"]
    assert cell["rto_minus_ppo"]["per_seed"] == pytest.approx([0.2, -0.1, 0.1])
    assert (cell["rto_minus_ppo"]["wins"], cell["rto_minus_ppo"]["losses"]) == (2, 1)
    assert [p["per_seed"] for p in cell["rto_minus_ppo_curve"]] == [[0.0, 0.0, 0.0], pytest.approx([0.2, -0.1, 0.1])]
    assert cell["methods"]["ppo"]["gold_reward"]["mean"] == pytest.approx(0.1)
    assert cell["rto_episodes_over_ppo"] == [0.5, None]  # seed 3: PPO no better than pi_sft, left out
    assert cell["methods"]["rto"]["reached"] == 2
    assert "| horizon_8 |" in (tmp_path / "results.md").read_text()
