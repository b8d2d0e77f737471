"""The synthetic comparison (configs/rto_synthetic.py:smoke) through the one pipeline: every output
file, each method's own token reward, the seed it was asked for, and a restart that reuses everything."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from rto_jax.eval import episodes_to_reach, win_rate
from rto_jax.eval.report import aggregate
from rto_jax.pipeline import run
from rto_jax.pipeline.logging import read_metrics

ROOT = Path(__file__).resolve().parents[1]
METHODS = {"ppo": {"kl", "score"}, "rto": {"dpo", "kl", "score"}, "rto_sequence_end": {"dpo", "kl", "score"}}
METHODS["rto_no_rm"] = {"dpo", "kl"}
METHODS.update(rloo={"kl", "score"}, rto_rloo={"dpo", "kl", "score"})  # the critic-free rows: RLOO, n = 4
METHODS["rto_online_prm"] = {"dpo", "kl", "score"}  # RTO-RLOO with the DPO policy trained during PPO
CRITIC_FREE = ("rloo", "rto_rloo", "rto_online_prm")


def _config(preset):
    spec = importlib.util.spec_from_file_location("rto_synthetic", ROOT / "configs" / "rto_synthetic.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(preset)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("smoke")
    config = _config("smoke")
    config.seeds = "7"  # what `--config.seeds=7` sets: the run must be seed 7's, not the default's
    # Two methods with their own coefficients (unclipped, so the DPO parts compare exactly).
    config.ppo.per_method = "rto:dpo_clip=0;rto_no_rm:dpo_clip=0,beta_dpo=0.1"
    return config, workdir, run(config, workdir)


def test_smoke_preset_writes_every_output_for_the_seed_asked(smoke):
    _, workdir, results = smoke
    for name in ("results.json", "results.md", "gold_vs_episodes.png", "gold_vs_kl.png"):
        assert (workdir / name).stat().st_size > 0, name
    saved = json.loads((workdir / "results.json").read_text())
    assert saved["seed"] == 7 and json.loads((workdir / "config.json").read_text())["seed"] == 7
    assert set(saved["methods"]) == {"sft", "dpo", *METHODS}
    for method in saved["methods"].values():
        for key in ("gold_reward", "gold_reward_se", "kl", "score", "length", "eos_rate", "gold_win_rate_vs_sft"):
            assert np.isfinite(method[key]), key
        assert -1.0 <= method["gold_reward"] <= 1.0
    assert [p["n"] for p in saved["best_of_n"]] == [1, 2, 3, 4]
    assert saved["methods"]["sft"]["kl"] == 0.0  # the reference policy itself
    assert saved["methods"]["sft"]["gold_win_rate_vs_sft"] == 0.5
    assert set(saved["episodes_to_ppo_final"]) == set(METHODS)
    assert all(len(curve) == 3 for curve in saved["curves"].values())  # start + 2 iterations (eval_every 1)
    for name in ("sft", "reward_model", "dpo", *(f"ppo_{m}" for m in METHODS)):
        assert (workdir / name / "model" / "model.safetensors").exists(), name
    assert 0.5 < saved["labels"]["agreement"] <= 1.0


def test_each_method_trains_with_its_own_token_reward(smoke):
    """The logged reward parts say which terms each method's reward had; the DPO term is not 0."""
    _, workdir, _ = smoke
    parts = {}
    for record in read_metrics(workdir / "metrics.jsonl"):
        if record["split"] == "train" and "reward/total" in record:
            parts.setdefault(record["stage"], []).append(record)
    assert set(parts) == {f"ppo_{m}" for m in METHODS}
    for method, expected in METHODS.items():
        records = parts[f"ppo_{method}"]
        for r in records:
            assert {k[len("reward/") :] for k in r if k.startswith("reward/")} - {"total"} == expected, method
            total = sum(r[f"reward/{p}"] for p in expected)
            assert abs(r["reward/total"] - total) < 1e-4 * max(1.0, abs(total)), (method, r)
        if "dpo" in expected:  # the DPO policy differs from the reference: its reward is not 0
            assert any(abs(r["reward/dpo"]) > 1e-6 for r in records), method
    # The same prompts and rollout keys for every method with a critic: their first rollouts are identical.
    first = {m: parts[f"ppo_{m}"][0] for m in METHODS}
    assert len({round(r["response_length"], 6) for m, r in first.items() if m not in CRITIC_FREE}) == 1
    # The RLOO rows train without a critic, on groups of 4 responses (16 rows: 4 prompts x 4).
    for method in METHODS:
        has_critic = method not in CRITIC_FREE
        for r in parts[f"ppo_{method}"]:
            assert ("value_loss" in r) == has_critic and ("group_reward_std" in r) == (not has_critic), method
    for method in CRITIC_FREE:
        assert not (workdir / f"ppo_{method}" / "critic").exists()
    assert (workdir / "ppo_rto" / "critic").exists()
    # RTO's reward with RLOO is RTO's reward: the same DPO-term scale in its first rollout.
    assert first["rto_rloo"]["reward/dpo"] == pytest.approx(first["rto"]["reward/dpo"], rel=0.5)
    # Only the online-PRM row trains its DPO policy (and exports it); rto_rloo's stays the DPO stage's.
    for method in METHODS:
        assert all(("prm/loss" in r) == (method == "rto_online_prm") for r in parts[f"ppo_{method}"]), method
        assert (workdir / f"ppo_{method}" / "prm").exists() == (method == "rto_online_prm"), method
    # Same prompts, keys and PRM before its first update: with prm_update "before" its first DPO term
    # differs from rto_rloo's only by that one update.
    assert first["rto_online_prm"]["response_length"] == pytest.approx(first["rto_rloo"]["response_length"])
    # ppo.per_method: rto_no_rm's beta_dpo 0.1 against rto's shared 0.05, both unclipped.
    assert first["rto_no_rm"]["reward/dpo"] == pytest.approx(2 * first["rto"]["reward/dpo"], rel=1e-4)


