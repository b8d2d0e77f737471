"""Device meshes, logical-axis rules and the shardings of train states, batches and KV caches.

One mesh with axes `('data', 'fsdp', 'tensor')` serves every stage:

  data    pure data parallelism: the batch is split, parameters are replicated.
  fsdp    fully sharded data parallelism: the batch is split *and* parameters / optimizer state are
          split along their `embed` dimension (all-gathered per layer by XLA when used).
  tensor  tensor (model) parallelism: `mlp`, `heads`, `kv_heads` and `vocab` dimensions are split.

Every `nnx.Param` of the models carries `axes`, a tuple of logical names (rto_jax/models/layers.py).
A rule table maps each logical name to mesh axes; `logical_to_spec` turns a parameter's names into a
`PartitionSpec`. A logical name without a rule raises `ShardingRuleError` naming the parameter path
and the name, so a new layer cannot silently end up replicated.

    mesh = make_mesh(data=-1, fsdp=4, tensor=1)           # or mesh_from_config(config)
    state = create_sharded_train_state(lambda: CausalLM(cfg, nnx.Rngs(0)), tx, mesh)
    shardings = step_shardings(state, mesh)
    step = make_train_step(SFTLoss(), shardings=shardings)
    state, metrics = step(state, jax.device_put(batch, shardings.batch), rng)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from rto_jax.models import layers
from rto_jax.sampling import KV_CACHE_AXES

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axis (a name, a tuple of names, or None = replicated). `batch` is split over
# data x fsdp; parameters are split over fsdp along `embed` and over tensor along the wide dims.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("vocab", "tensor"),
    ("layers", None),  # the stacked-layers axis of scan_layers=True
    ("score", None),  # the scalar head's 1-wide output
    ("lora_rank", None),  # a low-rank adapter's rank (adapters shard along their kernel's other axis)
)

Rules = Sequence[tuple[str, Any]]


class ShardingRuleError(ValueError):
    """A logical axis without a rule, a rule naming an unknown mesh axis, or an indivisible dimension."""


# ----------------------------------------------------------------------------------------------
# Meshes.


def mesh_shape(data: int = -1, fsdp: int = 1, tensor: int = 1, num_devices: int | None = None) -> tuple[int, ...]:
    """(data, fsdp, tensor) with one -1 entry filled so the product is the device count."""
    num_devices = jax.device_count() if num_devices is None else num_devices
    shape = [int(data), int(fsdp), int(tensor)]
    if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
        raise ValueError(f"mesh (data={data}, fsdp={fsdp}, tensor={tensor}): sizes must be >= 1, at most one -1")
    if -1 in shape:
        known = math.prod(s for s in shape if s != -1)
        if num_devices % known:
            raise ValueError(f"mesh (data={data}, fsdp={fsdp}, tensor={tensor}): {num_devices} devices not divisible")
        shape[shape.index(-1)] = num_devices // known
    if math.prod(shape) != num_devices:
        raise ValueError(f"mesh {tuple(shape)} needs {math.prod(shape)} devices, there are {num_devices}")
    return tuple(shape)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Sequence[Any] | None = None) -> Mesh:
    """A ('data', 'fsdp', 'tensor') mesh over `devices` (default: all devices of all processes).

    Devices are laid out process-major (jax.devices() order, or the TPU topology-aware order of
    `jax.make_mesh`), so the batch rows of process i are contiguous: the layout that
    `host_local_batch_to_global` and `BatchIterator(process_index=...)` assume.
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(data, fsdp, tensor, len(devices))
    auto = (AxisType.Auto,) * 3  # shardings propagate through jit as before; no explicit-sharding mode
    if devices[0].platform == "tpu" and len(devices) == jax.device_count():
        return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)
    return Mesh(np.asarray(devices, dtype=object).reshape(shape), MESH_AXES, axis_types=auto)


