"""The study's across-seed report (experiments/synthetic_study_report.py) from hand-made summaries:
textbook intervals, paired differences, cells with different numbers of seeds, refused mixes of
designs and malformed files, episodes to reach PPO's final gold, and the one-command CLI. No training."""

import json
import subprocess
import sys

import numpy as np
import pytest
from scipy import stats

from experiments import synthetic_study_report as study_report
from rto_jax.errors import ConfigError

METHODS = ("ppo", "rto", "oracle_dense", "oracle_rm")


def summary(cell, seed, finals, *, curves=None, sft=0.0, design="design-h8", horizon=8, shared=(), credit=None):
    """A summary as experiments/synthetic_study.py writes it (docs/results/synthetic_study.md#design-fixed-before-the-runs):
    finals {method: final gold}; curves {method: [[episodes, gold, kl], ...]} (default: pi_sft, halfway, final)."""
    methods = {}
    for m, final in finals.items():
        curve = (curves or {}).get(m) or [[0, sft, 0.0], [100, (sft + final) / 2, 1.0], [200, final, 2.0]]
        methods[m] = {
            "stage": f"ppo_{m}",
            "gold_reward": final,
            "kl_to_ref": curve[-1][2] + seed,
            "reward_args": {"beta_kl": 0.05},
            "curve": curve,
            "parts": {"kl": -0.4, "score": 1.3},
            "credit_curve": [
                {"episodes": 100, "dpo_token": 0.1 * seed, "dpo_response": 0.2, "score_response": 0.3},
                {"episodes": 200, "dpo_token": 0.2 * seed, "dpo_response": None, "score_response": 0.5},
            ],
        } | ({"shared_from": "horizon_8"} if m in shared else {})
    return {
        "cell": cell,
        "seed": seed,
        "horizon": horizon,
        "dpo_pairs": 4096,
        "varies": {},
        "design": design,
        "methods": methods,
        "references": {
            "sft_gold": sft,
            "dpo_gold": sft + 0.01 * seed,
            "best_of_n": [{"n": 1, "kl": 0.0, "gold_reward": sft}, {"n": 4, "kl": 0.64, "gold_reward": sft + 0.1}],
            "reward_accuracy": 0.6,
            "label_agreement": 0.7,
        },
        "credit": credit or {"dpo_token": 0.1, "dpo_quality": 0.2, "dpo_response": 0.3, "score_response": 0.4},
    }


def write(folder, s):
    path = folder / f"seed_{s['seed']}" / f"{s['cell']}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(s))
    return path


def textbook(xs):
    xs = np.asarray(xs, np.float64)
    half = stats.t.ppf(0.975, len(xs) - 1) * xs.std(ddof=1) / np.sqrt(len(xs))
    return xs.mean() - half, xs.mean() + half


