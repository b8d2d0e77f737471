"""Fair tuning on the synthetic task's tuning seed: every method gets the same number of PPO-stage
runs over its own knobs, from one SFT policy, reward model and DPO policy, and is scored by the
gold reward of its final policy on the tuning seed's held-out prompts.

    config.tune.grid = "ppo: beta_kl=0.05|0.2, lr=1e-4|3e-4; rto: beta_dpo=0.05|0.2, beta_kl=0.05|0.2"

is the product of each method's values (keys: lr, critic_lr or a coefficient of its reward; the
rest stay as in config.ppo); the methods must have equally many points. Writes results.json
(`rows`: every run's values, gold reward and KL to pi_sft; `best`: each method's best point) and
results.md, and prints `per_method`, the `--config.ppo.per_method` that freezes the choice for
experiments/synthetic_compare.py on seeds never used here.
"""

from __future__ import annotations

import itertools

from experiments.synthetic_compare import METHODS, shared_models

from rto_jax.distributed import is_main_process
from rto_jax.errors import ConfigError
from rto_jax.objectives.token_rewards import rto
from rto_jax.pipeline import Pipeline, model_path
from rto_jax.pipeline.config import check_method_args, parse_method_values

__all__ = ["METHODS", "grid", "run", "tuning_table", "validate"]  # METHODS: the comparison's, tuned here
TOKEN_REWARD = rto  # the coefficients `config.ppo.reward_args` may hold


def grid(text: str) -> dict[str, list[dict[str, float]]]:
    """'m: k=a|b, j=c; ...' -> {m: [{k: a, j: c}, {k: b, j: c}]} (the product of each method's values)."""
    axes = parse_method_values(text, several=True)
    return {m: [dict(zip(a, point)) for point in itertools.product(*a.values())] for m, a in axes.items()}


def validate(config) -> None:
    try:
        points = grid(config.tune.grid)
    except ValueError as e:
        raise ConfigError("tune.grid", str(e)) from None
    if not points:
        raise ConfigError("tune.grid", "empty: give each method's values, e.g. 'ppo: beta_kl=0.05|0.2; rto: ...'")
    methods = {fn.__name__: fn for fn in METHODS}
    for method, runs in points.items():
        for point in runs:
            check_method_args("tune.grid", methods, {method: point})
    counts = {method: len(runs) for method, runs in points.items()}
    if len(set(counts.values())) > 1:
        raise ConfigError(
            "tune.grid", f"every method needs the same number of runs (a fair budget), got {counts}"
        )  # fmt: skip
    if config.ppo.eval_every <= 0:
        raise ConfigError("ppo.eval_every", "the tuning scores each run's final policy on held-out prompts: set > 0")


def run(pipeline: Pipeline) -> dict:
    config = pipeline.config
    sft, _, reward_model, dpo = shared_models(pipeline)  # the same stages as the comparison's
    models = {"ref": model_path(sft), "dpo": model_path(dpo)}
    fns = {fn.__name__: fn for fn in METHODS}

    rows = []
    for method, points in grid(config.tune.grid).items():
        for i, point in enumerate(points):
            name = f"tune_{method}_{i}"
            result, _ = pipeline.ppo(name, fns[method], models=models, reward=reward_model, values=point)
            held_out = result["held_out"]
            rows.append(
                {
                    "method": method,
                    "run": name,
                    "values": point,
                    "gold_reward": held_out["gold_reward"],
                    "kl_to_ref": held_out["kl_to_ref"],
                }
            )
    best = {}
    for row in rows:
        if row["method"] not in best or row["gold_reward"] > best[row["method"]]["gold_reward"]:
            best[row["method"]] = row
    per_method = ";".join(f"{m}:" + ",".join(f"{k}={v:g}" for k, v in r["values"].items()) for m, r in best.items())
    results = pipeline.results(rows=rows, best=best, per_method=per_method)
    if is_main_process():
        table = tuning_table(rows, best)
        (pipeline.workdir / "results.md").write_text(table + f"\n\nper_method: {per_method}\n")
        print(f"\nTuning on seed {config.seed}\n{table}\n\n--config.ppo.per_method='{per_method}'")
    return results


def tuning_table(rows: list[dict], best: dict) -> str:
    keys = sorted({k for row in rows for k in row["values"]})
    lines = [
        "| method | " + " | ".join(keys) + " | gold reward | KL to SFT |",
        "| --- | " + " | ".join("---" for _ in keys) + " | --- | --- |",
    ]
    for row in rows:
        mark = "**" if best[row["method"]] is row else ""
        cells = [f"{row['values'][k]:g}" if k in row["values"] else "-" for k in keys]
        lines.append(
            f"| {row['method']} | "
            + " | ".join(cells)
            + f" | {mark}{row['gold_reward']:.3f}{mark} | {row['kl_to_ref']:.2f} |"
        )
    return "\n".join(lines)
