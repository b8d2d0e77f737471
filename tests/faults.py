"""Faults injected into the pipeline from the tests (production code has no test hooks).

    kill_after_checkpoint(stage, step)  the run dies right after checkpoint `step` of `stage` is written
                                        (as a preemption would leave it)
    nan_params_at(stage, step)          the stage's `step`-th step returns NaN parameters and its own,
                                        finite metrics (a diverged update the loss does not show)
    count_steps()                       {stage: calls of its jitted step} while the block runs

They patch `rto_jax.pipeline.checkpoint.save` and the stages' `run_loop`; tests/fault_run.py applies
them to a whole `experiments/run.py` command in a subprocess.
"""

from __future__ import annotations

import collections
import contextlib
from pathlib import Path
from unittest import mock

import jax
import jax.numpy as jnp

from rto_jax.pipeline import checkpoint, stages


class SimulatedFailure(RuntimeError):
    """The process 'died' here."""


@contextlib.contextmanager
def kill_after_checkpoint(stage: str, step: int):
    real_save = checkpoint.save

    def save(manager, at, tree, meta):
        real_save(manager, at, tree, meta)
        if Path(manager.directory).parent.name == stage and int(at) == step:
            raise SimulatedFailure(f"killed right after {stage} checkpoint {step}")

    with mock.patch.object(checkpoint, "save", save):
        yield


@contextlib.contextmanager
def _wrap_steps(wrap):
    """Every stage's step function passed through `wrap(stage, step_fn)` while the block runs."""
    real_loop = stages.run_loop

    def run_loop(stage, config, workdir, run_log, state, batches, step_fn, total, **kwargs):
        return real_loop(stage, config, workdir, run_log, state, batches, wrap(stage, step_fn), total, **kwargs)

    with mock.patch.object(stages, "run_loop", run_loop):
        yield


def _poison(tree):
    return jax.tree.map(lambda x: x * jnp.nan if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


@contextlib.contextmanager
def nan_params_at(stage: str, step: int):
    """Counts the stage's steps from 1 in this block (use it on a run that starts the stage afresh)."""

    def wrap(name, step_fn):
        if name != stage:
            return step_fn
        calls = iter(range(1, 1 << 30))

        def poisoned(state, batch, rng):
            state, metrics = step_fn(state, batch, rng)
            if next(calls) == step:
                if hasattr(state, "policy"):  # PPOState: the policy diverged
                    state = state.replace(policy=state.policy.replace(params=_poison(state.policy.params)))
                else:
                    state = state.replace(params=_poison(state.params))
            return state, metrics

        return poisoned

    with _wrap_steps(wrap):
        yield


@contextlib.contextmanager
def count_steps():
    counts: collections.Counter = collections.Counter()

    def wrap(name, step_fn):
        def counted(state, batch, rng):
            counts[name] += 1
            return step_fn(state, batch, rng)

        return counted

    with _wrap_steps(wrap):
        yield counts
