"""The synthetic study's time per seed, before/after a change, from two shortened runs of one horizon.

Run the same shortened study command at two commits (each in its own worktree and workdir, under the
same conditions: e.g. both pinned to one core each, at the same time), then

    python -m benchmarks.study_seed_time BEFORE_DIR AFTER_DIR [--out results.json]

BEFORE_DIR / AFTER_DIR: the folder of one horizon's pipeline (a study workdir for the center, or its
horizon_H/ subfolder). Each stage's wall time is the gap between consecutive `done.json` files (the
first from the pipeline's config.json); a training stage's time per step is the median gap between
consecutive train records in metrics.jsonl (the first step's, which compiles, and any with an
evaluation between them left out), and a PPO run's time per gold evaluation the median gap from a
train record to the eval record after it (the first, which compiles, left out).
The full seed's time is extrapolated from the shortened run: each training stage's measured time plus
the steps (and, for PPO, the evaluations) it did not run at their measured cost; sampling and
evaluation stages run at full size in both, so they count as measured. Defaults: the study preset's
budgets (SFT 600 steps, reward model 300, DPO 320, each PPO run 100 iterations with 10 gold
evaluations; `--full` to change them). docs/performance.md#the-studys-time-per-seed has the commands.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

from rto_jax.pipeline.logging import read_metrics

FULL = {"sft": (600, 0), "reward_model": (300, 0), "dpo": (320, 0), "ppo": (100, 10)}  # (steps, evaluations)


def _median(values: list[float]) -> float | None:
    return float(np.median(values)) if values else None


def stage_times(folder) -> dict[str, dict]:
    """{stage: {seconds, steps, step_s, evals, eval_s}} of one pipeline folder, in the order they ran."""
    folder = Path(folder)
    previous = os.path.getmtime(folder / "config.json")
    finished = sorted((os.path.getmtime(p), p.parent.name) for p in folder.glob("*/done.json"))
    records = read_metrics(folder / "metrics.jsonl")
    out = {}
    for when, stage in finished:
        steps, step_gaps, evals, last_train, evaluated = 0, [], [], None, False
        for r in (r for r in records if r["stage"] == stage):
            if r["split"] == "train":
                steps += 1
                # Not the gap to step 2 (a second call may still compile), nor one holding an evaluation.
                if last_train is not None and steps > 2 and not evaluated:
                    step_gaps.append(r["time"] - last_train)
                last_train, evaluated = r["time"], False
            elif r["split"] == "eval" and last_train is not None:  # its cost: from the train record before it
                evals.append(r["time"] - last_train)
                evaluated = True
        out[stage] = {
            "seconds": when - previous,
            "steps": steps,
            "step_s": _median(step_gaps),
            "evals": len(evals),
            "eval_s": _median(evals[1:]),  # the first evaluation compiles its sampler
        }
        previous = when
    return out


def full_seconds(stage: str, measured: dict, full: dict) -> float:
    """The stage's time at the full budget: measured, plus the steps and evaluations it did not run.
    Raises ValueError where the shortened run cannot say (a training stage with no full budget given,
    too few steps or evaluations to time one that did not compile)."""
    kind = "ppo" if stage.startswith("ppo_") else stage
    if measured["steps"] == 0:
        return measured["seconds"]  # a sampling / evaluation stage: full size already
    if kind not in full:
        raise ValueError(f"stage {stage} trained {measured['steps']} steps and has no full budget: --full {kind}=STEPS")
    steps, evals = full[kind]
    if measured["step_s"] is None:
        raise ValueError(f"stage {stage}: {measured['steps']} steps are too few to time one (run at least 3)")
    extra = (steps - measured["steps"]) * measured["step_s"]
    if evals > measured["evals"]:
        if measured["eval_s"] is None:
            raise ValueError(f"stage {stage}: {measured['evals']} evaluations are too few to time one (run at least 2)")
        extra += (evals - measured["evals"]) * measured["eval_s"]
    return measured["seconds"] + extra


def compare(before_dir, after_dir, full: dict = FULL) -> dict:
    before, after = stage_times(before_dir), stage_times(after_dir)
    if set(before) != set(after):
        raise ValueError(f"the two runs finished different stages: {sorted(before)} vs {sorted(after)}")
    rows = {}
    for stage in before:
        b, a = full_seconds(stage, before[stage], full), full_seconds(stage, after[stage], full)
        rows[stage] = {"before": before[stage], "after": after[stage], "full_before_s": b, "full_after_s": a}
    totals = {
        "measured_before_s": sum(r["before"]["seconds"] for r in rows.values()),
        "measured_after_s": sum(r["after"]["seconds"] for r in rows.values()),
        "full_before_s": sum(r["full_before_s"] for r in rows.values()),
        "full_after_s": sum(r["full_after_s"] for r in rows.values()),
    }
    return {"stages": rows, "totals": totals, "full_budgets": {k: list(v) for k, v in full.items()}}


def _parse_full(text: str) -> dict:
    """'sft=600,reward_model=300,dpo=320,ppo=100:10' -> FULL's form."""
    out = dict(FULL)
    for item in filter(None, text.split(",")):
        name, _, value = item.partition("=")
        steps, _, evals = value.partition(":")
        out[name.strip()] = (int(steps), int(evals or 0))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.study_seed_time", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("before")
    parser.add_argument("after")
    parser.add_argument("--full", default="", help="full budgets, e.g. sft=600,reward_model=300,dpo=320,ppo=100:10")
    parser.add_argument("--out", help="write the comparison as JSON here")
    args = parser.parse_args(argv)
    for folder in (args.before, args.after):
        if not (Path(folder) / "config.json").exists() or not (Path(folder) / "metrics.jsonl").exists():
            print(f"error: {folder}: not a pipeline folder (no config.json / metrics.jsonl)", file=sys.stderr)
            return 2
    try:
        result = compare(args.before, args.after, _parse_full(args.full))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{'stage':<22} {'before s':>9} {'after s':>9} {'full before':>12} {'full after':>11} {'step before/after s':>22}")
    for stage, r in result["stages"].items():
        steps = "" if r["before"]["step_s"] is None else f"{r['before']['step_s']:.3f} / {r['after']['step_s']:.3f}"
        print(f"{stage:<22} {r['before']['seconds']:>9.1f} {r['after']['seconds']:>9.1f} "
              f"{r['full_before_s']:>12.1f} {r['full_after_s']:>11.1f} {steps:>22}")  # fmt: skip
    t = result["totals"]
    print(f"{'total':<22} {t['measured_before_s']:>9.1f} {t['measured_after_s']:>9.1f} "
          f"{t['full_before_s']:>12.1f} {t['full_after_s']:>11.1f}   full: {t['full_before_s'] / t['full_after_s']:.2f}x")  # fmt: skip
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