def test_intervals_are_textbook_and_differences_paired_seed_by_seed(tmp_path):
    # RTO is PPO plus a small seed-dependent gain: paired, the interval is narrow and above 0;
    # unpaired (or against other seeds' PPO) it would be wide and contain 0.
    ppo = [0.10, 0.30, 0.05, 0.22]
    rto = [p + g for p, g in zip(ppo, (0.010, 0.014, 0.012, 0.009))]
    dense = [0.40, 0.10, 0.35, 0.20]
    rows = [
        summary("horizon_8", s, {"ppo": p, "rto": r, "oracle_dense": d, "oracle_rm": p}, credit={
            "dpo_token": t, "dpo_quality": 0.2, "dpo_response": 0.3, "score_response": 0.4})
        for s, p, r, d, t in zip((1, 2, 3, 4), ppo, rto, dense, (0.1, None, 0.3, 0.2))
    ]  # fmt: skip
    cell = study_report.aggregate_summaries(rows, tmp_path)["cells"]["horizon_8"]
    gold = cell["methods"]["rto"]["gold_reward"]
    assert (gold["mean"], gold["n"]) == (pytest.approx(np.mean(rto)), 4)
    assert (gold["low"], gold["high"]) == pytest.approx(textbook(rto))
    diff = cell["methods"]["rto"]["minus_ppo"]
    assert (diff["low"], diff["high"]) == pytest.approx(textbook(np.subtract(rto, ppo)))
    assert diff["low"] > 0 and diff["wins"] == 4
    assert cell["methods"]["oracle_dense"]["minus_ppo"]["per_seed"] == pytest.approx(np.subtract(dense, ppo))
    assert cell["methods"]["oracle_dense"]["minus_ppo"]["wins"] == 2
    # Along training too, each point's difference is paired (halfway: (rto - ppo) / 2).
    halfway = cell["methods"]["rto"]["minus_ppo_curve"][1]
    assert (halfway["episodes"], halfway["mean"]) == (100, pytest.approx(np.mean(np.subtract(rto, ppo)) / 2))
    assert (halfway["low"], halfway["high"]) == pytest.approx(textbook(np.subtract(rto, ppo) / 2))
    # Credit on pi_sft's samples: the null seed skipped and counted.
    credit = cell["credit"]["dpo_token"]
    assert (credit["n"], credit["skipped"], credit["mean"]) == (3, 1, pytest.approx(0.2))
    assert (credit["low"], credit["high"]) == pytest.approx(textbook([0.1, 0.3, 0.2]))
    # Along training: the RTO run's first and last evaluation (the last per-response value is null in every seed).
    assert cell["methods"]["rto"]["credit_dpo_token"]["last"]["mean"] == pytest.approx(0.2 * 2.5)
    last = cell["methods"]["rto"]["credit_dpo_response"]["last"]
    assert (last["n"], last["skipped"]) == (0, 4) and np.isnan(last["mean"])
    assert "0.20 [" in (tmp_path / "results.md").read_text() and "(1 null)" in (tmp_path / "results.md").read_text()


def test_cells_with_different_numbers_of_seeds_each_state_their_n(tmp_path):
    finals = dict.fromkeys(METHODS, 0.2)
    rows = [summary("horizon_8", s, finals | {"rto": 0.2 + 0.01 * s}) for s in (1, 2, 3, 4, 5)]
    rows += [summary("horizon_96", s, finals, design="design-h96", horizon=96) for s in (1, 2)]
    rows += [summary("horizon_32", 3, finals | {"rto": 0.25}, design="design-h32", horizon=32)]
    results = study_report.aggregate_summaries(rows, tmp_path)
    cells = results["cells"]
    assert [cells[c]["n"] for c in ("horizon_8", "horizon_32", "horizon_96")] == [5, 1, 2]
    assert cells["horizon_96"]["methods"]["rto"]["gold_reward"]["n"] == 2 and cells["horizon_96"]["seeds"] == [1, 2]
    table = (tmp_path / "results.md").read_text().splitlines()
    one_seed = next(line for line in table if line.startswith("| horizon_32 | 32 |"))
    # One seed: the means without an interval, and n stated.
    assert "| 1 |" in one_seed and "0.250 |" in one_seed and "[" not in one_seed and "+0.050 (1/1)" in one_seed
    assert "| 5 |" in next(line for line in table if line.startswith("| horizon_8 | 8 |"))
    assert json.loads((tmp_path / "results.json").read_text())["cells"]["horizon_32"]["sft_gold"]["low"] is None


def test_a_cell_mixing_designs_is_refused_naming_the_files(tmp_path):
    finals = dict.fromkeys(METHODS, 0.2)
    for s, design in ((1, "a"), (2, "a"), (3, "b")):
        write(tmp_path, summary("horizon_8", s, finals, design=design))
    write(tmp_path, summary("horizon_32", 1, finals, design="c", horizon=32))  # another cell's design may differ
    with pytest.raises(ConfigError) as error:
        study_report.aggregate_summaries(study_report.load_summaries(tmp_path), tmp_path / "out")
    message = str(error.value)
    assert "seed_3/horizon_8.json" in message and "seed_1/horizon_8.json" in message and "seed_2/" not in message
    assert not (tmp_path / "out").exists()  # nothing half-written
    (tmp_path / "seed_3" / "horizon_8.json").unlink()
    assert study_report.aggregate_summaries(study_report.load_summaries(tmp_path), tmp_path / "out")["cells"]


