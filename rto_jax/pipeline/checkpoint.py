"""Orbax checkpoints of a stage: any pytree of arrays plus a small JSON dict (step, data position, ...).

  manager = checkpoint.manager(workdir / "ppo" / "checkpoints", keep=2)
  checkpoint.save(manager, step, {"policy": ..., "rng": key_data}, {"data": it.state()})
  tree, meta, step = checkpoint.restore(manager, target)   # target: arrays or jax.ShapeDtypeStruct

Saves are synchronous and atomic (orbax writes a temporary folder and renames it), so a run killed at
any moment leaves the previous checkpoints intact. The pytree is stored as a nested dict keyed by its
key paths, so any pytree (TrainState, nnx.State, optax states) round-trips, and `restore` rebuilds the
*target's* structure: the target's leaves may be `jax.ShapeDtypeStruct`s carrying a `.sharding`, which
restores straight onto another device layout (mesh) than the one that saved.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging as absl_logging

from rto_jax.distributed import is_main_process, sync
from rto_jax.errors import ConfigError, StorageError, UserError, disk_failure

log = logging.getLogger(__name__)


def manager(directory: str | os.PathLike, keep: int = 2) -> ocp.CheckpointManager:
    """A CheckpointManager keeping the last `keep` steps under `directory` (created if missing)."""
    # cleanup_tmp_directories: a partial folder a failed or killed save left is removed at the start
    # (the workdir lock makes this the only run writing there).
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=False, cleanup_tmp_directories=True
    )
    return ocp.CheckpointManager(Path(directory).absolute(), options=options, item_names=("state", "meta"))


def _key_name(key) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _paths(tree) -> tuple[list[tuple[str, ...]], list[Any], Any]:
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    return [tuple(_key_name(k) for k in path) for path, _ in flat], [leaf for _, leaf in flat], treedef


def to_nested(tree) -> dict:
    """The leaves of any pytree as a nested dict keyed by their key-path names (orbax's native layout)."""
    out: dict = {}
    paths, leaves, _ = _paths(tree)
    if not paths:
        raise ValueError("checkpoint: the pytree has no array leaves")
    for path, leaf in zip(paths, leaves):
        node = out
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1] if path else "value"] = leaf
    return out


def _lookup(nested: dict, path: tuple[str, ...]):
    node = nested
    for name in path or ("value",):
        node = node[name]
    return node


def _abstract(leaf):
    """A restore target leaf: ShapeDtypeStructs stay (with their sharding); arrays give theirs."""
    if isinstance(leaf, jax.ShapeDtypeStruct):
        return leaf
    sharding = getattr(leaf, "sharding", None)
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)


def save(mngr: ocp.CheckpointManager, step: int, tree, meta: dict) -> None:
    """Writes checkpoint `step` (overwriting nothing: orbax refuses an existing step) and waits for it.

    A disk failure (full, quota, file-size limit, read-only) raises one StorageError naming the
    checkpoint, the file and the previous checkpoint, which is intact; the partial folder is removed.
    """
    args = ocp.args.Composite(state=ocp.args.StandardSave(to_nested(tree)), meta=ocp.args.JsonSave(dict(meta)))
    previous = mngr.latest_step()
    try:
        with _quiet_on_failure():
            mngr.save(int(step), args=args, force=True)
            mngr.wait_until_finished()
    except Exception as e:
        failure = disk_failure(e)
        if failure is None:
            raise
        reason, path = failure
        directory = Path(mngr.directory)
        if is_main_process():
            _remove_partial(directory, int(step))
        intact = f"{directory / str(previous)} is intact" if previous is not None else "there is none"
        raise StorageError(
            f"writing checkpoint {directory / str(step)} failed: {reason} ({path}); the previous checkpoint "
            f"{intact}. Free space and run the same command again"
        ) from None


PARTIAL_QUIET_S = 1.0  # how long a failed save's partial folder must stay gone


