"""The one resumable training loop of every stage (SFT, reward model, DPO and PPO).

    restore the last checkpoint (state, RNG, data position) if any
    -> for each step: next batch, split the RNG, jitted step, log, NaN/inf guard,
       held-out evaluation every `eval_every` steps, checkpoint every N steps and at the end

A resumed stage drops the metric records logged after its checkpoint and logs them again,
identically, and reports the step it restored (`Progress.resumed_from`). The bad state of a
non-finite step is never saved: the guard runs before the checkpoint.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any

import jax

from rto_jax.data import BatchIterator
from rto_jax.distributed import host_local_batch_to_global
from rto_jax.pipeline import checkpoint, common
from rto_jax.pipeline.logging import RunLog, progress, scalars
from rto_jax.train.sharding import put

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Checkpointed:
    """How a loop's state goes in and out of a checkpoint, and which of its arrays are trained.

    The defaults fit a `TrainState`; PPO saves its policy and critic only (the frozen models are
    reloaded from their exports).
    """

    tree: Callable[[Any], Any] = lambda state: state  # the part of the state saved
    restore: Callable[[Any, Any], Any] = lambda state, tree: tree  # state with the saved part put back
    trained: Callable[[Any], Any] = lambda state: state.params  # the arrays checked for NaN/inf


@dataclasses.dataclass
class Progress:
    steps: int  # the stage's total steps
    resumed_from: int  # the checkpoint step a resumed run started after (0: from scratch)
    last_metrics: dict  # the final step's training metrics
    last_eval: dict  # the last held-out evaluation


def stage_rng(config, stage: str, shardings) -> jax.Array:
    """The stage's base PRNG key, replicated over the mesh when there is one (so checkpoints save it
    as one global array in a multi-process run)."""
    rng = common.stage_key(config.seed, stage)
    if shardings is None:
        return rng
    return jax.random.wrap_key_data(put(jax.random.key_data(rng), shardings.replicated))


def run_loop(
    stage: str,
    config,
    workdir,
    run_log: RunLog,
    state,
    batches: BatchIterator,
    step_fn: Callable,
    total: int,
    *,
    prepare: Callable[[dict], dict] = lambda batch: batch,
    evaluate: Callable[[Any], dict] | None = None,
    eval_every: int = 0,
    checkpointed: Checkpointed = Checkpointed(),
    postfix: Callable[[dict], dict] = lambda values: {"loss": f"{values['loss']:.4g}"},
    rng_name: str | None = None,
    shardings=None,
) -> tuple[Any, Progress]:
    """Runs (or resumes) `total` calls of `step_fn(state, batch, rng) -> (state, metrics)`.

    batches: this process's rows (`BatchIterator`, its position is checkpointed); with `shardings`
    each host batch is assembled into a global array over the mesh before `prepare` sees it.
    rng_name: the name the stage's PRNG key derives from (default `stage`); stages that share it
    draw the same random numbers (e.g. several PPO runs compared on the same rollout keys).
    """
    manager = checkpoint.manager(common.stage_dir(workdir, stage) / "checkpoints", keep=config.checkpoint.keep)
    rng = stage_rng(config, rng_name or stage, shardings)
    start, last_eval = 0, {}
    if manager.latest_step() is not None:
        (tree, rng_data), meta, start = checkpoint.restore(
            manager, (checkpointed.tree(state), jax.random.key_data(rng))
        )
        state, rng = checkpointed.restore(state, tree), jax.random.wrap_key_data(rng_data)
        batches.restore(meta["data"])
        last_eval = meta.get("eval", {})
        dropped = run_log.truncate(stage, start)
        log.info("%s: resumed from step %d (%d metric records after it dropped)", stage, start, dropped)
    bar = progress(stage, total, start)
    values: dict = {}
    for step in range(start + 1, total + 1):
        batch = next(batches)
        batch = prepare(batch if shardings is None else host_local_batch_to_global(batch, shardings.batch))
        rng, step_rng = jax.random.split(rng)
        state, metrics = step_fn(state, batch, step_rng)
        values = scalars(metrics)
        run_log.log(stage, step, values)
        common.check_finite(stage, step, values, checkpointed.trained(state), manager)
        last = step == total
        if evaluate is not None and (last or (eval_every and step % eval_every == 0)):
            last_eval = evaluate(state)
            run_log.log(stage, step, last_eval, split="eval")
        if last or step % config.checkpoint.every_steps == 0:
            meta = {"step": step, "data": batches.state(), "eval": last_eval if last else {}}
            checkpoint.save(manager, step, (checkpointed.tree(state), jax.random.key_data(rng)), meta)
        bar.update(1)
        bar.set_postfix(postfix(values))
    bar.close()
    return state, Progress(steps=total, resumed_from=start, last_metrics=values, last_eval=last_eval)
