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

import os
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp


def manager(directory: str | os.PathLike, keep: int = 2) -> ocp.CheckpointManager:
    """A CheckpointManager keeping the last `keep` steps under `directory` (created if missing)."""
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False)
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
    """Writes checkpoint `step` (overwriting nothing: orbax refuses an existing step) and waits for it."""
    args = ocp.args.Composite(state=ocp.args.StandardSave(to_nested(tree)), meta=ocp.args.JsonSave(dict(meta)))
    mngr.save(int(step), args=args, force=True)
    mngr.wait_until_finished()


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
