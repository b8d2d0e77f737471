"""When does RTO's dense token reward help? PPO and RTO on the synthetic task, each with the values
its fair tuning chose on the tuning seed (config.ppo.per_method), in cells that change one thing at
a time around that tuned setting (the "center"):

  horizon    config.study.horizons: the response length the gold reward prefers. A horizon H scales
             the center task's lengths by H / target_length (`horizon_config`): the gold target
             length, the source's shortest response and mean stopping time, and the response budget
             R; the gold reward keeps its form (quality is a per-token mean with the same weight), so
             token-level credit is as large a share of r* at every H and is split over H tokens.
  DPO data   config.study.dpo_pairs: the DPO policy behind RTO's token reward trained on fewer or
             more labelled pairs (the same number of epochs) than the reward model's
             config.study.reward_pairs. PPO reads no DPO model: these cells share the center's PPO run.
  KL         config.study.beta_kl: both methods at other KL coefficients.

Each seed of config.seeds (the tuning seed is refused) runs every cell through the same stage
functions as any run: the center in seed_N/, another horizon (its own task, so its own SFT, pairs,
reward model and DPO) in seed_N/horizon_H/. Stages are skip-if-done: the same command resumes.
`aggregate` writes results.json, results.md (a row per cell: 95% t-intervals over seeds, the paired
RTO - PPO difference, episodes to reach PPO's final gold reward; then each cell's seeds) and the
figures study_gold_vs_episodes.png, study_rto_minus_ppo.png (the paired difference along training)
and study_gold_vs_kl.png.
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import NamedTuple

import numpy as np

from rto_jax.data.synthetic import SyntheticTaskConfig
from rto_jax.distributed import is_main_process
from rto_jax.errors import ConfigError
from rto_jax.eval import plots, report
from rto_jax.eval.rollout_eval import episodes_to_reach
from rto_jax.objectives.token_rewards import ppo, rto
from rto_jax.pipeline import Pipeline, model_path, stages
from rto_jax.pipeline.config import parse_per_method, parse_seeds
from rto_jax.pipeline.evaluate import run_best_of_n
from rto_jax.pipeline.logging import read_metrics, write_json_atomic
from rto_jax.pipeline.tasks import with_preferences

METHODS = (ppo, rto)
TOKEN_REWARD = rto  # the coefficients `config.ppo.reward_args` may hold


class Design(NamedTuple):  # (a dataclass needs its module in sys.modules; a recipe's is not)
    """The study's cells, from config.study."""

    horizons: tuple[int, ...]  # the center's (synthetic.task.target_length) among them
    center: int
    dpo_pairs: tuple[int, ...]  # reward_pairs among them
    reward_pairs: int
    beta_kl: tuple[float, ...]  # KL coefficients besides each method's own
    tuning_seed: int


def _numbers(key: str, text: str, kind) -> tuple:
    try:
        values = tuple(kind(v) for v in str(text).split(",") if v.strip())
    except ValueError:
        raise ConfigError(key, f"expected comma-separated numbers, got {text!r}") from None
    if not values or min(values) <= 0 or len(set(values)) != len(values):
        raise ConfigError(key, f"expected distinct positive numbers, got {text!r}")
    return values


def design(config) -> Design:
    study = config.get("study")
    if study is None:
        raise ConfigError("study", "experiments/synthetic_study.py needs config.study (configs/rto_synthetic.py:study)")
    return Design(
        horizons=_numbers("study.horizons", study.horizons, int),
        center=config.synthetic.task.target_length,
        dpo_pairs=_numbers("study.dpo_pairs", study.dpo_pairs, int),
        reward_pairs=int(study.reward_pairs),
        beta_kl=_numbers("study.beta_kl", study.beta_kl, float) if str(study.beta_kl).strip() else (),
        tuning_seed=int(study.tuning_seed),
    )


def horizon_config(config, horizon: int, reward_pairs: int):
    """`config` for horizon `horizon`: every length of the center task scaled by horizon /
    target_length (min_response_length, 1 / eos_hazard, max_response_length), and only the
    reward model's pairs labelled (the DPO-data cells run at the center)."""
    task = config.synthetic.task
    scale = horizon / task.target_length
    out = config.copy_and_resolve_references()
    with out.unlocked():
        out.name = f"{config.name}_horizon_{horizon}"
        new = out.synthetic.task
        new.target_length = horizon
        new.min_response_length = max(1, round(task.min_response_length * scale))
        new.eos_hazard = min(1.0, task.eos_hazard / scale)
        new.max_response_length = round(task.max_response_length * scale)
        out.data.max_response_len = new.max_response_length
        out.model.max_position_embeddings = max(
            config.model.max_position_embeddings, new.prompt_length + new.max_response_length
        )
        out.synthetic.preference_pairs = reward_pairs + int(config.data.eval_size)
    return out