def _get(config, key, default=None):
    if config is None:
        return default
    if isinstance(config, Mapping):
        return config.get(key, default)
    return getattr(config, key, default) if not hasattr(config, "get") else config.get(key, default)


def mesh_from_config(config=None, devices=None) -> Mesh:
    """The mesh of `config.mesh` (or of `config` itself when it has `data`/`fsdp`/`tensor` fields).

    Fields (all optional): `data` (default -1: the remaining devices), `fsdp` (1), `tensor` (1).
    With no config: pure data parallelism over every device.
    """
    section = _get(config, "mesh", config)
    return make_mesh(
        data=_get(section, "data", -1),
        fsdp=_get(section, "fsdp", 1),
        tensor=_get(section, "tensor", 1),
        devices=devices,
    )


# ----------------------------------------------------------------------------------------------
# Rules.


def make_rules(overrides: Mapping[str, Any] | str | None = None, base: Rules = DEFAULT_RULES) -> tuple:
    """`base` with some logical names remapped: {'vocab': None} or the string 'vocab=,mlp=tensor,batch=data+fsdp'."""
    if not overrides:
        return tuple(base)
    if isinstance(overrides, str):
        parsed = {}
        for item in filter(None, (s.strip() for s in overrides.split(","))):
            name, sep, axes = item.partition("=")
            if not sep:
                raise ValueError(
                    f"sharding rule {item!r}: expected 'logical=mesh_axis[+mesh_axis]' (empty: replicated)"
                )
            axes = tuple(a for a in axes.strip().split("+") if a)
            parsed[name.strip()] = None if not axes else axes[0] if len(axes) == 1 else axes
        overrides = parsed
    table = dict(base)
    table.update(overrides)
    return tuple(table.items())


def _rule_table(rules: Rules, mesh: Mesh | None) -> dict[str, tuple[str, ...]]:
    table = {}
    for name, axes in rules:
        axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
        if mesh is not None:
            for axis in axes:
                if axis not in mesh.axis_names:
                    raise ShardingRuleError(f"rule {name!r} -> {axis!r}: not a mesh axis {mesh.axis_names}")
        table[name] = axes
    return table


def logical_to_spec(
    names: Sequence[str | None],
    rules: Rules = DEFAULT_RULES,
    *,
    shape: Sequence[int] | None = None,
    mesh: Mesh | None = None,
    path: str = "",
    strict: bool = True,
) -> P:
    """PartitionSpec of an array whose dimensions have logical `names` (None: replicated dimension).

    A mesh axis serves at most one dimension: a later dimension mapped to an axis already used loses it
    (activations `('batch', 'length', 'embed')` keep fsdp on the batch). With `shape` and `mesh`, each
    dimension must be divisible by its mesh axes' size; `strict=False` replicates such a dimension instead
    of raising (used for KV caches and activation constraints, whose head counts may be small).
    """
    table = _rule_table(rules, mesh)
    used: set[str] = set()
    spec = []
    for i, name in enumerate(names):
        if name is None:
            spec.append(None)
            continue
        if name not in table:
            where = f"{path}: " if path else ""
            raise ShardingRuleError(
                f"{where}logical axis {name!r} matches no sharding rule (rules: {', '.join(table)}); add it to the rules"
            )
        axes = tuple(a for a in table[name] if a not in used)
        if shape is not None and mesh is not None and axes:
            size = math.prod(mesh.shape[a] for a in axes)
            if shape[i] % size:
                if strict:
                    raise ShardingRuleError(
                        f"{path or 'array'}: dimension {i} ({name!r}, size {shape[i]}) is not divisible by mesh axes "
                        f"{axes} (size {size}); change the mesh or the rule for {name!r}"
                    )
                axes = ()
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    while spec and spec[-1] is None:
        spec.pop()
    return P(*spec)


