"""The RTO-vs-PPO study's across-seed report, from the per (seed, cell) summaries that
experiments/synthetic_study.py commits (one JSON per seed and cell under docs/results/synthetic_study/summaries):

    python -m experiments.synthetic_study_report SUMMARIES_DIR --out=OUT_DIR     (make study-report)

writes OUT_DIR/results.json, results.md and the figures study_gold_vs_episodes.png,
study_minus_ppo.png, study_gold_vs_kl.png and study_episodes_to_reach.png. Every number comes from
the summaries alone, so the page regenerates without any run. results.md holds, per cell:

  gold      the final policy's held-out gold reward per method (mean, 95% t-interval over the cell's
            seeds), the paired difference to PPO seed by seed with wins k/n (the critic-free
            methods' also to RLOO), and the KL means
  credit    how DPO's token credit and the reward model's score correlate with the gold credit, on
            pi_sft's samples and at the first and last evaluation of the RTO / PPO runs
  reach     episodes to first reach the same seed's PPO final gold (the paper's "1/8 of the data")
  per seed  every method's final gold per seed, to check the intervals by hand

Cells may have different numbers of seeds (each row states its n); a cell with one seed has means
and no intervals. Summaries of one cell with different design fingerprints are refused: a study
must not silently mix designs.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections import Counter
from pathlib import Path

import numpy as np

from rto_jax.errors import ConfigError, UserError
from rto_jax.eval import plots
from rto_jax.eval.report import mean_ci, paired_difference
from rto_jax.eval.rollout_eval import episodes_to_reach

BASELINE = "ppo"
METHOD_ORDER = ("ppo", "rto", "oracle_dense", "oracle_rm", "rloo", "rto_rloo", "oracle_dense_rloo", "oracle_rm_rloo")
# Any other method follows, by name. The critic-free methods are also compared with PPO's reward under
# the same estimator (the critic_free cells), seed by seed as every difference.
SAME_ESTIMATOR_BASELINE = {"rto_rloo": "rloo", "oracle_dense_rloo": "rloo", "oracle_rm_rloo": "rloo"}
REACH_FRACTIONS = (0.25, 0.5, 0.75, 1.0)  # of PPO's final gain over pi_sft (the reach figure)
PAPER_DATA_FRACTION = 1 / 8  # the paper: RTO reaches PPO's level with 1/8 of the data
CREDIT_KEYS = ("dpo_token", "dpo_quality", "dpo_response", "score_response")  # summary["credit"]
TRAINING_CREDIT = {"rto": ("dpo_token", "dpo_response"), "ppo": ("score_response",)}  # along credit_curve
# horizons, then DPO data, then KL coefficients, then DPO weights (grouped by horizon), each by value,
# then the critic-free cells by horizon.
_CELL_PATTERNS = (
    r"horizon_(\d+)",
    r"dpo_(\d+)_pairs",
    r"beta_kl_([0-9.e+-]+)",
    r"beta_dpo_([0-9.e+-]+)_h(\d+)",
    r"critic_free_h(\d+)",
)
FIGURES = ("study_gold_vs_episodes.png", "study_minus_ppo.png", "study_gold_vs_kl.png", "study_episodes_to_reach.png")


def _bad(where, what: str) -> ConfigError:
    return ConfigError("study.summaries", f"{where}: {what}")


def _file(summary: dict) -> str:
    return summary.get("_file", f"seed_{summary['seed']}/{summary['cell']}.json")


def _cell_order(name: str) -> tuple:
    for rank, pattern in enumerate(_CELL_PATTERNS):
        match = re.fullmatch(pattern, name)
        if match:  # beta_dpo_<b>_h<H>: by H, then b
            return (rank, *(float(v) for v in reversed(match.groups())))
    return (len(_CELL_PATTERNS), name)


# ----------------------------------------------------------------------------------------------
# Reading.


def _check(summary, path: Path) -> None:
    """Raises ConfigError naming `path` unless `summary` has what the report reads."""
    try:
        if summary["cell"] != path.stem or int(summary["seed"]) != int(path.parent.name.removeprefix("seed_")):
            raise ValueError(f"says cell {summary['cell']!r}, seed {summary['seed']!r}: not what its path says")
        summary["design"], summary["credit"].items()
        float(summary["references"]["sft_gold"]), float(summary["references"]["dpo_gold"])
        [(int(p["n"]), float(p["kl"]), float(p["gold_reward"])) for p in summary["references"]["best_of_n"]]
        if BASELINE not in summary["methods"]:
            raise ValueError(f"no {BASELINE!r} method: every cell's differences are to it")
        for method, run in summary["methods"].items():
            float(run["gold_reward"]), float(run["kl_to_ref"]), run["reward_args"].items(), run["parts"].items()
            if not run["curve"] or any(len(p) != 3 or not all(np.isfinite(p)) for p in run["curve"]):
                raise ValueError(f"methods.{method}.curve: expected [[episodes, gold, kl], ...] from pi_sft")
            [p["episodes"] for p in run["credit_curve"]]
    except KeyError as e:
        raise _bad(path, f"not a study summary: missing key {e}") from None
    except (TypeError, ValueError, AttributeError) as e:
        raise _bad(path, f"not a study summary: {e}") from None


def load_summaries(folder) -> list[dict]:
    """Every seed_*/<cell>.json under `folder`, checked, sorted by cell (_cell_order) then seed; each
    with "_file" (its path) so that errors name it."""
    folder = Path(folder)
    if not folder.is_dir():
        raise _bad(folder, "no such folder of study summaries")
    paths = sorted(folder.glob("seed_*/*.json"))
    if not paths:
        raise _bad(folder, "no study summaries (seed_<S>/<cell>.json) in it")
    summaries = []
    for path in paths:
        try:
            summary = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise _bad(path, f"unreadable JSON ({e})") from None
        if not isinstance(summary, dict):
            raise _bad(path, "not a study summary: not a JSON object")
        _check(summary, path)
        summaries.append({**summary, "_file": str(path)})
    return sorted(summaries, key=lambda s: (_cell_order(s["cell"]), int(s["seed"])))


def _check_cell(name: str, rows: list[dict]) -> list[str]:
    """The cell's methods; refuses designs that differ from the majority's, and summaries whose
    methods or evaluation episodes differ (their seeds could not be paired point by point)."""
    designs = [json.dumps(r["design"], sort_keys=True) for r in rows]
    majority, count = Counter(designs).most_common(1)[0]  # a tie: the lowest seed's design
    odd = [_file(r) for r, d in zip(rows, designs) if d != majority]
    if odd:
        usual = _file(rows[designs.index(majority)])
        raise _bad(name, f"the design of {', '.join(odd)} differs from {usual}'s (and {count - 1} more): "
                         "a study must not mix designs; move the stale summaries away")  # fmt: skip
    methods = list(rows[0]["methods"])
    episodes = [p[0] for p in rows[0]["methods"][BASELINE]["curve"]]
    for r in rows:
        if set(r["methods"]) != set(methods):
            raise _bad(name, f"{_file(r)} has methods {sorted(r['methods'])}, {_file(rows[0])} {sorted(methods)}")
        for method, run in r["methods"].items():
            if [p[0] for p in run["curve"]] != episodes:
                raise _bad(name, f"{_file(r)}: {method}'s curve is evaluated at other episodes than {_file(rows[0])}")
    known = [m for m in METHOD_ORDER if m in methods]
    return known + sorted(set(methods) - set(known))


# ----------------------------------------------------------------------------------------------
# Statistics.


def _ci_of_finite(values) -> dict:
    """mean_ci over the values that are numbers (None / NaN: a correlation undefined for a constant
    part), with how many were skipped."""
    kept = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    nan = float("nan")
    out = mean_ci(kept) if kept else {"mean": nan, "low": nan, "high": nan, "n": 0}
    return {**out, "skipped": len(values) - len(kept)}


def _log_ratio_ci(ratios: list[float]) -> dict:
    """Geometric mean of per-seed episode ratios with a 95% t-interval computed on log ratios: a
    ratio is multiplicative (1/8 and 8 are equally far from 1), and its logs are closer to the
    symmetric spread a t-interval assumes. Seeds that never reached are not ratios: counted apart."""
    if not ratios:
        return {"mean": None, "low": None, "high": None, "n": 0}
    logs = mean_ci(np.log(ratios))  # one seed: no interval (nan)
    back = {k: math.exp(logs[k]) if math.isfinite(logs[k]) else None for k in ("mean", "low", "high")}
    return back | {"n": len(ratios)}


def _reach(rows: list[dict], method: str) -> dict:
    """Episodes at which `method` first reaches the same seed's PPO final gold (linear interpolation
    between evaluations). Ratios to PPO's own episodes leave out the seeds where PPO's final is no
    better than pi_sft's (every method "reaches" it at 0 episodes). PPO's own curve may end below its
    final evaluation (another sample of the same policy): it reached its final by its last point."""
    per_seed, ratios, never, excluded = [], [], 0, []
    for r in rows:
        target, sft = r["methods"][BASELINE]["gold_reward"], r["references"]["sft_gold"]
        mine = episodes_to_reach([p[:2] for p in r["methods"][method]["curve"]], target)
        per_seed.append(mine)
        if target <= sft:
            excluded.append(r["seed"])
        elif mine is None:
            never += 1
        else:
            ppo_curve = r["methods"][BASELINE]["curve"]
            ratios.append(mine / (episodes_to_reach([p[:2] for p in ppo_curve], target) or ppo_curve[-1][0]))
    reached = [x for x in per_seed if x is not None]
    return {
        "episodes_per_seed": per_seed,
        "reached": len(reached),
        "median": float(np.median(reached)) if reached else None,
        "ratio_to_ppo": _log_ratio_ci(ratios) | {"never": never, "excluded_seeds": excluded},
    }


def _reach_fractions(rows: list[dict], method: str) -> list[dict]:
    """Per fraction f of PPO's final gain over pi_sft: the median over seeds (where PPO gained) of the
    episodes to reach pi_sft + f * gain, "never" counted as above every number (None if the median is)."""
    gains = [(r, r["references"]["sft_gold"], r["methods"][BASELINE]["gold_reward"]) for r in rows]
    out = []
    for f in REACH_FRACTIONS:
        found = [
            episodes_to_reach([p[:2] for p in r["methods"][method]["curve"]], sft + f * (final - sft))
            for r, sft, final in gains
            if final > sft
        ]
        median = float(np.median([np.inf if x is None else x for x in found])) if found else np.inf
        out.append({"fraction": f, "median": None if np.isinf(median) else median, "seeds": len(found)})
    return out


def _method(rows: list[dict], method: str) -> dict:
    runs = [r["methods"][method] for r in rows]
    curves = np.array([run["curve"] for run in runs], np.float64)  # [seeds, points, (episodes, gold, kl)]
    gold, ppo_gold = [run["gold_reward"] for run in runs], [r["methods"][BASELINE]["gold_reward"] for r in rows]
    out = {
        "gold_reward": mean_ci(gold),
        "kl_to_ref": mean_ci([run["kl_to_ref"] for run in runs]),
        "gold_per_seed": gold,
        "shared_from": runs[0].get("shared_from"),
        "reward_args": runs[0]["reward_args"],
        "parts": {k: float(np.mean([run["parts"].get(k, np.nan) for run in runs])) for k in runs[0]["parts"]},
        "curve": [
            {"episodes": float(curves[0, i, 0]), "gold": mean_ci(curves[:, i, 1]), "kl": float(curves[:, i, 2].mean())}
            for i in range(curves.shape[1])
        ],
        "reach": _reach(rows, method),
        "reach_fractions": _reach_fractions(rows, method),
    }
    if method != BASELINE:  # the same seed's task, data and evaluation prompts: a paired difference
        ppo_curves = np.array([r["methods"][BASELINE]["curve"] for r in rows], np.float64)
        out[f"minus_{BASELINE}"] = paired_difference(gold, ppo_gold)
        out[f"minus_{BASELINE}_curve"] = [
            {"episodes": float(curves[0, i, 0]), **paired_difference(curves[:, i, 1], ppo_curves[:, i, 1])}
            for i in range(curves.shape[1])
        ]
    twin = SAME_ESTIMATOR_BASELINE.get(method)
    if twin in rows[0]["methods"]:
        out[f"minus_{twin}"] = paired_difference(gold, [r["methods"][twin]["gold_reward"] for r in rows])
    for key in TRAINING_CREDIT.get(method, ()):  # the run's own reward parts vs the gold credit
        points = [run["credit_curve"] for run in runs]
        out[f"credit_{key}"] = {
            "first": _ci_of_finite([c[0].get(key) if c else None for c in points]),
            "last": _ci_of_finite([c[-1].get(key) if c else None for c in points]),
        }
    return out


def _cell(name: str, rows: list[dict]) -> dict:
    rows = sorted(rows, key=lambda r: r["seed"])
    methods = _check_cell(name, rows)
    refs = [r["references"] for r in rows]
    first = rows[0]
    return {
        "horizon": first.get("horizon"),
        "dpo_pairs": first.get("dpo_pairs"),
        "varies": first.get("varies", {}),
        "design": first["design"],
        "n": len(rows),
        "seeds": [r["seed"] for r in rows],
        "files": [_file(r) for r in rows],
        "sft_gold": mean_ci([x["sft_gold"] for x in refs]),
        "dpo_gold": mean_ci([x["dpo_gold"] for x in refs]),
        "sft_gold_per_seed": [x["sft_gold"] for x in refs],
        "dpo_gold_per_seed": [x["dpo_gold"] for x in refs],
        "references": {k: _ci_of_finite([x.get(k) for x in refs]) for k in ("reward_accuracy", "label_agreement")},
        "best_of_n": [
            {"n": p["n"], **{k: float(np.mean([x["best_of_n"][i][k] for x in refs])) for k in ("kl", "gold_reward")}}
            for i, p in enumerate(refs[0]["best_of_n"])
        ],
        "credit": {k: _ci_of_finite([r["credit"].get(k) for r in rows]) for k in CREDIT_KEYS},
        "methods": {m: _method(rows, m) for m in methods},
    }


def aggregate_summaries(summaries: list[dict], out_dir) -> dict:
    """The across-seed results of every summary (`load_summaries`): per cell, in _cell_order; writes
    out_dir/results.json, results.md and the figures (on the main process only) and returns them."""
    if not summaries:
        raise _bad(out_dir, "no study summaries to report")
    by_cell: dict[str, list[dict]] = {}
    for s in summaries:
        by_cell.setdefault(s["cell"], []).append(s)
    cells = {name: _cell(name, by_cell[name]) for name in sorted(by_cell, key=_cell_order)}
    results = {
        "seeds": sorted({int(s["seed"]) for s in summaries}),
        "cell_order": list(cells),  # results.json's keys are written sorted
        "cells": cells,
    }
    from rto_jax.distributed import is_main_process  # (imports jax: only here)
    from rto_jax.pipeline.logging import write_json_atomic

    if is_main_process():
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out_dir / "results.json", _json_safe(results))
        (out_dir / "results.md").write_text(study_tables(results) + "\n")
        write_figures(cells, out_dir)
    return results


def write_figures(cells: dict, out_dir: Path) -> None:
    plots.plot_study_curves(cells, out_dir / FIGURES[0])
    plots.plot_study_differences(cells, out_dir / FIGURES[1], baseline=BASELINE)
    # The KL sweep: the beta_kl cells with the cell at their horizon's tuned KL (the center).
    sweep = [n for n in cells if n.startswith("beta_kl_")]
    if sweep and f"horizon_{cells[sweep[0]]['horizon']}" in cells:
        sweep = [f"horizon_{cells[sweep[0]]['horizon']}", *sweep]
    plots.plot_study_frontier(cells, out_dir / FIGURES[2], sweep)
    plots.plot_study_reach(cells, out_dir / FIGURES[3], baseline=BASELINE, data_fraction=PAPER_DATA_FRACTION)


def _json_safe(value):
    """NaN (an interval of one seed) as null: results.json stays valid JSON."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return None if isinstance(value, float) and not math.isfinite(value) else value


