"""Runs the stages a config names, in order, in one workdir (`experiments/run.py` calls `run`).

Workdir layout:
  config.json                  the config of the latest run (a changed config is reported on restart)
  metrics.jsonl                one JSON record per step / evaluation (rto_jax.pipeline.logging)
  tensorboard/                 TensorBoard events
  tokenizer/                   the trained BPE (tokenizer.bpe_vocab_size > 0)
  <stage>/checkpoints/<step>/  orbax checkpoints (last config.checkpoint.keep)
  <stage>/model/               the stage's final model in HF format (ppo/critic/ too)
  <stage>/done.json            written last: the stage is finished and is skipped on restart
  evaluate/<policy>.json, evaluate/samples_<policy>.jsonl
  results.json                 per-policy evaluation numbers and every stage's summary
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from rto_jax.distributed import is_main_process, sync
from rto_jax.pipeline import stages as stages_lib
from rto_jax.pipeline.common import write_json
from rto_jax.pipeline.config import STAGES, parse_policies, stage_done_file, stage_list, validate
from rto_jax.pipeline.logging import RunLog, summary, write_json_atomic
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


def run(config, workdir, task=None) -> dict:
    """Validates the config, then runs (or skips, when done) each stage; returns results.json's content.

    task: a prebuilt `tasks.Task` (e.g. a synthetic one); default: built from config.data.
    """
    validate(config, workdir)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    _write_config(config, workdir)
    wanted = stage_list(config)
    run_log = RunLog(workdir)
    try:
        task = task if task is not None else build_task(config, workdir)
        log.info("task %s: %s", task.name, task.describe())
        # Read before any stage runs: in a multi-process run process 0 writes the markers, and a
        # process that lags behind must not see a marker of a stage it has yet to run.
        finished = {
            stage: json.loads(stage_done_file(workdir, stage).read_text())
            for stage in STAGES
            if stage_done_file(workdir, stage).exists()
        }
        sync("done markers read")
        done: dict[str, dict] = {}
        for stage in STAGES:
            marker = stage_done_file(workdir, stage)
            if stage in finished:
                done[stage] = finished[stage]
                if stage in wanted and is_main_process():
                    print(f"[{stage}] already finished in {workdir}: skipped")
                continue
            if stage not in wanted and not (stage != "evaluate" and config[stage].init_from):
                continue
            result = _run_stage(stage, config, workdir, task, run_log, done)
            write_json(marker, result)
            done[stage] = result
            if is_main_process():
                print(summary(f"{stage} done", {k: v for k, v in result.items() if not isinstance(v, dict)}))
        results = {"name": config.name, "stages": {k: v for k, v in done.items() if k != "evaluate"}}
        if "evaluate" in done:
            results.update(done["evaluate"])
        write_json(workdir / "results.json", results)
        return results
    finally:
        run_log.close()


def _path(done: dict, stage: str) -> str | None:
    return done[stage]["model_path"] if stage in done else None


def _run_stage(stage: str, config, workdir: Path, task, run_log: RunLog, done: dict) -> dict:
    sft = _path(done, "sft")
    if stage == "sft":
        return stages_lib.run_sft(config, workdir, task, run_log)
    if stage == "reward_model":
        return stages_lib.run_reward_model(config, workdir, task, run_log, sft)
    if stage == "dpo":
        return stages_lib.run_dpo(config, workdir, task, run_log, sft)
    if stage == "ppo":
        return stages_lib.run_ppo(config, workdir, task, run_log, sft, done.get("reward_model"), _path(done, "dpo"))
    policies = {name: _path(done, name) for name in ("sft", "dpo") if name in done}
    if "ppo" in done:
        policies[done["ppo"].get("variant", "ppo")] = _path(done, "ppo")
    policies.update(parse_policies(config.evaluate.policies))
    return stages_lib.run_evaluate(config, workdir, task, run_log, policies, _path(done, "reward_model"), sft)