# ----------------------------------------------------------------------------------------------
# Shardings of pytrees.


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def tree_shardings(tree, mesh: Mesh, rules: Rules = DEFAULT_RULES):
    """NamedShardings for every array of `tree` (a TrainState, PPOState, nnx.State, optax state, ...).

    An `nnx.Variable` with `axes` metadata (parameters, and the Adam moments that optax builds with
    the same Variables) is sharded by the rules; other leaves (step, Adam count, score statistics)
    are replicated. A Variable without `axes` is an error: every parameter must be annotated.
    The result has `tree`'s structure (Variables keep their metadata and hold the sharding), so it
    works as jit in/out_shardings and zips with `tree` (`abstract_tree`).
    """
    replicated = NamedSharding(mesh, P())
    _rule_table(rules, mesh)  # unknown mesh axes fail even if no array uses the rule

    def one(path, leaf):
        if _is_variable(leaf):
            axes = leaf.get_metadata().get("axes")
            if axes is None:
                raise ShardingRuleError(f"{jax.tree_util.keystr(path)}: {type(leaf).__name__} has no `axes` metadata")
            shape = leaf.get_value().shape
            if len(axes) != len(shape):
                raise ShardingRuleError(f"{jax.tree_util.keystr(path)}: axes {axes} do not match the shape {shape}")
            spec = logical_to_spec(axes, rules, shape=shape, mesh=mesh, path=jax.tree_util.keystr(path))
            return leaf.replace(NamedSharding(mesh, spec))
        return replicated

    return jax.tree_util.tree_map_with_path(one, tree, is_leaf=_is_variable)


state_shardings = tree_shardings


def batch_sharding(mesh: Mesh, rules: Rules = DEFAULT_RULES) -> NamedSharding:
    """Rows split over the `batch` rule's mesh axes (data x fsdp), other dims replicated.

    One sharding for a whole batch dict (a pytree prefix): every array's first dim is its batch dim,
    which must be divisible by data * fsdp.
    """
    return NamedSharding(mesh, logical_to_spec(("batch",), rules, mesh=mesh))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def kv_cache_shardings(cache, mesh: Mesh, rules: Rules = DEFAULT_RULES):
    """Shardings of a KV cache from `init_cache` (arrays or ShapeDtypeStructs): batch over data x fsdp,
    kv heads over tensor (replicated when num_kv_heads is not divisible by it), layers/slots/dims whole."""

    def one(x):
        names = KV_CACHE_AXES[-x.ndim :]
        return NamedSharding(mesh, logical_to_spec(names, rules, shape=x.shape, mesh=mesh, strict=False))

    return jax.tree.map(one, cache)


def abstract_tree(tree, shardings):
    """`jax.ShapeDtypeStruct`s carrying `shardings` for the arrays of `tree`: an orbax restore target
    (the same structure on another mesh restores re-sharded)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def put(x, sharding: NamedSharding):
    """One array (host, single-device or global) placed with `sharding`; in a multi-process run every
    process passes the same value and builds only its own devices' shards from it."""
    if isinstance(x, jax.Array) and x.sharding == sharding:
        return x
    if sharding.is_fully_addressable or (isinstance(x, jax.Array) and not x.is_fully_addressable):
        return jax.device_put(x, sharding)  # host -> devices, or a global array resharded
    # Multi-process: every process holds the same value and builds only its own shards from it.
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def shard_tree(tree, mesh: Mesh, rules: Rules = DEFAULT_RULES):
    """`tree` (host or single-device arrays, the same on every process) placed by `tree_shardings`.

    Each device receives only its slices. For models too big for one host's memory, create them
    sharded instead (`create_sharded_train_state` with a model function, or an orbax restore).
    """
    return jax.tree.map(put, tree, tree_shardings(tree, mesh, rules))


# ----------------------------------------------------------------------------------------------
# Activation constraints used while tracing a sharded step (see rto_jax.models.layers.constrain).