def _remove_partial(directory: Path, step: int) -> None:
    """Removes the partial folder of failed save `step`, until it stays gone for PARTIAL_QUIET_S.

    The first failed write surfaces while tensorstore's other writes of the same save (another OCDBT
    data file, then its manifest) still run on tensorstore's own threads: orbax's gather does not wait
    for them, keeps no handle to them, and `wait_until_finished` is a no-op for a synchronous manager.
    Tensorstore creates missing parent folders, so one removal could race them and leave the folder
    re-created (seen 1 in 16 runs under load). Should a writer outlast even this, the next run removes
    the folder before it reads any checkpoint (`cleanup_tmp_directories` in `manager`)."""
    deadline, quiet_since = time.monotonic() + 60, time.monotonic()
    while time.monotonic() < deadline:
        partial = list(directory.glob(f"{step}.orbax-checkpoint-tmp*"))
        for folder in partial:
            shutil.rmtree(folder, ignore_errors=True)
        now = time.monotonic()
        if partial:
            quiet_since = now
        elif now - quiet_since >= PARTIAL_QUIET_S:
            return
        time.sleep(0.05)


@contextlib.contextmanager
def _quiet_on_failure():
    """orbax reports a failed write or read from each of its worker tasks too: ERROR logs, asyncio's
    'Task exception was never retrieved', 'Event loop is closed', coroutines never awaited: hundreds
    of lines around the one exception the caller turns into a message. Inside the block they are
    silenced; after a failure they stay silenced for the rest of the process, since the leftover
    tasks report when they are garbage-collected, often at exit."""
    loggers = [logging.getLogger(name) for name in ("absl", "asyncio")]
    levels, unraisable = [logger.level for logger in loggers], sys.unraisablehook
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    sys.unraisablehook = lambda _: None
    try:
        yield
    except BaseException:
        warnings.filterwarnings("ignore", message="coroutine .* was never awaited", category=RuntimeWarning)
        raise
    else:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
        sys.unraisablehook = unraisable


def restore(mngr: ocp.CheckpointManager, target, step: int | None = None) -> tuple[Any, dict, int]:
    """(tree with `target`'s structure, meta, step) of checkpoint `step` (default: the latest).

    target: a pytree whose leaves are arrays or `jax.ShapeDtypeStruct`s (optionally with `.sharding`);
    only shapes, dtypes and shardings are used.
    """
    step = mngr.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"{mngr.directory}: no checkpoint to restore")
    paths, leaves, treedef = _paths(target)
    abstract = to_nested(jax.tree_util.tree_unflatten(treedef, [_abstract(x) for x in leaves]))
    restored = mngr.restore(
        int(step), args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore())
    )
    values = [_lookup(restored["state"], path) for path in paths]
    return jax.tree_util.tree_unflatten(treedef, values), dict(restored["meta"]), int(step)


def latest_step(mngr: ocp.CheckpointManager) -> int | None:
    return mngr.latest_step()


class CheckpointMismatch(ConfigError):
    """A checkpoint's arrays do not fit the model the config builds (a model key changed)."""


class NoIntactCheckpoint(UserError):
    """Every checkpoint of a stage is damaged."""


def _stored_shapes(folder: Path) -> dict[tuple[str, ...], tuple]:
    """{key path: (shape, dtype)} of the arrays a checkpoint's `state` item holds (its metadata only)."""
    verbosity = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.ERROR)  # orbax warns of a step-level file it does not need here
    try:
        with ocp.PyTreeCheckpointer() as reader:
            tree = reader.metadata(folder / "state").item_metadata.tree
    finally:
        absl_logging.set_verbosity(verbosity)
    paths, leaves, _ = _paths(tree)
    return {path: (tuple(leaf.shape), str(leaf.dtype)) for path, leaf in zip(paths, leaves)}