def validate(config) -> None:
    d = design(config)
    if d.center not in d.horizons:
        raise ConfigError("study.horizons", f"must hold the center task's target_length {d.center}: {d.horizons}")
    if d.reward_pairs not in d.dpo_pairs:
        raise ConfigError("study.dpo_pairs", f"must hold study.reward_pairs ({d.reward_pairs}): {d.dpo_pairs}")
    if d.tuning_seed in parse_seeds(config.seeds):
        raise ConfigError("seeds", f"the tuning seed {d.tuning_seed} chose the methods' values: it is never evaluated")
    if config.data.eval_size < 1:
        raise ConfigError("data.eval_size", "the study splits the labelled pairs by count: give a number of pairs")
    labelled = config.synthetic.preference_pairs - int(config.data.eval_size)
    if labelled < max(d.dpo_pairs):
        raise ConfigError(
            "synthetic.preference_pairs",
            f"{config.synthetic.preference_pairs} - data.eval_size {config.data.eval_size} = {labelled} training pairs, "
            f"fewer than the largest of study.dpo_pairs ({max(d.dpo_pairs)})",
        )
    if config.ppo.eval_every <= 0:
        raise ConfigError("ppo.eval_every", "the study's curves are the held-out gold reward during PPO: set > 0")
    per_method = parse_per_method(config.ppo.per_method)
    for method in (m.__name__ for m in METHODS):
        if method not in per_method:
            raise ConfigError("ppo.per_method", f"give {method}'s tuned values (docs/results/synthetic.md#fair-tuning)")
    for horizon in d.horizons:
        try:
            SyntheticTaskConfig(**horizon_config(config, horizon, d.reward_pairs).synthetic.task.to_dict())
        except ValueError as e:
            raise ConfigError("study.horizons", f"horizon {horizon}: {e}") from None


def _first_pairs(task, count: int):
    """`task` with only the first `count` training pairs (nested subsets: fewer pairs are a prefix of more)."""
    return dataclasses.replace(task, preference_train={k: v[:count] for k, v in task.preference_train.items()})


def _horizon_cells(p: Pipeline, d: Design, horizon: int) -> tuple[dict, dict]:
    """The cells run at one horizon (all of them at the center) and the horizon's references."""
    config = p.config
    center = horizon == d.center
    per_method = parse_per_method(config.ppo.per_method)
    sft = p.stage("sft", stages.run_sft)
    pairs = p.stage("preferences", stages.run_preferences, sft_path=model_path(sft))
    p.task = with_preferences(p.task, pairs["path"], config.data.eval_size, config.seed)
    reward_model = p.stage(
        "reward_model",
        stages.run_reward_model,
        task=_first_pairs(p.task, d.reward_pairs),
        sft_path=model_path(sft),
    )
    dpo = {}
    for n in d.dpo_pairs if center else (d.reward_pairs,):
        name = "dpo" if n == d.reward_pairs else f"dpo_{n}_pairs"
        dpo[n] = p.stage(
            name, stages.run_dpo, section="dpo", task=_first_pairs(p.task, n), sft_path=model_path(sft), stage=name
        )
    policies = {"sft": model_path(sft)} | {f"dpo_{n}": model_path(r) for n, r in dpo.items()}
    held_out = p.stage(
        "gold_eval", stages.run_gold_eval, section="evaluate", policies=policies, ref_path=model_path(sft)
    )
    frontier = p.stage("best_of_n", run_best_of_n, section="evaluate", sft_path=model_path(sft))

    def train(name: str, fn, dpo_pairs: int = d.reward_pairs, beta_kl: float | None = None) -> dict:
        values = dict(per_method.get(fn.__name__, {}))
        if beta_kl is not None:
            values["beta_kl"] = beta_kl
        models = {"ref": model_path(sft), "dpo": model_path(dpo[dpo_pairs])}
        result, args = p.ppo(name, fn, models=models, reward=reward_model, values=values)
        return {
            "stage": str(Path(p.workdir.name if not center else "") / name),
            "gold_reward": result["held_out"]["gold_reward"],
            "kl_to_ref": result["held_out"]["kl_to_ref"],
            "reward_args": args,
        }

    base = {"ppo": train("ppo_ppo", ppo), "rto": train("ppo_rto", rto)}
    layout = {f"horizon_{horizon}": (base, {"dpo_pairs": d.reward_pairs})}  # cell -> (its runs, what it varies)
    if center:
        for n in d.dpo_pairs:
            if n != d.reward_pairs:  # PPO reads no DPO model: the center's run is its run here
                methods = {"ppo": dict(base["ppo"]), "rto": train(f"ppo_rto_dpo_{n}_pairs", rto, dpo_pairs=n)}
                layout[f"dpo_{n}_pairs"] = (methods, {"dpo_pairs": n})
        for beta in d.beta_kl:
            methods = {m.__name__: train(f"ppo_{m.__name__}_kl_{beta:g}", m, beta_kl=beta) for m in METHODS}
            layout[f"beta_kl_{beta:g}"] = (methods, {"dpo_pairs": d.reward_pairs, "beta_kl": beta})

    # Every run's held-out curve from one read of the metrics, starting at pi_sft's (the same samples' keys).
    records = read_metrics(p.workdir / "metrics.jsonl")
    cells = {}
    for name, (methods, what) in layout.items():
        stage_of = {m: Path(run["stage"]).name for m, run in methods.items()}
        curves = report.gold_curves(
            records, stage_of, config.ppo.rollout_batch_size, held_out["sft"]["gold_reward"], with_kl=True
        )
        ppo_final = methods["ppo"]["gold_reward"]
        for m, run in methods.items():
            run["curve"] = curves[m]
            run["episodes_to_ppo_final"] = episodes_to_reach([(x, g) for x, g, _ in curves[m]], ppo_final)
        cells[name] = {"horizon": horizon, **what, "methods": methods}
    references = {
        "held_out": held_out,
        "best_of_n": frontier["best_of_n"],
        "reward_accuracy": reward_model.get("accuracy"),
        "label_agreement": pairs["label_agreement"],
    }
    return cells, references