def test_results_name_models_relative_to_the_workdir(smoke):
    """results.json and evaluate/<policy>.json: no absolute path into the workdir (a moved workdir reads)."""
    _, workdir, _ = smoke
    files = [workdir / "results.json", *sorted((workdir / "evaluate").glob("*.json"))]
    assert len(files) == 1 + 2 + len(METHODS) + 1  # results.json; sft, dpo, the methods; done.json
    for path in files:
        assert str(workdir) not in path.read_text(), path
    saved = json.loads((workdir / "results.json").read_text())
    assert saved["judge"] == "reward_model/model"
    assert saved["policies"]["sft"]["model_path"] == "sft/model"
    assert json.loads((workdir / "evaluate" / "rto.json").read_text())["model_path"] == "ppo_rto/model"


def test_a_restart_reuses_every_stage_and_reproduces_the_results(smoke):
    config, workdir, results = smoke
    before = len(read_metrics(workdir / "metrics.jsonl"))
    again = run(config, workdir)
    assert len(read_metrics(workdir / "metrics.jsonl")) == before  # nothing ran again
    assert again["methods"] == results["methods"]
    assert json.loads(json.dumps(again["curves"])) == json.loads(json.dumps(results["curves"]))


def test_episodes_to_reach_interpolates_and_win_rate_counts_ties():
    curve = [(0, 0.0), (100, 0.5), (200, 1.0)]
    assert episodes_to_reach(curve, 0.25) == 50.0
    assert episodes_to_reach(curve, 0.0) == 0.0
    assert episodes_to_reach(curve, 2.0) is None
    assert win_rate([1, 2, 3], [0, 2, 4]) == 0.5