@pytest.mark.parametrize(
    "break_it, says",
    [
        (lambda text, s: text[:-5], "unreadable JSON"),
        (lambda text, s: json.dumps({**s, "methods": {**s["methods"], "rto": {"curve": []}}}), "'gold_reward'"),
        (lambda text, s: json.dumps({**s, "seed": 7}), "not what its path says"),
        (lambda text, s: json.dumps(s["methods"]["ppo"]["curve"]), "not a JSON object"),
    ],
)
def test_a_malformed_summary_is_one_config_error_naming_the_file(tmp_path, break_it, says):
    finals = dict.fromkeys(METHODS, 0.2)
    write(tmp_path, summary("horizon_8", 1, finals))
    s = summary("horizon_8", 2, finals)
    path = write(tmp_path, s)
    path.write_text(break_it(path.read_text(), s))
    with pytest.raises(ConfigError) as error:
        study_report.load_summaries(tmp_path)
    assert str(path) in str(error.value) and says in str(error.value) and "\n" not in str(error.value)


def test_episodes_to_reach_ppos_final_interpolate_count_never_and_leave_out_ppo_below_sft(tmp_path):
    def curves(ppo, rto):
        return {"ppo": [[e, g, 0.0] for e, g in zip((0, 100, 200), ppo)],
                "rto": [[e, g, 0.0] for e, g in zip((0, 100, 200), rto)]}  # fmt: skip

    rows = [
        # PPO reaches its final 0.4 at 200; RTO at 100 + 100 * (0.4 - 0.3) / (0.5 - 0.3) = 150: ratio 0.75.
        summary("horizon_8", 1, {"ppo": 0.4, "rto": 0.5}, curves=curves((0, 0.2, 0.4), (0, 0.3, 0.5))),
        # RTO never gets to PPO's 0.4.
        summary("horizon_8", 2, {"ppo": 0.4, "rto": 0.3}, curves=curves((0, 0.2, 0.4), (0, 0.2, 0.3))),
        # PPO's final (0.05) below pi_sft's (0.1): left out of the ratios (every curve starts at it).
        summary("horizon_8", 3, {"ppo": 0.05, "rto": 0.2}, sft=0.1, curves=curves((0.1, 0.0, 0.05), (0.1, 0.2, 0.2))),
        # RTO at 0 + 100 * 0.4 / 0.8 = 50, PPO at 100 + 100 * (0.4 - 0.3) / (0.4 - 0.3) = 200: ratio 0.25.
        summary("horizon_8", 4, {"ppo": 0.4, "rto": 0.8}, curves=curves((0, 0.3, 0.4), (0, 0.8, 0.8))),
    ]
    cell = study_report.aggregate_summaries(rows, tmp_path)["cells"]["horizon_8"]
    reach = cell["methods"]["rto"]["reach"]
    assert reach["episodes_per_seed"] == pytest.approx([150, None, 0, 50])
    assert (reach["reached"], reach["median"]) == (3, 50)
    ratio = reach["ratio_to_ppo"]
    assert (ratio["n"], ratio["never"], ratio["excluded_seeds"]) == (2, 1, [3])
    logs = np.log([0.75, 0.25])
    assert ratio["mean"] == pytest.approx(np.exp(logs.mean()))
    assert (ratio["low"], ratio["high"]) == pytest.approx(np.exp(textbook(logs)))
    assert cell["methods"]["ppo"]["reach"]["ratio_to_ppo"]["mean"] == pytest.approx(1.0)
    # Half of PPO's final gain (0.2 on seeds 1, 2, 4): RTO at 66.7, 100 and 25 episodes, PPO at 100, 100, 66.7.
    half = {m: next(p for p in cell["methods"][m]["reach_fractions"] if p["fraction"] == 0.5) for m in ("ppo", "rto")}
    assert (half["rto"]["median"], half["rto"]["seeds"], half["ppo"]["median"]) == (pytest.approx(200 / 3), 3, 100)
    # The whole gain: RTO's median over [150, never, 50] is 150 ("never" above every number).
    assert cell["methods"]["rto"]["reach_fractions"][-1]["median"] == pytest.approx(150)
    assert "0.43 [" in (tmp_path / "results.md").read_text()  # geometric mean of 0.75 and 0.25


