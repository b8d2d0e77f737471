"""A method comparison's results: per-method numbers, sample-efficiency curves, the across-seed
aggregate and the markdown table (host-side; no model code).

    methods(policies)                  the evaluation stage's per-policy numbers under the report's names
    gold_curves(records, names, ...)   {method: [(episodes, gold reward), ...]} from metrics.jsonl
    aggregate(per_seed)                means over seeds with standard errors across seeds
    results_table(results)             markdown
    mean_ci(xs), paired_difference(a, b)   means with t-based 95% confidence intervals (the study)
"""

from __future__ import annotations

import numpy as np

from rto_jax.eval.rollout_eval import episodes_to_reach

# evaluation key -> report key
_NAMES = {
    "gold_reward": "gold_reward",
    "gold_reward_se": "gold_reward_se",
    "gold_win_rate_vs_sft": "gold_win_rate_vs_sft",
    "kl_to_ref": "kl",
    "rm_score": "score",
    "length": "length",
    "eos_rate": "eos_rate",
}


def methods(policies: dict[str, dict]) -> dict[str, dict]:
    """{method: {gold_reward, gold_reward_se, gold_win_rate_vs_sft, kl, score, length, eos_rate}}."""
    return {
        name: {new: float(numbers[old]) for old, new in _NAMES.items() if old in numbers}
        for name, numbers in policies.items()
        if name != "reference"
    }


def gold_curves(
    records: list[dict], stages: dict[str, str], episodes_per_step: int, start: float, with_kl: bool = False
) -> dict:
    """{method: [(0, start), (episodes, gold reward), ...]} from the 'eval' records of each method's
    stage (`stages`: {method: stage name}); `start` is pi_sft's gold reward. with_kl: each point is
    (episodes, gold reward, KL to pi_sft), pi_sft's own KL being 0."""
    keys = ("gold_reward", "kl_to_ref") if with_kl else ("gold_reward",)
    curves = {}
    for method, stage in stages.items():
        points = sorted(
            (r["step"] * episodes_per_step, *(r[k] for k in keys))
            for r in records
            if r["stage"] == stage and r["split"] == "eval" and "gold_reward" in r
        )
        first = (0, float(start), 0.0) if with_kl else (0, float(start))
        curves[method] = [first] + [(int(x), *map(float, values)) for x, *values in points]
    return curves


def episodes_to_final(curves: dict[str, list], baseline: str = "ppo") -> dict[str, float | None]:
    """Episodes each method needed to reach the baseline's final gold reward (None: never)."""
    if baseline not in curves:
        return {}
    target = curves[baseline][-1][1]
    return {name: episodes_to_reach(curve, target) for name, curve in curves.items()}


def mean_ci(xs, level: float = 0.95) -> dict:
    """{mean, low, high, n}: the mean of `xs` with its Student-t confidence interval (n - 1 degrees
    of freedom: with 5 seeds the half-width is 2.78 standard errors, not 1.96)."""
    from scipy import stats

    xs = np.asarray(xs, np.float64)
    mean = float(xs.mean())
    if len(xs) < 2:
        return {"mean": mean, "low": float("nan"), "high": float("nan"), "n": len(xs)}
    half = float(stats.t.ppf(0.5 + level / 2, len(xs) - 1)) * _se(xs)
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": len(xs)}


def paired_difference(a, b, level: float = 0.95) -> dict:
    """`a - b` seed by seed (the same seed's task, data and shared models for both): the mean
    difference with its confidence interval, and how many seeds `a` won, tied and lost."""
    diff = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    return {
        **mean_ci(diff, level),
        "per_seed": [float(d) for d in diff],
        "wins": int((diff > 0).sum()),
        "ties": int((diff == 0).sum()),
        "losses": int((diff < 0).sum()),
    }


def _se(xs) -> float:
    return float(np.std(xs, ddof=1) / np.sqrt(len(xs))) if len(xs) > 1 else 0.0


def aggregate(per_seed: list[dict]) -> dict:
    """Across-seed means, with standard errors across seeds (the honest error bar for a method's mean)."""
    out_methods = {}
    for name in per_seed[0]["methods"]:
        rows = [r["methods"][name] for r in per_seed]
        out_methods[name] = {key: float(np.mean([row[key] for row in rows])) for key in rows[0]}
        for key in ("gold_reward", "kl", "score"):
            if key in rows[0]:
                out_methods[name][f"{key}_se"] = _se([row[key] for row in rows])
        out_methods[name]["gold_reward_per_seed"] = [row["gold_reward"] for row in rows]
    curves = {}
    for name in per_seed[0]["curves"]:
        points = np.array([r["curves"][name] for r in per_seed], np.float64)  # [seeds, evals, 2]
        curves[name] = [
            (float(points[0, i, 0]), float(points[:, i, 1].mean()), _se(points[:, i, 1]))
            for i in range(points.shape[1])
        ]
    best_of_n = [
        {
            "n": p["n"],
            "kl": p["kl"],
            "gold_reward": float(np.mean([r["best_of_n"][i]["gold_reward"] for r in per_seed])),
            "gold_reward_se": _se([r["best_of_n"][i]["gold_reward"] for r in per_seed]),
        }
        for i, p in enumerate(per_seed[0]["best_of_n"])
    ]
    reach = {}
    for name in per_seed[0].get("episodes_to_ppo_final", {}):
        values = [r["episodes_to_ppo_final"][name] for r in per_seed]
        reach[name] = None if any(v is None for v in values) else float(np.mean(values))
    return {
        "seeds": [r["seed"] for r in per_seed],
        "methods": out_methods,
        "curves": curves,
        "best_of_n": best_of_n,
        "episodes_to_ppo_final": reach,
        "episodes_to_ppo_final_per_seed": {n: [r["episodes_to_ppo_final"][n] for r in per_seed] for n in reach},
        "per_seed": per_seed,
    }


def results_table(results: dict) -> str:
    """Markdown table of the methods (gold reward with standard error, win rate, KL, ...) and the
    best-of-n frontier."""
    lines = [
        "| method | gold reward | win rate vs SFT | RM score | KL to SFT | length | EOS rate | episodes to PPO's final |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    reach_all = results.get("episodes_to_ppo_final", {})
    for name, m in results["methods"].items():
        reach = "-" if name not in reach_all else ("never" if reach_all[name] is None else f"{reach_all[name]:.0f}")
        lines.append(
            f"| {name} | {m['gold_reward']:.3f} ± {m['gold_reward_se']:.3f} | "
            f"{m.get('gold_win_rate_vs_sft', 0.5):.3f} | {m.get('score', float('nan')):.2f} | "
            f"{m.get('kl', float('nan')):.2f} | {m['length']:.1f} | {m['eos_rate']:.2f} | {reach} |"
        )
    bon = {p["n"]: p for p in results["best_of_n"]}
    lines.append("")
    lines.append(
        "Best-of-n from pi_sft (gold): "
        + ", ".join(f"n={n}: {bon[n]['gold_reward']:.3f} (KL {bon[n]['kl']:.2f})" for n in (1, 4, 16, 64) if n in bon)
    )
    return "\n".join(lines)