def _check_fits(folder: Path, target) -> None:
    """Raises CheckpointMismatch naming the first arrays whose shape differs from `target`'s."""
    stored = _stored_shapes(folder)
    paths, leaves, _ = _paths(to_nested(jax.tree.map(_abstract, target)))
    wanted = {path: (tuple(leaf.shape), str(leaf.dtype)) for path, leaf in zip(paths, leaves)}
    differ = [p for p in wanted if p in stored and stored[p][0] != wanted[p][0]]
    missing = sorted(set(wanted) ^ set(stored))
    if not differ and not missing:
        return
    named = [f"{'/'.join(p)} is {list(stored[p][0])} there, {list(wanted[p][0])} now" for p in differ[:3]]
    named += [f"{'/'.join(p)} is {'only there' if p in stored else 'not there'}" for p in missing[:3]]
    raise CheckpointMismatch(
        "model",
        f"checkpoint {folder} does not fit the model this config builds ({'; '.join(named)}): a model key "
        "changed since it was written. Restore the old value, or use another --workdir",
    )


def _reason(error: BaseException) -> str:
    """Why a checkpoint failed to restore, short: the innermost cause (orbax wraps tensorstore's
    'OUT_OF_RANGE: Error reading ...' in a bare 'Encountered error while reading array index'),
    without the kilobytes of spec tensorstore appends."""
    seen = [error]
    while (cause := seen[-1].__cause__ or seen[-1].__context__) is not None and cause not in seen:
        seen.append(cause)
    root = seen[-1]
    text = " ".join(str(root).split("See full TensorStore details")[0].split())
    return f"{type(root).__name__}: {text[:240]}" if text else type(root).__name__


def restore_intact(mngr: ocp.CheckpointManager, target, stage: str):
    """(tree, meta, step, mngr) of the newest checkpoint that restores; None when there is none.

    Each checkpoint, newest first, is verified by restoring it (its metadata, then every array and the
    JSON meta, which must hold `data`). A damaged one is moved aside to `<checkpoints>_damaged/<step>`
    (not deleted) with a warning naming it and why, once an older intact one is found. When none is
    intact, NoIntactCheckpoint names them all and nothing is moved. A checkpoint whose arrays have
    other shapes than `target`'s is not damage: CheckpointMismatch names the arrays.
    Returns a fresh manager (the old one still lists the moved steps).
    """
    directory = Path(mngr.directory)
    damaged: list[tuple[int, str]] = []
    for step in sorted(mngr.all_steps(), reverse=True):
        folder = directory / str(step)
        try:
            _check_fits(folder, target)
        except CheckpointMismatch:
            raise
        except Exception as e:  # noqa: BLE001 (any failure to read the metadata: damaged)
            damaged.append((step, _reason(e)))
            continue
        try:
            with _quiet_on_failure():  # a damaged one leaves orbax's reader coroutines reporting it
                tree, meta, _ = restore(mngr, target, step)
            if "data" not in meta:
                raise KeyError("its meta has no data position")
        except Exception as e:  # noqa: BLE001 (any failure to restore it: damaged)
            damaged.append((step, _reason(e)))
            continue
        if damaged:
            mngr = _move_aside(mngr, damaged)
        return tree, meta, step, mngr
    if damaged:
        listed = "; ".join(f"{directory / str(step)}: {why}" for step, why in damaged)
        raise NoIntactCheckpoint(
            f"{stage}: no intact checkpoint to resume from ({listed}). Move {directory} away to run the stage "
            "from its start, or restore the files"
        )
    return None


def _move_aside(mngr: ocp.CheckpointManager, damaged: list[tuple[int, str]]) -> ocp.CheckpointManager:
    directory = Path(mngr.directory)
    aside = directory.with_name(directory.name + "_damaged")
    if is_main_process():
        aside.mkdir(exist_ok=True)
        for step, why in damaged:
            to = aside / str(step)
            n = 1
            while to.exists():
                to, n = aside / f"{step}.{n}", n + 1
            (directory / str(step)).rename(to)
            log.warning("checkpoint %s is damaged (%s): moved aside to %s", directory / str(step), why, to)
    sync("damaged checkpoints moved")
    keep = mngr._options.max_to_keep  # pylint: disable=protected-access
    mngr.close()
    return manager(directory, keep=keep)