def test_aggregate_reports_standard_errors_across_seeds():
    def fake(seed, gold):
        return {
            "seed": seed,
            "methods": {"ppo": {"gold_reward": gold, "gold_reward_se": 0.01, "kl": 1.0, "score": 0.0}},
            "curves": {"ppo": [(0, 0.0), (10, gold)]},
            "episodes_to_ppo_final": {"ppo": 10.0},
            "best_of_n": [{"n": 1, "kl": 0.0, "gold_reward": gold}],
        }

    agg = aggregate([fake(0, 0.1), fake(1, 0.3)])
    assert agg["methods"]["ppo"]["gold_reward"] == 0.2
    assert abs(agg["methods"]["ppo"]["gold_reward_se"] - 0.1) < 1e-12
    assert agg["curves"]["ppo"][1][:2] == (10.0, 0.2)


# ----------------------------------------------------------------------------------------------
# Fair tuning (experiments/synthetic_tune.py) at smoke budgets.


@pytest.fixture(scope="module")
def tuning(tmp_path_factory):
    from ml_collections import config_dict

    from rto_jax.pipeline.recipes import set_recipe

    workdir = tmp_path_factory.mktemp("tune")
    config = _config("smoke")
    with config.unlocked():
        set_recipe(config, "experiments/synthetic_tune.py")
        config.ppo.reward_args.dpo_clip = 0.0  # unclipped: the DPO parts scale with beta_dpo exactly
        config.tune = config_dict.ConfigDict({"grid": "ppo: lr=1e-4|3e-2; rto: beta_dpo=0.05|0.2"})
    return config, workdir, run(config, workdir)


def test_tuning_runs_every_point_and_freezes_each_methods_best(tuning):
    from rto_jax.pipeline.config import parse_per_method

    _, workdir, results = tuning
    rows = results["rows"]
    assert [(r["method"], r["values"]) for r in rows] == [
        ("ppo", {"lr": 1e-4}), ("ppo", {"lr": 3e-2}), ("rto", {"beta_dpo": 0.05}), ("rto", {"beta_dpo": 0.2})
    ]  # fmt: skip
    for method in ("ppo", "rto"):
        mine = [r for r in rows if r["method"] == method]
        assert results["best"][method]["gold_reward"] == max(r["gold_reward"] for r in mine)
        assert parse_per_method(results["per_method"])[method] == results["best"][method]["values"]
    assert "per_method: " in (workdir / "results.md").read_text()
    train = {}
    for record in read_metrics(workdir / "metrics.jsonl"):
        if record["split"] == "train" and record["stage"].startswith("tune_"):
            train.setdefault(record["stage"], []).append(record)
    # Each point's values reached its run: the same first rollout, the DPO part scaled by beta_dpo...
    assert train["tune_rto_1"][0]["reward/dpo"] == pytest.approx(4 * train["tune_rto_0"][0]["reward/dpo"], rel=1e-4)
    # ... and a learning rate 300x larger moved the policy further (its second rollout's KL).
    assert train["tune_ppo_1"][0]["response_length"] == train["tune_ppo_0"][0]["response_length"]
    assert train["tune_ppo_1"][1]["kl_to_ref"] > train["tune_ppo_0"][1]["kl_to_ref"]


@pytest.mark.parametrize(
    "grid,message",
    [
        ("ppo: lr=1e-4|3e-4; rto: beta_dpo=0.05", "every method needs the same number of runs"),
        ("ppo: beta_dpo=0.1", "ppo: 'beta_dpo' is not one of lr, critic_lr, prm_lr, beta_kl, beta_rm"),
        ("sft: lr=1e-4", "no method 'sft'"),
        ("ppo: lr=fast", "expected 'key=number|number...'"),
    ],
)
def test_a_bad_grid_is_refused_before_any_work(grid, message):
    from ml_collections import config_dict

    from rto_jax.errors import ConfigError
    from rto_jax.pipeline.config import validate
    from rto_jax.pipeline.recipes import set_recipe

    config = _config("smoke")
    with config.unlocked():
        set_recipe(config, "experiments/synthetic_tune.py")
        config.tune = config_dict.ConfigDict({"grid": grid})
    with pytest.raises(ConfigError, match=f"config.tune.grid: .*{message}"):
        validate(config)
