"""Runs a config's recipe in one workdir (`experiments/run.py` calls `run`); `Pipeline` is what a recipe sees.

Workdir layout:
  .lock                        held by the running run (workdir.WorkdirLock): a second run is refused
  config.json                  the config, and `resume_history`: changes a resume made (workdir.check_config)
  metrics.jsonl                one JSON record per step / evaluation (rto_jax.pipeline.logging)
  tensorboard/                 TensorBoard events
  tokenizer/                   the trained BPE (tokenizer.bpe_vocab_size > 0)
  <stage>/checkpoints/<step>/  orbax checkpoints (last config.checkpoint.keep), removed when the stage is done
  <stage>/model/               the stage's final model in HF format (ppo/critic/ too)
  <stage>/done.json            written last: the stage is finished and is skipped on restart (paths in
                               it and in results.json are relative to the workdir)
  evaluate/<policy>.json, evaluate/samples_<policy>.jsonl, evaluate/tokens_<policy>.html (token rewards)
  results.json                 per-policy evaluation numbers and every stage's summary
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
from pathlib import Path

from rto_jax.distributed import any_process, is_main_process, sync
from rto_jax.errors import disk_errors
from rto_jax.pipeline import stages
from rto_jax.pipeline.common import write_json
from rto_jax.pipeline.config import (
    TRAINED_STAGES,
    method_settings,
    parse_seeds,
    reused_models,
    stage_done_file,
    stage_list,
    validate,
    with_reused_models,
)
from rto_jax.pipeline.logging import RunLog, summary
from rto_jax.pipeline.loop import stop_requests
from rto_jax.pipeline.recipes import load_recipe
from rto_jax.pipeline.sources import check_sources
from rto_jax.pipeline.tasks import build_task
from rto_jax.pipeline.workdir import WorkdirInUse, WorkdirLock, check_config, relative_to, resolve_in

log = logging.getLogger(__name__)


class Pipeline:
    """One run of a recipe in one workdir: the validated config, the task, the run log and the
    stages' done markers. A recipe calls `stage` once per stage, in order.

    A stage finished in this workdir earlier (its `done.json` exists) is skipped and its summary
    returned; so is one finished in the run `config.reuse_models_from` (its summary, with that run's
    model, unless the stage's `init_from` gives another); a stage not in `config.stages` returns None
    unless its `init_from` gives the model.
    """

    def __init__(self, config, workdir, task, run_log: RunLog):
        self.config, self.workdir, self.task, self.run_log = config, Path(workdir), task, run_log
        self.wanted = stage_list(config)
        # Read before any stage runs: in a multi-process run process 0 writes the markers, and a
        # process that lags behind must not see a marker of a stage it has yet to run.
        # Paths in them are relative to the workdir (a moved or copied workdir loads its own models).
        self.finished = {
            path.parent.name: resolve_in(json.loads(path.read_text()), self.workdir)
            for path in sorted(self.workdir.glob("*/done.json"))
        }
        sync("done markers read")
        self.reused = reused_models(config)  # {stage: summary} of the run reuse_models_from
        self.done: dict[str, dict] = {}

    def stage(self, name: str, fn, *, section: str | None = None, task=None, **inputs) -> dict | None:
        """`fn(config, workdir, task, run_log, **inputs)` as stage `name` (its folder and metric prefix).

        section: the config section that says whether it runs (default: `name`), e.g. several PPO
        runs of one recipe share `ppo`.
        task: this stage's task if not the pipeline's (e.g. DPO on a subset of the preference pairs).
        """
        section = section or name
        missing = _policies_missing(self.finished.get(name), inputs)
        if name in self.finished and missing and is_main_process():
            # A recipe that gained a method (resumed with changes): the evaluation must cover it too.
            print(f"[{name}] finished in {self.workdir} without the policies {missing}: run again")
        if name in self.finished and not missing:
            self.done[name] = self.finished[name]
            if section in self.wanted and is_main_process():
                print(f"[{name}] already finished in {self.workdir}: skipped")
            return self.done[name]
        if name in self.reused:  # the same stage (not a variant of it) of a finished run: its model, no work
            self.done[name] = self.reused[name]
            if is_main_process():
                print(f"[{name}] reused from {self.config.reuse_models_from}: {self.reused[name]['model_path']}")
            return self.done[name]
        given = section in TRAINED_STAGES and bool(self.config[section].init_from)
        if section not in self.wanted and not given:
            return None
        with disk_errors(name):  # a full disk while exporting or marking the stage done: one message
            result = fn(self.config, self.workdir, self.task if task is None else task, self.run_log, **inputs)
            write_json(stage_done_file(self.workdir, name), relative_to(result, self.workdir))
        if not self.config.checkpoint.keep_after_stage and is_main_process():
            # A finished stage is skipped on restart and its model is exported: its checkpoints
            # (the model with its optimizer moments, ~3x its size) would only fill the disk.
            shutil.rmtree(self.workdir / name / "checkpoints", ignore_errors=True)
        self.done[name] = result
        if is_main_process():
            print(summary(f"{name} done", {k: v for k, v in result.items() if not isinstance(v, dict)}))
        return result

    def ppo(self, name: str, token_reward, *, models: dict, reward: dict, values: dict | None = None):
        """A PPO-stage run `name` (section `ppo`) with `token_reward` -> (its summary, its coefficients).

        values: this method's own lr, critic_lr or reward coefficients (`config.ppo.per_method`'s
        keys) over the shared config.ppo and ppo.reward_args; models, reward: as `stages.run_ppo`'s.
        """
        overrides, args = method_settings(self.config, token_reward, values or {})
        result = self.stage(
            name,
            stages.run_ppo,
            section="ppo",
            stage=name,
            token_reward=token_reward,
            models=models,
            reward=reward,
            reward_args=args,
            ppo_overrides=overrides,
        )
        return result, args

    def variant(self, name: str, config) -> contextlib.AbstractContextManager[Pipeline]:
        """A pipeline of its own in `workdir/name` for a variant of this run's config (another task,
        e.g. a longer horizon), with its own config.json, metrics.jsonl and skip-if-done stages:

            with pipeline.variant("horizon_32", longer) as sub:
                sft = sub.stage("sft", stages.run_sft)
        """
        return open_pipeline(config, self.workdir / name)

    def results(self, evaluation: dict | None = None, **extra) -> dict:
        """results.json: every stage's summary, the evaluation's numbers at the top level, and `extra`."""
        results = {"name": self.config.name, "recipe": self.config.recipe, "seed": self.config.seed}
        if self.task.special_tokens:
            results["special_tokens"] = self.task.special_tokens  # pad / EOS as chosen for this run
        results["stages"] = {k: v for k, v in self.done.items() if v is not evaluation}
        results.update(evaluation or {})
        results.update(extra)
        write_json(self.workdir / "results.json", relative_to(results, self.workdir))
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
    config = with_reused_models(config)  # a run reusing another's models takes its tokenizer too
    validate(config, workdir)
    # One run per workdir (workdir.WorkdirLock); SIGTERM / SIGINT at any point of the run are noted,
    # and a training loop stops at its next step boundary with a checkpoint (loop.Preempted).
    with _locked(workdir), stop_requests():
        return _run(config, Path(workdir), task)


@contextlib.contextmanager
def _locked(workdir):
    """The workdir's lock, taken by process 0 for all processes (they share the workdir)."""
    lock, refused = WorkdirLock(workdir), None
    if is_main_process():
        try:
            lock.__enter__()
        except WorkdirInUse as e:
            refused = e
    if any_process(refused is not None):
        raise refused or WorkdirInUse(f"{workdir} is in use by another run (process 0 could not lock it)")
    try:
        yield
    finally:
        lock.__exit__()