def test_results_md_has_every_cell_in_study_order_and_every_method(tmp_path):
    finals = dict.fromkeys(METHODS, 0.2)
    cells = {"beta_dpo_0.5_h32": 32, "beta_kl_0.2": 8, "dpo_16384_pairs": 8, "horizon_32": 32, "beta_kl_0.01": 8,
             "beta_dpo_0.2_h32": 32, "dpo_1024_pairs": 8, "horizon_8": 8, "beta_dpo_0.2_h96": 96,
             "horizon_96": 96}  # fmt: skip
    shared = {"dpo_1024_pairs": ("ppo", "oracle_dense", "oracle_rm"), "dpo_16384_pairs": ("ppo",)}
    rows = [summary(c, s, finals, horizon=h, shared=shared.get(c, ())) for c, h in cells.items() for s in (1, 2)]
    critic_free = {"ppo": 0.2, "rto": 0.2, "rloo": 0.1, "rto_rloo": 0.15}  # the critic-free cells' methods, by horizon
    rows += [summary(f"critic_free_h{h}", s, critic_free, horizon=h) for h in (32, 8) for s in (1, 2)]
    study_report.aggregate_summaries(rows, tmp_path)
    table = (tmp_path / "results.md").read_text()
    order = ["horizon_8", "horizon_32", "horizon_96", "dpo_1024_pairs", "dpo_16384_pairs", "beta_kl_0.01",
             "beta_kl_0.2", "beta_dpo_0.2_h32", "beta_dpo_0.5_h32", "beta_dpo_0.2_h96", "critic_free_h8",
             "critic_free_h32"]  # fmt: skip
    gold_table = table.split("## Token credit")[0]
    assert [line.split(" | ")[0].removeprefix("| ") for line in gold_table.strip().splitlines()[6:]] == order
    for section in table.split("\n## ")[1:]:  # every table has every cell
        assert all(f"| {c} |" in section for c in order), section[:40]
    header = gold_table.splitlines()[4]
    assert all(f" {m} |" in header for m in METHODS) and all(f"{m} - ppo (wins)" in header for m in METHODS[1:])
    assert gold_table.count("(horizon_8's run)") == 4
    # RTO's reward under RLOO against PPO's reward under RLOO, where a cell has both; "-" elsewhere.
    column = header.split(" | ").index("rto_rloo - rloo (wins)")
    rows_by_cell = {line.split(" | ")[0].removeprefix("| "): line.split(" | ") for line in gold_table.splitlines()[6:]}
    assert rows_by_cell["critic_free_h8"][column] == "+0.050 [+0.050, +0.050] (2/2)"
    assert rows_by_cell["horizon_8"][column] == "-"
    assert json.loads((tmp_path / "results.json").read_text())["cell_order"] == order
    for figure in study_report.FIGURES:
        assert (tmp_path / figure).stat().st_size > 0


def test_cli_regenerates_the_report_and_refuses_a_bad_folder_in_one_line(tmp_path):
    finals = dict.fromkeys(METHODS, 0.2)
    for s in (1, 2):
        write(tmp_path / "summaries", summary("horizon_8", s, finals | {"rto": 0.2 + 0.01 * s}))
        write(tmp_path / "summaries", summary("beta_kl_0.2", s, finals | {"ppo": 0.1}))
    out = tmp_path / "report"
    assert study_report.main([str(tmp_path / "summaries"), f"--out={out}"]) == 0
    assert "| beta_kl_0.2 |" in (out / "results.md").read_text()
    for figure in study_report.FIGURES:
        assert (out / figure).stat().st_size > 0
    command = [sys.executable, "-m", "experiments.synthetic_study_report", str(tmp_path / "nothing"), f"--out={out}2"]
    done = subprocess.run(command, capture_output=True, text=True, cwd=study_report.__file__.rsplit("/", 2)[0])
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "nothing" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "report2").exists()
    make = subprocess.run(["make", "-n", "study-report"], capture_output=True, text=True,
                          cwd=study_report.__file__.rsplit("/", 2)[0])  # fmt: skip
    assert ("-m experiments.synthetic_study_report docs/results/synthetic_study/summaries "
            "--out=docs/results/synthetic_study") in make.stdout  # fmt: skip