def run(pipeline: Pipeline) -> dict:
    d = design(pipeline.config)
    cells, references = {}, {}
    for horizon in d.horizons:
        if horizon == d.center:
            opened = contextlib.nullcontext(pipeline)
        else:
            opened = pipeline.variant(f"horizon_{horizon}", horizon_config(pipeline.config, horizon, d.reward_pairs))
        with opened as p:
            horizon_cells, references[str(horizon)] = _horizon_cells(p, d, horizon)
        cells.update(horizon_cells)
    return pipeline.results(cells=cells, references=references, center=d.center)


# ----------------------------------------------------------------------------------------------
# Across seeds.


def _kl_of(cells: dict):
    return lambda name: cells[name]["methods"]["rto"]["reward_args"].get("beta_kl", 0.0)


def _cell_order(name: str) -> tuple[int, float]:
    """horizons, then DPO data, then KL coefficients, each by its value."""
    kind, value = name.removesuffix("_pairs").rsplit("_", 1)
    return ["horizon", "dpo", "beta_kl"].index(kind), float(value)


def aggregate(per_seed: list[dict], workdir: Path) -> dict:
    """Per cell: each method's gold reward and KL with 95% t-intervals over the seeds, the paired
    RTO - PPO difference, episodes to PPO's final gold reward, mean curves; per horizon the references."""
    seeds = [r["seed"] for r in per_seed]
    cells = {}
    for name in sorted(per_seed[0]["cells"], key=_cell_order):
        first = per_seed[0]["cells"][name]
        rows = [r["cells"][name] for r in per_seed]
        horizon = str(first["horizon"])
        out = {k: v for k, v in first.items() if k != "methods"}
        out["methods"] = {}
        for method in first["methods"]:
            runs = [row["methods"][method] for row in rows]
            curves = np.array([run["curve"] for run in runs], np.float64)  # [seeds, points, 3]
            reach = [run["episodes_to_ppo_final"] for run in runs]
            out["methods"][method] = {
                "gold_reward": report.mean_ci([run["gold_reward"] for run in runs]),
                "kl_to_ref": report.mean_ci([run["kl_to_ref"] for run in runs]),
                "gold_per_seed": [run["gold_reward"] for run in runs],
                "reward_args": runs[0]["reward_args"],
                "episodes_to_ppo_final": reach,
                "reached": sum(x is not None for x in reach),
                "curve": [
                    {"episodes": float(curves[0, i, 0]), "gold": report.mean_ci(curves[:, i, 1]), "kl": float(curves[:, i, 2].mean())}
                    for i in range(curves.shape[1])
                ],
            }  # fmt: skip
        ppo_runs, rto_runs = (out["methods"][m]["gold_per_seed"] for m in ("ppo", "rto"))
        out["rto_minus_ppo"] = report.paired_difference(rto_runs, ppo_runs)
        # The same, at every evaluation point of the curves (the same episodes for both methods).
        seed_curves = {m: [row["methods"][m]["curve"] for row in rows] for m in ("rto", "ppo")}  # [seeds][points]
        out["rto_minus_ppo_curve"] = [
            {
                "episodes": point["episodes"],
                **report.paired_difference(*([c[i][1] for c in seed_curves[m]] for m in ("rto", "ppo"))),
            }
            for i, point in enumerate(out["methods"]["ppo"]["curve"])
        ]
        # Seed by seed, RTO's episodes to PPO's final gold reward over PPO's own: None where RTO never
        # got there; left out where PPO's final is no better than pi_sft (both "reach" it at 0 episodes).
        reach = zip(*(out["methods"][m]["episodes_to_ppo_final"] for m in ("rto", "ppo")))
        out["rto_episodes_over_ppo"] = [None if r is None else r / p for r, p in reach if p]
        out["sft_gold"] = report.mean_ci([r["references"][horizon]["held_out"]["sft"]["gold_reward"] for r in per_seed])
        dpo_key = f"dpo_{out['dpo_pairs']}"
        out["dpo_gold"] = report.mean_ci(
            [r["references"][horizon]["held_out"][dpo_key]["gold_reward"] for r in per_seed]
        )
        out["best_of_n"] = [
            {"n": p["n"], "kl": p["kl"], "gold_reward": float(np.mean([r["references"][horizon]["best_of_n"][i]["gold_reward"] for r in per_seed]))}
            for i, p in enumerate(per_seed[0]["references"][horizon]["best_of_n"])
        ]  # fmt: skip
        cells[name] = out
    results = {"seeds": seeds, "center": per_seed[0]["center"], "cells": cells, "per_seed": per_seed}
    if is_main_process():
        write_json_atomic(workdir / "results.json", results)
        table = study_tables(results)
        (workdir / "results.md").write_text(table + "\n")
        plots.plot_study_curves(cells, workdir / "study_gold_vs_episodes.png")
        plots.plot_study_differences(cells, workdir / "study_rto_minus_ppo.png")
        sweep = [n for n in cells if n.startswith("beta_kl_") or n == f"horizon_{per_seed[0]['center']}"]
        plots.plot_study_frontier(cells, workdir / "study_gold_vs_kl.png", sorted(sweep, key=_kl_of(cells)))
        print(f"\nStudy, seeds {seeds}\n{table}")
    return results