# ----------------------------------------------------------------------------------------------
# Markdown.


def _ci(c: dict, digits: int = 3, sign: str = "") -> str:
    """mean [low, high]; the mean alone where there is no interval (one seed); "-" with no value."""
    if c["n"] == 0 or c["mean"] is None:
        text = "-"
    elif c["n"] < 2 or c["low"] is None or not math.isfinite(c["low"]):
        text = f"{c['mean']:{sign}.{digits}f}"
    else:
        text = f"{c['mean']:{sign}.{digits}f} [{c['low']:{sign}.{digits}f}, {c['high']:{sign}.{digits}f}]"
    return text + (f" ({c['skipped']} null)" if c.get("skipped") else "")


def _line(values) -> str:
    return "| " + " | ".join(str(v) for v in values) + " |"


def _section(title: str, intro: str, header: list[str], rows: list[list]) -> list[str]:
    return ["", f"## {title}", "", intro, "", _line(header), _line("---" for _ in header), *map(_line, rows)]


def study_tables(results: dict) -> str:
    """results.md: the gold, credit, reach and per-seed tables, a row per cell (per cell and seed)."""
    cells = results["cells"]
    methods = list(dict.fromkeys(m for c in cells.values() for m in c["methods"]))
    others = [m for m in methods if m != BASELINE]

    def get(c, m, key):  # a cell may lack a method that came later
        return c["methods"][m][key] if m in c["methods"] else None

    def gold(c, m):
        run = c["methods"].get(m)
        if run is None:
            return "-"
        return _ci(run["gold_reward"]) + (f" ({run['shared_from']}'s run)" if run["shared_from"] else "")

    def diff(c, m, baseline=BASELINE):
        d = get(c, m, f"minus_{baseline}")
        return "-" if d is None else f"{_ci(d, sign='+')} ({d['wins']}/{d['n']})"

    twins = [(m, t) for m, t in SAME_ESTIMATOR_BASELINE.items() if m in methods and t in methods]

    def reach(c, m):
        r = get(c, m, "reach")
        median = "-" if r is None or r["median"] is None else f"{r['median']:.0f}"
        return "-" if r is None else f"{r['reached']}/{c['n']}, {median}"

    def ratio(c, m):
        r = get(c, m, "reach")
        if r is None:
            return "-"
        r = r["ratio_to_ppo"]
        left_out = f", {len(r['excluded_seeds'])} left out" if r["excluded_seeds"] else ""
        return f"{_ci(r, 2)} ({r['n']} seeds; never {r['never']}{left_out})"

    def credit_along(c, m, key):
        point = get(c, m, f"credit_{key}")
        return "-" if point is None else " / ".join(_ci(point[at], 2) for at in ("first", "last"))

    along = [(m, k) for m, keys in TRAINING_CREDIT.items() for k in keys]
    lines = _section(
        "Gold reward of the final policy",
        "Means over the cell's n seeds with 95% t-intervals (one seed: the mean alone); differences are "
        f"paired seed by seed (wins: seeds where the method beat {BASELINE}; the critic-free methods also "
        "against PPO's reward under RLOO); KL to pi_sft means.",
        ["cell", "H", "DPO pairs", "varies", "n", "SFT", "DPO policy", *methods,
         *(f"{m} - {BASELINE} (wins)" for m in others), *(f"{m} - {t} (wins)" for m, t in twins),
         "KL " + " / ".join(methods)],
        [[name, c["horizon"], c["dpo_pairs"], ", ".join(f"{k} {v}" for k, v in c["varies"].items()) or "-", c["n"],
          _ci(c["sft_gold"]), _ci(c["dpo_gold"]), *(gold(c, m) for m in methods), *(diff(c, m) for m in others),
          *(diff(c, m, t) for m, t in twins),
          " / ".join("-" if get(c, m, "kl_to_ref") is None else f"{get(c, m, 'kl_to_ref')['mean']:.1f}"
                     for m in methods)]
         for name, c in cells.items()],
    )  # fmt: skip
    lines += _section(
        "Token credit: correlation with the gold credit",
        "Pearson correlations, means over seeds with 95% t-intervals (null: undefined for a constant part, "
        "skipped and counted). On pi_sft's samples: RTO's DPO term per token vs the gold credit and vs its "
        "quality term, its per-response sum vs r*, the reward model's score vs r*. Along training: the same "
        "in the run's own rollouts at its first / last evaluation.",
        ["cell", "n", "DPO vs gold (token)", "DPO vs quality (token)", "DPO vs r* (response)",
         "RM score vs r* (response)", *(f"{m} run: {k}, first / last" for m, k in along)],
        [[name, c["n"], *(_ci(c["credit"][k], 2) for k in CREDIT_KEYS), *(credit_along(c, m, k) for m, k in along)]
         for name, c in cells.items()],
    )  # fmt: skip
    lines += _section(
        f"Episodes to reach {BASELINE}'s final gold",
        f"Per seed, the episodes at which a method's curve first reaches that seed's {BASELINE} final gold "
        "(linear interpolation between evaluations): seeds that reached it / n, median episodes over them. "
        f"Ratio to {BASELINE}'s own episodes: geometric mean over the seeds that reached it with a 95% "
        f"t-interval on log ratios; never: seeds that did not; seeds where {BASELINE}'s final is no better "
        f"than SFT's are left out of ratios. The paper claims a ratio of {PAPER_DATA_FRACTION:.3g}.",
        ["cell", "n", *(f"{m}: reached, median" for m in methods), *(f"{m} / {BASELINE}" for m in others)],
        [[name, c["n"], *(reach(c, m) for m in methods), *(ratio(c, m) for m in others)] for name, c in cells.items()],
    )  # fmt: skip
    lines += _section(
        "Per seed: gold reward of the final policy",
        "Held-out gold reward of pi_sft, the cell's DPO policy and each method's final policy.",
        ["cell", "seed", "SFT", "DPO policy", *methods],
        [[name, seed, f"{c['sft_gold_per_seed'][i]:.3f}", f"{c['dpo_gold_per_seed'][i]:.3f}",
          *("-" if get(c, m, "gold_per_seed") is None else f"{get(c, m, 'gold_per_seed')[i]:.3f}" for m in methods)]
         for name, c in cells.items() for i, seed in enumerate(c["seeds"])],
    )  # fmt: skip
    return "\n".join(lines[1:])


# ----------------------------------------------------------------------------------------------
# Command line (make study-report).


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message):  # argparse's usage block is not one line
        self.exit(2, f"{self.prog}: {message} (usage: {self.prog} SUMMARIES_DIR --out=OUT_DIR)\n")


def main(argv: list[str] | None = None) -> int:
    parser = _OneLineParser(prog="python -m experiments.synthetic_study_report", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("summaries", help="folder of seed_<S>/<cell>.json summaries")
    parser.add_argument("--out", required=True, help="folder for results.json, results.md and the figures")
    args = parser.parse_args(argv)
    try:
        results = aggregate_summaries(load_summaries(args.summaries), args.out)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cells = results["cells"]
    counts = ", ".join(f"{name} n={cell['n']}" for name, cell in cells.items())
    print(f"{len(cells)} cells ({counts}): results.md, results.json and the figures in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