def _run(config, workdir: Path, task) -> dict:
    seeds = parse_seeds(config.seeds)
    runs = [(with_seed(config, s), workdir if len(seeds) == 1 else workdir / f"seed_{s}") for s in seeds]
    # A config that differs from the one the workdir's work was done with is refused before any work.
    to_write = [check_config(one, folder) for one, folder in runs]
    # Every model source is fetched and checked before anything is written (rto_jax.pipeline.sources).
    tokenizer = check_sources(config) if task is None else None
    recipe = load_recipe(config.recipe)
    if len(seeds) == 1:
        return _run_one(*runs[0], to_write[0], recipe, task, tokenizer)
    if task is not None:
        raise ValueError("run(task=...) takes one seed; config.seeds has several")
    per_seed = [
        _run_one(one, folder, written, recipe, None, tokenizer) for (one, folder), written in zip(runs, to_write)
    ]
    if hasattr(recipe, "aggregate"):
        return recipe.aggregate(per_seed, Path(workdir))
    results = {"seeds": seeds, "per_seed": per_seed}
    write_json(Path(workdir) / "results.json", relative_to(results, Path(workdir)))
    return results


def _run_one(config, workdir: Path, config_json: dict, recipe, task, tokenizer=None) -> dict:
    with open_pipeline(config, workdir, config_json, task, tokenizer) as pipeline:
        return recipe.run(pipeline)


def _policies_missing(finished: dict | None, inputs: dict) -> list[str]:
    """The policies a stage is asked to evaluate (`inputs['policies']`) that its finished summary
    (`finished['policies']`, as an evaluation stage writes it) does not cover."""
    if not finished or not isinstance(finished.get("policies"), dict) or "policies" not in inputs:
        return []
    return sorted(set(inputs["policies"]) - set(finished["policies"]))


@contextlib.contextmanager
def open_pipeline(config, workdir: Path, config_json: dict | None = None, task=None, tokenizer=None):
    """The `Pipeline` of `config` in `workdir`: its task, config.json and run log (closed on exit).

    config_json: what `check_config` returned for this workdir (default: checked here, so a variant
    whose work was done with another config is refused before any of its work).
    """
    workdir = Path(workdir)
    config_json = check_config(config, workdir) if config_json is None else config_json
    # The data are read (and a bad file reported) before the config and metrics files are written.
    task = task if task is not None else build_task(config, workdir, tokenizer)
    log.info("task %s (seed %d): %s", task.name, config.seed, task.describe())
    workdir.mkdir(parents=True, exist_ok=True)
    with disk_errors(f"the run in {workdir}"):
        write_json(workdir / "config.json", config_json)  # the config, and the changes a resume made (history)
        run_log = RunLog(workdir)
        try:
            yield Pipeline(config, workdir, task, run_log)
        finally:
            run_log.close()
