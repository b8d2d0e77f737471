"""The RTO-vs-PPO study (experiments/synthetic_study.py) at toy sizes (configs/rto_synthetic.py:study_smoke):
every cell changes what it says it changes, the statistics are the textbook ones, a restart redoes
nothing, and a bad design is refused before any work."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from rto_jax.errors import ConfigError
from rto_jax.eval.report import mean_ci, paired_difference
from rto_jax.pipeline import run, validate
from rto_jax.pipeline.logging import read_metrics
from rto_jax.pipeline.recipes import load_recipe
from experiments import synthetic_study_report
from tests.test_synthetic_benchmark import _config

CELLS = {"horizon_8", "dpo_24_pairs", "dpo_96_pairs", "beta_kl_0.2", "horizon_12", "beta_dpo_0.5_h12", "critic_free_h8"}
METHODS = {"ppo", "rto", "oracle_dense", "oracle_rm"}
# The horizon's PPO and RTO, both rewards and both positive controls under RLOO.
CRITIC_FREE_CELL = {"ppo", "rto", "rloo", "rto_rloo", "oracle_dense_rloo", "oracle_rm_rloo"}


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
    for name in ("results.json", "results.md", *synthetic_study_report.FIGURES):
        assert (workdir / name).stat().st_size > 0, name
    assert results["seeds"] == [1, 2] and set(results["cells"]) == CELLS
    table = (workdir / "results.md").read_text()
    for name, cell in results["cells"].items():
        assert name in table and cell["n"] == 2
        assert set(cell["methods"]) == (CRITIC_FREE_CELL if name.startswith("critic_free") else METHODS)
        for m in cell["methods"].values():
            assert len(m["gold_per_seed"]) == 2 and m["gold_reward"]["n"] == 2
            assert m["curve"][0]["episodes"] == 0 and len(m["curve"]) == 4  # pi_sft + 3 iterations
        # The curve starts at pi_sft's held-out gold reward (the same samples' keys).
        assert cell["methods"]["ppo"]["curve"][0]["gold"]["mean"] == pytest.approx(cell["sft_gold"]["mean"])
    for seed in (1, 2):  # the center in seed_N/, the other horizon in its own pipeline
        assert (workdir / f"seed_{seed}" / "ppo_rto_dpo_24_pairs" / "done.json").exists()
        assert (workdir / f"seed_{seed}" / "horizon_12" / "ppo_oracle_rm" / "done.json").exists()
        assert not (workdir / f"seed_{seed}" / "horizon_12" / "dpo_24_pairs").exists()  # DPO cells: center only
        # One committed-style summary per (seed, cell): what the study resumes from across sessions.
        assert {p.stem for p in (workdir / "summaries" / f"seed_{seed}").glob("*.json")} == CELLS


def _summary(workdir, seed, cell):
    return json.loads((workdir / "summaries" / f"seed_{seed}" / f"{cell}.json").read_text())


def test_the_positive_controls_read_the_gold_reward_scaled_from_pi_sft(study):
    """oracle_dense: PPO's reward + beta_gold x gold credit, beta_gold = the DPO term's per-token spread
    over the gold credit's (the credit stage, on pi_sft's samples); oracle_rm: r* normalized there."""
    _, workdir, _ = study
    seed = workdir / "seed_1"
    credit = json.loads((seed / "credit" / "done.json").read_text())
    center = _summary(workdir, 1, "horizon_8")
    dense, oracle = (center["methods"][m] for m in ("oracle_dense", "oracle_rm"))
    beta_gold = credit["tuned"]["dpo_scale"] / credit["gold_credit_scale"]
    assert dense["reward_args"]["beta_gold"] == pytest.approx(beta_gold) and beta_gold > 0
    assert dense["reward_args"]["beta_kl"] == center["methods"]["ppo"]["reward_args"]["beta_kl"]  # PPO's tuned values
    assert (oracle["reward_args"]["gold_mean"], oracle["reward_args"]["gold_std"]) == (
        pytest.approx(credit["gold_mean"]), pytest.approx(credit["gold_std"]))  # fmt: skip
    # pi_sft's mean gold reward there is the gold evaluation's (the same samples' keys).
    sft_gold = json.loads((seed / "gold_eval" / "done.json").read_text())["sft"]["gold_reward"]
    assert credit["gold_mean"] == pytest.approx(sft_gold, abs=1e-5)
    # Each logs its gold part; PPO, RTO and oracle_rm on the same first rollout see the same RM-free KL part.
    first = {m: _first_train_record(seed, f"ppo_{m}") for m in METHODS}
    assert "reward/gold" in first["oracle_dense"] and "reward/gold" in first["oracle_rm"]
    assert "reward/score" not in first["oracle_rm"] and "reward/dpo" not in first["oracle_dense"]
    assert len({r["response_length"] for r in first.values()}) == 1  # common random numbers
    # The gold credit part of the first rollout has the size RTO's DPO part has, not 0 and not 100x.
    assert first["oracle_dense"]["reward/gold"] != 0.0
    # Along training every run logs its parts' correlation with the gold credit; the oracle's gold part is the credit.
    curve = dense["credit_curve"]
    assert len(curve) == 3 and all(point["gold_token"] == pytest.approx(1.0) for point in curve)
    assert all(point["dpo_token"] is None or -1 <= point["dpo_token"] <= 1 for point in center["methods"]["rto"]["credit_curve"])


def test_the_dpo_weight_cell_trains_rto_unclipped_and_rescales_the_oracle(study):
    _, workdir, _ = study
    cell, base = _summary(workdir, 1, "beta_dpo_0.5_h12"), _summary(workdir, 1, "horizon_12")
    assert cell["varies"] == {"beta_dpo": 0.5, "dpo_clip": 0.0}
    assert (cell["methods"]["rto"]["reward_args"]["beta_dpo"], cell["methods"]["rto"]["reward_args"]["dpo_clip"]) == (0.5, 0.0)
    for method in ("ppo", "oracle_rm"):  # they do not read the DPO weight: the horizon's runs
        assert cell["methods"][method]["shared_from"] == "horizon_12"
        assert cell["methods"][method]["gold_reward"] == base["methods"][method]["gold_reward"]
    folder = workdir / "seed_1" / "horizon_12"
    credit = json.loads((folder / "credit" / "done.json").read_text())
    wide = json.loads((folder / "credit_beta_dpo_0.5" / "done.json").read_text())
    assert cell["methods"]["oracle_dense"]["reward_args"]["beta_gold"] == pytest.approx(
        wide["beta_dpo_0.5"]["oracle_dense_beta_gold"])  # fmt: skip
    # Ten times the weight, no clip: a larger DPO term (per-token spread) than the tuned 0.05 clipped at 0.2.
    assert wide["beta_dpo_0.5"]["dpo_scale"] > credit["tuned"]["dpo_scale"]
    assert cell["credit"]["dpo_scale"] == pytest.approx(wide["beta_dpo_0.5"]["dpo_scale"])
    assert wide["gold_mean"] == credit["gold_mean"]  # the same pi_sft samples


def test_the_critic_free_cell_trains_both_rewards_under_rloo_without_a_critic(study):
    """critic_free_h8: PPO's and RTO's rewards under RLOO (4 responses per prompt, no critic), each with
    its own tuned values (per_method's rloo / rto_rloo), and the positive controls under RLOO with
    rloo's values, oracle_dense_rloo's gold term sized as rto_rloo's DPO term; beside the horizon's
    PPO and RTO runs."""
    _, workdir, results = study
    cell, center = _summary(workdir, 1, "critic_free_h8"), _summary(workdir, 1, "horizon_8")
    assert cell["varies"] == {"estimator": "rloo", "samples_per_prompt": 4}
    for method in ("ppo", "rto"):  # made in the same run: the horizon's own runs
        assert cell["methods"][method]["shared_from"] == "horizon_8"
        assert cell["methods"][method]["gold_reward"] == center["methods"][method]["gold_reward"]
    rloo, rto_rloo = cell["methods"]["rloo"], cell["methods"]["rto_rloo"]
    assert "shared_from" not in rloo and "shared_from" not in rto_rloo
    # Each its own per_method entry: rto_rloo clips the DPO term at 0.05 where RTO (with GAE) clips at 0.2
    # (TUNED_RLOO); study_smoke gives rloo beta_kl 0.1 where PPO has 0.05.
    assert rto_rloo["reward_args"]["dpo_clip"] == 0.05 and cell["methods"]["rto"]["reward_args"]["dpo_clip"] == 0.2
    assert rloo["reward_args"]["beta_kl"] == 0.1 and cell["methods"]["ppo"]["reward_args"]["beta_kl"] == 0.05
    assert set(rloo["parts"]) == {"kl", "score"} and set(rto_rloo["parts"]) == {"dpo", "kl", "score"}
    seed = workdir / "seed_1"
    credit = json.loads((seed / "credit_rto_rloo" / "done.json").read_text())
    dense, oracle = cell["methods"]["oracle_dense_rloo"], cell["methods"]["oracle_rm_rloo"]
    assert dense["reward_args"]["beta_gold"] == pytest.approx(credit["rto_rloo"]["oracle_dense_beta_gold"])
    assert cell["credit"]["dpo_scale"] == pytest.approx(credit["rto_rloo"]["dpo_scale"])  # the cell's DPO term
    assert oracle["reward_args"]["gold_mean"] == pytest.approx(credit["gold_mean"])
    assert dense["reward_args"]["beta_kl"] == oracle["reward_args"]["beta_kl"] == 0.1  # rloo's values, not PPO's
    assert set(dense["parts"]) == {"gold", "kl", "score"} and set(oracle["parts"]) == {"gold", "kl"}
    for method in ("rloo", "rto_rloo", "oracle_dense_rloo", "oracle_rm_rloo"):  # no critic trained, none exported
        assert "value_loss" not in _first_train_record(seed, f"ppo_{method}")
        assert not (seed / f"ppo_{method}" / "critic").exists()
    assert "value_loss" in _first_train_record(seed, "ppo_rto") and (seed / "ppo_rto" / "critic").exists()
    # The report pairs RTO's reward under RLOO with PPO's reward under RLOO, seed by seed.
    reported = results["cells"]["critic_free_h8"]["methods"]["rto_rloo"]["minus_rloo"]
    golds = [_summary(workdir, s, "critic_free_h8")["methods"] for s in (1, 2)]
    differences = [g["rto_rloo"]["gold_reward"] - g["rloo"]["gold_reward"] for g in golds]
    assert reported["mean"] == pytest.approx(np.mean(differences)) and reported["n"] == 2
    table = (workdir / "results.md").read_text().split("\n## ")[0].splitlines()
    header = next(line for line in table if line.startswith("| cell |"))
    column = header.split(" | ").index("rto_rloo - rloo (wins)")
    row = next(line for line in table if line.startswith("| critic_free_h8 |"))
    assert row.split(" | ")[column].startswith(f"{reported['mean']:+.3f} [")
    assert all(line.count(" | ") == header.count(" | ") for line in table if line.startswith("| "))


def test_committed_summaries_are_not_run_again(study, tmp_path):
    """A fresh workdir with study.summaries pointing at finished summaries runs no stage at all; a
    horizon with some cells committed runs only the others, with the runs they compare with, in its
    own workdir (never pairing new runs with committed ones); a summary of another design, or without
    a method its cell trains now, is not taken."""
    config, workdir, _ = study
    committed = tmp_path / "committed"
    shutil.copytree(workdir / "summaries", committed)
    again = config.copy_and_resolve_references()
    with again.unlocked():
        again.study.summaries = str(committed)
        again.seeds = "1"
    fresh = tmp_path / "fresh"
    run(again, fresh)
    assert not (fresh / "sft").exists() and not (fresh / "horizon_12").exists()
    kept = {p.name: p.read_text() for p in (committed / "seed_1").glob("*.json")}
    # A summary of another design is not taken (its cell would run again, as the one below does).
    study_recipe = load_recipe("experiments/synthetic_study.py")
    at_12 = study_recipe.horizon_config(again, 12, study_recipe.design(again).reward_pairs)
    taken = lambda: set(study_recipe._committed(committed, 1, ["horizon_12", "beta_dpo_0.5_h12"], at_12))
    assert taken() == {"horizon_12", "beta_dpo_0.5_h12"}
    stale = committed / "seed_1" / "horizon_12.json"
    stale.write_text(json.dumps({**json.loads(stale.read_text()), "design": "another"}))
    assert taken() == {"beta_dpo_0.5_h12"}
    stale.write_text(kept["horizon_12.json"])
    # A cell that has since gained a method runs again, with only the runs it needs.
    older = committed / "seed_1" / "critic_free_h8.json"
    summary = json.loads(older.read_text())
    del summary["methods"]["oracle_rm_rloo"]
    older.write_text(json.dumps(summary))
    run(again, fresh)
    made = {p.name for p in fresh.iterdir() if (p / "done.json").exists()}
    assert {"sft", "reward_model", "dpo", "ppo_ppo", "ppo_rto", "ppo_rloo", "ppo_rto_rloo", "ppo_oracle_rm_rloo"} <= made
    assert not made & {"dpo_24_pairs", "ppo_oracle_dense", "ppo_ppo_kl_0.2"}, made  # the committed cells' own
    assert not (fresh / "horizon_12").exists()
    # The same seed, code and machine: the retrained cell is the one the study made (rows, not bits, on
    # another machine); it compares with this workdir's PPO and RTO runs, not the committed cell's.
    remade = json.loads((committed / "seed_1" / "critic_free_h8.json").read_text())
    original = _summary(workdir, 1, "critic_free_h8")
    for method in CRITIC_FREE_CELL:
        assert remade["methods"][method]["gold_reward"] == pytest.approx(original["methods"][method]["gold_reward"])
    assert "shared_from" not in remade["methods"]["ppo"] and remade["methods"]["ppo"]["stage"] == "ppo_ppo"
    for name, text in kept.items():  # the committed cells' summaries are untouched
        if name != "critic_free_h8.json":
            assert (committed / "seed_1" / name).read_text() == text, name


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
    # Each DPO-data cell's DPO policy is the one its own gold evaluation measured.
    fewer_gold = json.loads((seed / "gold_eval_dpo_24_pairs" / "done.json").read_text())["dpo_24"]["gold_reward"]
    assert _summary(workdir, 1, "dpo_24_pairs")["references"]["dpo_gold"] == fewer_gold
    assert fewer_gold != _summary(workdir, 1, "horizon_8")["references"]["dpo_gold"]
    cells = results["cells"]
    for cell in ("dpo_24_pairs", "dpo_96_pairs"):  # only RTO reads the DPO model: the others are the center's runs
        for method in METHODS - {"rto"}:
            assert cells[cell]["methods"][method]["gold_per_seed"] == cells["horizon_8"]["methods"][method]["gold_per_seed"]
            assert cells[cell]["methods"][method]["shared_from"] == "horizon_8"
    # RTO reads its cell's DPO model: the same first rollout (common random numbers), another DPO part.
    center, fewer = _first_train_record(seed, "ppo_rto"), _first_train_record(seed, "ppo_rto_dpo_24_pairs")
    assert center["response_length"] == fewer["response_length"]
    assert center["reward/dpo"] != pytest.approx(fewer["reward/dpo"], rel=1e-3)


def test_the_kl_cell_sets_both_methods_coefficient(study):
    _, workdir, results = study
    cell = results["cells"]["beta_kl_0.2"]
    assert {m: v["reward_args"]["beta_kl"] for m, v in cell["methods"].items()} == dict.fromkeys(METHODS, 0.2)
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
    for method in METHODS:
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
    summaries = sorted((workdir / "summaries").glob("*/*.json"))
    written = [p.read_text() for p in summaries]
    before = [len(read_metrics(p)) for p in logs]
    again = run(config, workdir)
    assert [len(read_metrics(p)) for p in logs] == before
    assert json.dumps(again["cells"], sort_keys=True) == json.dumps(results["cells"], sort_keys=True)
    assert [p.read_text() for p in summaries] == written


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


def test_the_committed_summaries_match_the_study_design_as_it_is_now():
    """A new config key or a changed default voids every committed cell (their design fingerprint no
    longer matches), and the next session would silently rerun hours of the study: it must be a choice."""
    recipe = load_recipe("experiments/synthetic_study.py")
    config = _config("study")
    d = recipe.design(config)
    at = lambda h: config if h == d.center else recipe.horizon_config(config, h, d.reward_pairs)
    fingerprints = {h: recipe._design_hash(at(h)) for h in d.horizons}
    committed = sorted(Path(d.summaries).glob("seed_*/*.json"))
    assert len(committed) >= 25, committed  # horizon 8's five cells, seeds 1-5
    for path in committed:
        summary = json.loads(path.read_text())
        assert summary["design"] == recipe._design_hash(at(summary["horizon"]), summary["cell"]), path
        if not summary["cell"].startswith("critic_free_"):
            assert summary["design"] == fingerprints[summary["horizon"]], path
    # The critic-free methods' tuned values are in their cells' fingerprint only.
    assert recipe._design_hash(config, "critic_free_h8") != fingerprints[d.center]
    changed = config.copy_and_resolve_references()
    with changed.unlocked():
        changed.ppo.per_method = changed.ppo.per_method.replace("rloo:beta_kl=0.05", "rloo:beta_kl=0.1")
    assert recipe._design_hash(changed) == fingerprints[d.center]
    assert recipe._design_hash(changed, "critic_free_h8") != recipe._design_hash(config, "critic_free_h8")
    # A key added since, at the value that reproduces the committed runs, is left out; any other value is not.
    for key, same, other in (("estimator", "gae", "rloo"), ("samples_per_prompt", 1, 4)):
        changed = config.copy_and_resolve_references()
        with changed.unlocked():
            changed.ppo[key] = same
            assert recipe._design_hash(changed) == fingerprints[d.center]
            changed.ppo[key] = other
            assert recipe._design_hash(changed) != fingerprints[d.center]


@pytest.mark.parametrize(
    "key,value,message",
    [
        ("seeds", "1,1000", "the tuning seed 1000"),
        ("study.horizons", "32,96", "must hold the center task's target_length 8"),
        ("study.dpo_pairs", "1024,16384", "must hold study.reward_pairs (4096)"),
        ("synthetic.preference_pairs", 4096, "fewer than the largest of study.dpo_pairs"),
        ("ppo.per_method", "ppo:beta_kl=0.05", "give rto's tuned values"),
        ("study.beta_kl", "0.1,-1", "distinct positive numbers"),
        ("study.beta_dpo_horizons", "32,48", "must be among study.horizons"),
        ("study.wide_clip", -1.0, "expected >= 0"),
        ("study.critic_free_horizons", "12", "must be among study.horizons"),
        ("ppo.per_method", "ppo:beta_kl=0.05;rto:beta_kl=0.05", "give rloo's tuned values"),
    ],
)
def test_a_bad_design_is_refused_before_any_work(key, value, message):
    config = _config("study")
    with config.unlocked():
        section, _, name = key.rpartition(".")
        (config[section] if section else config)[name] = value
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        validate(config)
