"""The one resumable training loop of every stage (SFT, reward model, DPO and PPO).

    restore the last checkpoint (state, RNG, data position) if any
    -> for each step: next batch, split the RNG, jitted step, log, NaN/inf guard,
       held-out evaluation every `eval_every` steps, checkpoint every N steps and at the end

A resumed stage drops the metric records logged after its checkpoint and logs them again,
identically, and reports the step it restored (`Progress.resumed_from`). The bad state of a
non-finite step is never saved: the guard runs before the checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import signal
import threading
from collections.abc import Callable
from typing import Any

import jax

from rto_jax.data import BatchIterator
from rto_jax.distributed import any_process, host_local_batch_to_global
from rto_jax.errors import disk_errors
from rto_jax.pipeline import checkpoint, common
from rto_jax.pipeline.logging import RunLog, progress, scalars
from rto_jax.train.sharding import put

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Checkpointed:
    """How a loop's state goes in and out of a checkpoint, and which of its arrays are trained.

    The defaults fit a `TrainState`: all of it but an adapter run's frozen base, which is reloaded from
    the model it was built on; PPO saves its policy and critic only (the frozen models are reloaded
    from their exports).
    """

    tree: Callable[[Any], Any] = lambda state: state.replace(base=None)  # the part of the state saved
    restore: Callable[[Any, Any], Any] = lambda state, tree: tree.replace(base=state.base)  # saved part put back
    trained: Callable[[Any], Any] = lambda state: state.params  # the arrays checked for NaN/inf


PREEMPTED_EXIT_STATUS = 75  # EX_TEMPFAIL: stopped on a signal with a checkpoint; rerun to resume


class Preempted(Exception):
    """SIGTERM / SIGINT arrived during a stage: the step in flight finished, a checkpoint was written."""

    def __init__(self, stage: str, step: int, signal_name: str, where: str):
        super().__init__(
            f"{stage}: stopped by {signal_name} after step {step}; {where}. Run the same command again to resume."
        )
        self.stage, self.step, self.signal_name, self.where = stage, step, signal_name, where


_REQUEST: dict = {"signal": None}
_DEPTH = [0]  # nesting of stop_requests blocks (the runner's around the stage loops')


@contextlib.contextmanager
def stop_requests():
    """Turns SIGTERM (what preemptible VMs send ~30 s before shutdown) and SIGINT into a request the
    loop honours after the step in flight; a second SIGINT interrupts at once (KeyboardInterrupt).
    Yields a dict whose "signal" is the name of the first signal received, or None."""
    request = _REQUEST  # one per process: a signal during a stage's last step stops the next stage
    if _DEPTH[0] == 0:  # a new run (the outermost block): an earlier, honoured stop request is spent
        request["signal"] = None
    _DEPTH[0] += 1
    try:
        if threading.current_thread() is not threading.main_thread():  # handlers only install there
            yield request
        else:
            with _handlers(request):
                yield request
    finally:
        _DEPTH[0] -= 1


@contextlib.contextmanager
def _handlers(request: dict):
    """SIGTERM and SIGINT set `request` while the block runs; the previous handlers come back after."""

    def handle(signum, frame):
        if request["signal"] is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        request["signal"] = request["signal"] or signal.Signals(signum).name
        log.warning("%s received: stopping after the current step (a checkpoint will be written)", request["signal"])

    previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield request
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@dataclasses.dataclass
class CollapseWatch:
    """Consecutive steps whose gradients are exactly zero, or whose loss equals the previous step's
    (relative 1e-6, on other batches): a collapsed model (e.g. a learning rate far too high saturates
    the softmax and the loss sits at ln V with zero gradients: no NaN, nothing else stops it).

    `update` adds `collapse_steps` (the current run of such steps) to the step's metrics and warns once
    when it reaches `steps`. Its counters are checkpointed (a resumed run logs the same numbers).
    """

    steps: int
    run: int = 0
    last_loss: float | None = None
    warned: bool = False

    def update(self, stage: str, step: int, values: dict) -> dict:
        grads = [v for k, v in values.items() if k.endswith("grad_norm")]
        zero_grads = bool(grads) and all(g == 0.0 for g in grads)
        loss = values.get("loss")
        flat = loss is not None and self.last_loss is not None and abs(loss - self.last_loss) <= 1e-6 * abs(loss)
        self.run = self.run + 1 if zero_grads or flat else 0
        self.last_loss = loss
        if self.steps and self.run >= self.steps and not self.warned:
            self.warned = True
            what = "gradients exactly zero" if zero_grads else "the loss unchanged"
            log.warning(
                "%s: %s for %d steps (to step %d; loss %.6g): training has collapsed, e.g. a learning rate far "
                "too high. The run goes on; see collapse_steps in metrics.jsonl",
                stage,
                what,
                self.run,
                step,
                loss if loss is not None else float("nan"),
            )
        return {**values, "collapse_steps": float(self.run)}

    def state(self) -> dict:
        return {"run": self.run, "last_loss": self.last_loss, "warned": self.warned}


@dataclasses.dataclass
class Progress:
    steps: int  # the stage's total steps
    resumed_from: int  # the checkpoint step a resumed run started after (0: from scratch)
    last_metrics: dict  # the final step's training metrics
    last_eval: dict  # the last held-out evaluation


# PPO's token reward logs its parts as `reward/<part>` and their sum as `reward/total`
# (train/ppo.make_experience). A NaN or inf in the reward spreads within the same step to the
# advantages, the losses and the gradient norms, and a jitted step returns its metrics sorted by name:
# the guard names the reward's parts first, where such a value comes from.
REWARD_PREFIX, REWARD_TOTAL = "reward/", "reward/total"


def reward_parts_first(values: dict) -> dict:
    """`values` reordered: the token reward's parts, its total, then the rest in their order."""

    def rank(name: str) -> int:
        return 1 if name == REWARD_TOTAL else 0 if name.startswith(REWARD_PREFIX) else 2

    return {name: values[name] for name in sorted(values, key=rank)}  # sorted() is stable


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
    watch = CollapseWatch(config.collapse_steps)
    # The newest intact checkpoint (damaged newer ones are moved aside, with a warning).
    restored = checkpoint.restore_intact(manager, (checkpointed.tree(state), jax.random.key_data(rng)), stage)
    if restored is not None:
        (tree, rng_data), meta, start, manager = restored
        state, rng = checkpointed.restore(state, tree), jax.random.wrap_key_data(rng_data)
        batches.restore(meta["data"])
        last_eval = meta.get("eval", {})
        watch = CollapseWatch(config.collapse_steps, **meta.get("collapse", {}))
        log.info("%s: resumed from step %d", stage, start)
    # Records of steps after the checkpoint (or of any step, without one) are logged again identically.
    dropped = run_log.truncate(stage, start)
    if dropped:
        log.info("%s: %d metric records after step %d dropped (they are logged again)", stage, dropped, start)
    bar = progress(stage, total, start)
    values: dict = {}
    with stop_requests() as request:
        if start < total and any_process(request["signal"] is not None):
            raise Preempted(stage, start, request["signal"] or "a signal", "nothing of this stage to save yet")
        for step in range(start + 1, total + 1):
            batch = next(batches)
            batch = prepare(batch if shardings is None else host_local_batch_to_global(batch, shardings.batch))
            rng, step_rng = jax.random.split(rng)
            state, metrics = step_fn(state, batch, step_rng)
            values = watch.update(stage, step, scalars(metrics))
            with disk_errors(f"{stage} step {step}"):  # a full disk: one message naming the file
                run_log.log(stage, step, values)
            common.check_finite(stage, step, reward_parts_first(values), checkpointed.trained(state), manager)
            last = step == total
            if evaluate is not None and (last or (eval_every and step % eval_every == 0)):
                last_eval = evaluate(state)
                with disk_errors(f"{stage} step {step}"):
                    run_log.log(stage, step, last_eval, split="eval")
            stop = not last and any_process(request["signal"] is not None)
            if last or stop or step % config.checkpoint.every_steps == 0:
                meta = {"step": step, "data": batches.state(), "eval": last_eval if last else {}}
                meta["collapse"] = watch.state()
                with disk_errors(f"{stage} step {step}"):
                    checkpoint.save(manager, step, (checkpointed.tree(state), jax.random.key_data(rng)), meta)
            bar.update(1)
            bar.set_postfix(postfix(values))
            if stop:
                bar.close()
                where = f"checkpoint written to {manager.directory / str(step)}"
                raise Preempted(stage, step, request["signal"] or "a signal", where)
    bar.close()
    return state, Progress(steps=total, resumed_from=start, last_metrics=values, last_eval=last_eval)