def activation_constrainer(mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Callable:
    """`fn(x, logical_names) -> x` pinning an activation's sharding (non-strict: indivisible dims stay whole)."""

    def constrain(x, names):
        names = tuple(names)[-x.ndim :] if len(names) >= x.ndim else (None,) * (x.ndim - len(names)) + tuple(names)
        spec = logical_to_spec(names, rules, shape=x.shape, mesh=mesh, strict=False)
        return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))

    return constrain


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity: usable as an lru_cache key
class StepShardings:
    """What a step factory needs to jit with explicit shardings.

    state: the state's sharding tree (`tree_shardings`), also the donated output's; batch: the batch
    prefix sharding; replicated: rng, metrics and scalars.
    """

    mesh: Mesh
    state: Any
    batch: NamedSharding
    replicated: NamedSharding
    rules: tuple = DEFAULT_RULES

    def traced(self, fn: Callable) -> Callable:
        """`fn` with the activation constraints of this mesh active while it is traced."""
        constrain = activation_constrainer(self.mesh, self.rules)

        def wrapped(*args):
            with layers.activation_constraint(constrain):
                return fn(*args)

        return wrapped


def step_shardings(state, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> StepShardings:
    """StepShardings for a state (arrays or ShapeDtypeStructs: only structure, shapes and metadata are read)."""
    rules = tuple(rules)
    return StepShardings(mesh, tree_shardings(state, mesh, rules), batch_sharding(mesh, rules), replicated(mesh), rules)


def jit_step(
    fn: Callable, shardings: StepShardings | None, *, batch_out: bool = False, donate: bool = True, extra_args: int = 0
):
    """`jax.jit` of `fn(state, batch, rng, *extra) -> (state or batch-like, metrics)` (`extra_args` more
    arguments, e.g. a token reward's coefficients); with shardings, explicit in/out shardings (the extra
    arguments replicated; outputs: the state's, or the batch's when `batch_out`, plus replicated metrics)."""
    donate_argnums = 0 if donate else ()
    if shardings is None:
        return jax.jit(fn, donate_argnums=donate_argnums)
    s = shardings
    first_out = s.batch if batch_out else s.state
    return jax.jit(
        s.traced(fn),
        in_shardings=(s.state, s.batch, s.replicated) + (s.replicated,) * extra_args,
        out_shardings=(first_out, s.replicated),
        donate_argnums=donate_argnums,
    )


# ----------------------------------------------------------------------------------------------
# Creating states sharded.


def sharded_init(fn: Callable, mesh: Mesh, rules: Rules = DEFAULT_RULES, *args):
    """`fn(*args)` run under jit with `out_shardings` from its abstract output: every device computes only
    its own shards, so no full copy of the result ever sits on one device. Returns (tree, shardings)."""
    abstract = jax.eval_shape(fn, *args)
    shardings = tree_shardings(abstract, mesh, rules)
    return jax.jit(fn, out_shardings=shardings)(*args), shardings


def create_sharded_train_state(model, tx, mesh: Mesh, rules: Rules = DEFAULT_RULES, frozen: Any = None):
    """A TrainState whose parameters and optimizer state are sharded over `mesh`.

    model: a zero-argument function building the nnx module (its parameters are then initialized
    directly sharded), or an existing module (its parameters are placed shard by shard, then the
    optimizer state is created sharded). `frozen` (e.g. {'ref': params}) is placed by the same rules.
    """
    from rto_jax.train.state import TrainState

    if isinstance(model, nnx.Module):
        graphdef, params = nnx.split(model)
        params = shard_tree(params, mesh, rules)

        def init(p):
            return TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p), graphdef=graphdef, tx=tx)

        abstract = jax.eval_shape(init, params)
        # Donated: the parameters pass through, so they are not held twice.
        state = jax.jit(init, out_shardings=tree_shardings(abstract, mesh, rules), donate_argnums=0)(params)
    else:
        state, _ = sharded_init(lambda: TrainState.create(model(), tx), mesh, rules)
    if frozen is not None:
        state = state.replace(frozen=shard_tree(frozen, mesh, rules))
    return state
