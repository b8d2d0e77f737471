"""Multi-process (multi-host) runs: `jax.distributed` start-up, process roles and per-process data.

JAX runs one Python process per host (TPU VM worker, GPU node, or one per GPU); every process runs
the same program and together they see all devices of the mesh. Each process loads only its own
rows of every global batch (`BatchIterator(process_index=..., process_count=...)`) and
`host_local_batch_to_global` assembles the global, sharded batch from them. Only process 0 writes
logs and files (`is_main_process()`); orbax checkpoints are written collectively (every process
calls save, each writes its own shards, process 0 the metadata).

    init_distributed(config)            # before anything touches a device
    it = BatchIterator(arrays, batch_size, process_index=jax.process_index(),
                       process_count=jax.process_count())
    batch = host_local_batch_to_global(next(it), shardings.batch)
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

# Our own variables, then the names JAX's own cluster detection reads. Set all three to start a
# run by hand (e.g. on a GPU cluster without SLURM or Open MPI): see docs/scaling.md#gpu-clusters.
ENV_COORDINATOR = ("RTO_JAX_COORDINATOR_ADDRESS", "JAX_COORDINATOR_ADDRESS")
ENV_NUM_PROCESSES = ("RTO_JAX_NUM_PROCESSES", "JAX_NUM_PROCESSES")
ENV_PROCESS_ID = ("RTO_JAX_PROCESS_ID", "JAX_PROCESS_ID")

_initialized = False


def _field(config, key):
    if config is None:
        return None
    if isinstance(config, Mapping):
        return config.get(key)
    return config.get(key) if hasattr(config, "get") else getattr(config, key, None)


def _env(names):
    for name in names:
        if os.environ.get(name):
            return os.environ[name]
    return None


def _cluster_detected() -> bool:
    """Several processes started by a launcher that jax.distributed.initialize() detects by itself."""
    env = os.environ
    return (
        "," in env.get("TPU_WORKER_HOSTNAMES", "")  # a multi-worker TPU VM slice
        or int(env.get("SLURM_NTASKS", "1") or 1) > 1
        or int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1
    )


def distributed_settings(config=None) -> dict[str, Any] | None:
    """The coordinator address, process count and id from `config.distributed` (or `config`), else from
    the environment; {} when only auto-detection applies (SLURM, Open MPI, multi-worker TPU VMs);
    None for a single-process run.

    Fields read: `coordinator_address` ('host:port' of process 0), `num_processes`, `process_id`,
    `local_device_ids` (optional, e.g. '0' for one GPU per process), `auto` (True: call
    jax.distributed.initialize() with JAX's cluster detection even without the variables above;
    also `RTO_JAX_DISTRIBUTED=auto`, which experiments/launch_tpu.py sets on every TPU worker).
    """
    section = _field(config, "distributed") if _field(config, "distributed") is not None else config
    address = _field(section, "coordinator_address") or _env(ENV_COORDINATOR)
    num = _field(section, "num_processes") or _env(ENV_NUM_PROCESSES)
    pid = _field(section, "process_id")
    pid = _env(ENV_PROCESS_ID) if pid is None or pid == -1 else pid
    local = _field(section, "local_device_ids")
    if address:
        if num is None or pid is None:
            raise ValueError(
                f"coordinator_address={address!r} needs num_processes and process_id "
                f"(config.distributed.* or ${ENV_NUM_PROCESSES[0]} / ${ENV_PROCESS_ID[0]})"
            )
        settings = {"coordinator_address": str(address), "num_processes": int(num), "process_id": int(pid)}
        if local not in (None, ""):
            settings["local_device_ids"] = [int(i) for i in str(local).split(",")] if isinstance(local, str) else local
        return settings
    if _field(section, "auto") or os.environ.get("RTO_JAX_DISTRIBUTED") == "auto" or _cluster_detected():
        return {}
    return None


def init_distributed(config=None) -> bool:
    """Starts `jax.distributed` when the config or environment asks for several processes.

    Must run before any JAX computation. On CPU the cross-process collectives use gloo. Returns True
    when this is (now) a multi-process run. Calling it again is a no-op.
    """
    global _initialized
    if _initialized:
        return jax.process_count() > 1
    settings = distributed_settings(config)
    if settings is None:
        return False
    # Cross-process collectives of the CPU backend (tests, CPU clusters); GPU/TPU backends ignore it.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**settings)
    _initialized = True
    return jax.process_count() > 1


def is_main_process() -> bool:
    """True on the process that writes logs, metrics files and exports (process 0)."""
    return jax.process_index() == 0


def process_slice() -> dict[str, int]:
    """`process_index` and `process_count` keyword arguments for `BatchIterator` (this process's rows)."""
    return {"process_index": jax.process_index(), "process_count": jax.process_count()}


def process_rows(array, process_index: int | None = None, process_count: int | None = None):
    """This process's contiguous slice of a global batch's rows (what BatchIterator hands each process)."""
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    rows = array.shape[0]
    if rows % count:
        raise ValueError(f"batch of {rows} rows does not split over {count} processes")
    local = rows // count
    return array[index * local : (index + 1) * local]


def host_local_batch_to_global(batch, sharding):
    """Global arrays from each process's rows: `jax.make_array_from_process_local_data` per leaf.

    batch: a pytree of host arrays `[B_local, ...]` (this process's rows, in process order);
    sharding: the batch sharding (rows over data x fsdp; `rto_jax.train.sharding.batch_sharding`).
    Returns arrays of global shape `[B_local * process_count, ...]`. Single-process: a device_put.
    """
    if jax.process_count() == 1:
        return jax.device_put(batch, sharding)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)


def to_host(tree):
    """Numpy copies of a pytree's arrays, whole on every process.

    An array split across processes (a parameter sharded over a multi-host mesh, a batch-sharded
    output) is all-gathered, so every process must call this together; arrays this process holds
    whole (single-process runs, replicated outputs, local models) are copied without communication.
    """

    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
            from jax.experimental import multihost_utils

            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x)

    return jax.tree.map(one, tree)


def sync(name: str = "rto_jax") -> None:
    """A barrier across processes (no-op with one), e.g. before process 0 reads files the others wrote."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def any_process(flag: bool) -> bool:
    """Whether `flag` is true on any process (every process calls it together; no-op with one), e.g. a
    stop request that only one host received: all processes must stop at the same step."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils

    return bool(np.max(multihost_utils.process_allgather(np.int32(flag))))