def _ci(c: dict, digits: int = 3) -> str:
    return f"{c['mean']:.{digits}f} [{c['low']:.{digits}f}, {c['high']:.{digits}f}]"


def _reach(method: dict, n: int) -> str:
    reached = [x for x in method["episodes_to_ppo_final"] if x is not None]
    if not reached:
        return f"never (0/{n})"
    return f"{np.median(reached):.0f} ({len(reached)}/{n})"


def _ratio(cell: dict) -> str:
    """Median over the seeds of RTO's episodes over PPO's ("never" counts as above every ratio), over the
    seeds where PPO's final gold reward is above pi_sft's."""
    ratios = [np.inf if r is None else r for r in cell["rto_episodes_over_ppo"]]
    if not ratios:
        return "- (PPO no better than SFT)"
    median = float(np.median(ratios))
    return ("never" if np.isinf(median) else f"{median:.2f}") + f" ({len(ratios)} seeds)"


def study_tables(results: dict) -> str:
    """Markdown: one row per cell, then each cell's seeds."""
    n = len(results["seeds"])
    lines = [
        (
            "| cell | H | DPO pairs | beta_kl PPO / RTO | SFT | DPO | PPO | RTO | RTO - PPO (paired) | RTO wins | "
            "KL PPO / RTO | episodes to PPO's final: PPO / RTO (median, seeds reached) | RTO / PPO episodes |"
        ),
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, c in results["cells"].items():
        m = c["methods"]
        betas = " / ".join(f"{m[k]['reward_args'].get('beta_kl', float('nan')):g}" for k in ("ppo", "rto"))
        diff = c["rto_minus_ppo"]
        lines.append(
            f"| {name} | {c['horizon']} | {c['dpo_pairs']} | {betas} | {c['sft_gold']['mean']:.3f} | "
            f"{c['dpo_gold']['mean']:.3f} | {_ci(m['ppo']['gold_reward'])} | {_ci(m['rto']['gold_reward'])} | "
            f"{_ci(diff)} | {diff['wins']}/{n} | {m['ppo']['kl_to_ref']['mean']:.2f} / "
            f"{m['rto']['kl_to_ref']['mean']:.2f} | {_reach(m['ppo'], n)} / {_reach(m['rto'], n)} | {_ratio(c)} |"
        )
    lines += ["", "Per seed (gold reward of the final policy on the held-out prompts):", ""]
    lines.append("| cell | " + " | ".join(f"seed {s}: PPO / RTO" for s in results["seeds"]) + " |")
    lines.append("| --- |" + " --- |" * n)
    for name, c in results["cells"].items():
        pairs = zip(c["methods"]["ppo"]["gold_per_seed"], c["methods"]["rto"]["gold_per_seed"])
        lines.append(f"| {name} | " + " | ".join(f"{a:.3f} / {b:.3f}" for a, b in pairs) + " |")
    return "\n".join(lines)
