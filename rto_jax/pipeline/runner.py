"""Runs a config's recipe in one workdir (`experiments/run.py` calls `run`); `Pipeline` is what a recipe sees.

Workdir layout:
  config.json                  the config of the latest run (a changed config is reported on restart)
  metrics.jsonl                one JSON record per step / evaluation (rto_jax.pipeline.logging)
  tensorboard/                 TensorBoard events
  tokenizer/                   the trained BPE (tokenizer.bpe_vocab_size > 0)
  <stage>/checkpoints/<step>/  orbax checkpoints (last config.checkpoint.keep), removed when the stage is done
  <stage>/model/               the stage's final model in HF format (ppo/critic/ too)
  <stage>/done.json            written last: the stage is finished and is skipped on restart
  evaluate/<policy>.json, evaluate/samples_<policy>.jsonl, evaluate/tokens_<policy>.html (token rewards)
  results.json                 per-policy evaluation numbers and every stage's summary
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from rto_jax.distributed import is_main_process, sync
from rto_jax.pipeline.common import write_json
from rto_jax.pipeline.config import TRAINED_STAGES, parse_seeds, stage_done_file, stage_list, validate
from rto_jax.pipeline.logging import RunLog, summary, write_json_atomic
from rto_jax.pipeline.loop import stop_requests
from rto_jax.pipeline.recipes import load_recipe
from rto_jax.pipeline.sources import check_sources
from rto_jax.pipeline.tasks import build_task

log = logging.getLogger(__name__)


def _write_config(config, workdir: Path) -> None:
    if not is_main_process():
        return
    path = workdir / "config.json"
    new = json.loads(config.to_json_best_effort(sort_keys=True))
    if path.exists():
        old = json.loads(path.read_text())
        changed = sorted(_diff(old, new))
        if changed:
            log.warning("config changed since the last run of %s: %s", workdir, ", ".join(changed))
    write_json_atomic(path, new)


def _diff(a, b, prefix=""):
    if isinstance(a, dict) and isinstance(b, dict):
        for k in set(a) | set(b):
            yield from _diff(a.get(k), b.get(k), f"{prefix}{k}.")
    elif a != b:
        yield prefix.rstrip(".")


class Pipeline:
    """One run of a recipe in one workdir: the validated config, the task, the run log and the
    stages' done markers. A recipe calls `stage` once per stage, in order.

    A stage finished in this workdir earlier (its `done.json` exists) is skipped and its summary
    returned; a stage not in `config.stages` returns None unless its `init_from` gives the model.
    """

    def __init__(self, config, workdir, task, run_log: RunLog):
        self.config, self.workdir, self.task, self.run_log = config, Path(workdir), task, run_log
        self.wanted = stage_list(config)
        # Read before any stage runs: in a multi-process run process 0 writes the markers, and a
        # process that lags behind must not see a marker of a stage it has yet to run.
        self.finished = {
            path.parent.name: json.loads(path.read_text()) for path in sorted(self.workdir.glob("*/done.json"))
        }
        sync("done markers read")
        self.done: dict[str, dict] = {}

    def stage(self, name: str, fn, *, section: str | None = None, **inputs) -> dict | None:
        """`fn(config, workdir, task, run_log, **inputs)` as stage `name` (its folder and metric prefix).

        section: the config section that says whether it runs (default: `name`), e.g. several PPO
        runs of one recipe share `ppo`.
        """
        section = section or name
        if name in self.finished:
            self.done[name] = self.finished[name]
            if section in self.wanted and is_main_process():
                print(f"[{name}] already finished in {self.workdir}: skipped")
            return self.done[name]
        given = section in TRAINED_STAGES and bool(self.config[section].init_from)
        if section not in self.wanted and not given:
            return None
        result = fn(self.config, self.workdir, self.task, self.run_log, **inputs)
        write_json(stage_done_file(self.workdir, name), result)
        if not self.config.checkpoint.keep_after_stage and is_main_process():
            # A finished stage is skipped on restart and its model is exported: its checkpoints
            # (the model with its optimizer moments, ~3x its size) would only fill the disk.
            shutil.rmtree(self.workdir / name / "checkpoints", ignore_errors=True)
        self.done[name] = result
        if is_main_process():
            print(summary(f"{name} done", {k: v for k, v in result.items() if not isinstance(v, dict)}))
        return result

    def results(self, evaluation: dict | None = None, **extra) -> dict:
        """results.json: every stage's summary, the evaluation's numbers at the top level, and `extra`."""
        results = {"name": self.config.name, "recipe": self.config.recipe, "seed": self.config.seed}
        if self.task.special_tokens:
            results["special_tokens"] = self.task.special_tokens  # pad / EOS as chosen for this run
        results["stages"] = {k: v for k, v in self.done.items() if v is not evaluation}
        results.update(evaluation or {})
        results.update(extra)
        write_json(self.workdir / "results.json", results)
        return results


def model_path(result: dict | None) -> str | None:
    """The model a stage made or took (its summary's `model_path`); None for a stage that did not run."""
    return None if result is None else result["model_path"]


def with_seed(config, seed: int):
    """A copy of `config` for one seed (`config.seed`, read by every stage)."""
    one = config.copy_and_resolve_references()
    with one.unlocked():
        one.seed = seed
    return one


def run(config, workdir, task=None) -> dict:
    """Validates the config, then runs its recipe (`config.recipe`) once per seed of `config.seeds`;
    returns results.json's content. Several seeds run in `workdir/seed_N`, and the recipe's
    `aggregate(per_seed_results, workdir)` (if it has one) writes the across-seed results.

    task: a prebuilt `tasks.Task` (single seed only); default: built from config.data.
    """
    validate(config, workdir)
    # SIGTERM / SIGINT at any point of the run are noted; a training loop stops at its next step
    # boundary with a checkpoint (loop.Preempted), instead of the process dying mid-write.
    with stop_requests():
        return _run(config, workdir, task)


def _run(config, workdir, task) -> dict:
    # Every model source is fetched and checked before anything is written (rto_jax.pipeline.sources).
    tokenizer = check_sources(config) if task is None else None
    seeds = parse_seeds(config.seeds)
    recipe = load_recipe(config.recipe)
    if len(seeds) == 1:
        return _run_one(with_seed(config, seeds[0]), Path(workdir), recipe, task, tokenizer)
    if task is not None:
        raise ValueError("run(task=...) takes one seed; config.seeds has several")
    per_seed = [
        _run_one(with_seed(config, seed), Path(workdir) / f"seed_{seed}", recipe, None, tokenizer) for seed in seeds
    ]
    if hasattr(recipe, "aggregate"):
        return recipe.aggregate(per_seed, Path(workdir))
    results = {"seeds": seeds, "per_seed": per_seed}
    write_json(Path(workdir) / "results.json", results)
    return results


def _run_one(config, workdir: Path, recipe, task, tokenizer=None) -> dict:
    # The data are read (and a bad file reported) before the config and metrics files are written.
    task = task if task is not None else build_task(config, workdir, tokenizer)
    log.info("task %s (seed %d): %s", task.name, config.seed, task.describe())
    workdir.mkdir(parents=True, exist_ok=True)
    _write_config(config, workdir)
    run_log = RunLog(workdir)
    try:
        return recipe.run(Pipeline(config, workdir, task, run_log))
    finally:
        run_log.close()
