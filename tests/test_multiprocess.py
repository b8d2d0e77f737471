"""Two processes on 127.0.0.1 with jax.distributed (CPU gloo collectives) match one process.

tests/multiprocess_worker.py runs in two subprocesses (one CPU device each, mesh fsdp=2 across the
processes: parameters, optimizer state and batch rows split between them, each process loading only
its rows); this process computes the same DPO step and PPO rollout + update on its single device.
"""

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from rto_jax import distributed

HERE = Path(__file__).resolve().parent
TOLERANCE = 1e-5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_two_processes(tmp_path) -> dict:
    out = tmp_path / "results.npz"
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env["XLA_FLAGS"] = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"  # faster compiles
    logs = [tmp_path / f"process_{i}.log" for i in range(2)]
    procs = []
    for i, log in enumerate(logs):
        command = [sys.executable, str(HERE / "multiprocess_worker.py"), "--process_id", str(i), "--port", str(port)]
        with open(log, "w") as f:  # a file, not a pipe: a full pipe buffer would stall the collectives
            procs.append(
                subprocess.Popen(
                    [*command, "--num_processes", "2", "--out", str(out)], env=env, stdout=f, stderr=subprocess.STDOUT
                )
            )
    try:
        for p in procs:
            p.wait(timeout=420)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()  # only our own workers, by handle
    for i, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"process {i} failed:\n{log.read_text()[-4000:]}"
    with np.load(out) as data:
        return dict(data)


def _unpack(results: dict, case: str) -> dict:
    out = {k.split("/", 1)[1]: v for k, v in results.items() if k.startswith(case + "/") and "/params/" not in k}
    count = sum(1 for k in results if k.startswith(f"{case}/params/"))
    out["params"] = [results[f"{case}/params/{i}"] for i in range(count)]
    return out


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    """A DPO step and a PPO rollout + update on 2 processes x 1 device equal this process's single device."""
    from tests import sharding_cases as cases

    results = _run_two_processes(tmp_path)
    failures = []
    for case in ("dpo", "ppo"):
        multi = _unpack(results, case)
        assert multi["params"], f"{case}: no parameters came back"
        for key, value in cases.max_differences(cases.CASES[case](), multi).items():
            if key == "tokens" and value is not True:
                failures.append(f"{case}: greedy rollout tokens differ between one and two processes")
            elif key != "tokens" and value > TOLERANCE:
                failures.append(f"{case}/{key}: two processes differ from one by {value}")
    assert not failures, "\n".join(failures)


def test_distributed_settings_from_config_and_environment(monkeypatch):
    for name in ("RTO_JAX_COORDINATOR_ADDRESS", "JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("TPU_WORKER_HOSTNAMES", raising=False)
    assert distributed.distributed_settings(None) is None
    assert distributed.distributed_settings({"distributed": {"coordinator_address": ""}}) is None
    config = {"distributed": {"coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 3}}
    assert distributed.distributed_settings(config) == {
        "coordinator_address": "10.0.0.1:1234",
        "num_processes": 4,
        "process_id": 3,
    }
    monkeypatch.setenv("RTO_JAX_COORDINATOR_ADDRESS", "host0:8476")
    monkeypatch.setenv("RTO_JAX_NUM_PROCESSES", "2")
    monkeypatch.setenv("RTO_JAX_PROCESS_ID", "1")
    assert distributed.distributed_settings(None) == {
        "coordinator_address": "host0:8476",
        "num_processes": 2,
        "process_id": 1,
    }
    monkeypatch.delenv("RTO_JAX_PROCESS_ID")
    with pytest.raises(ValueError, match="process_id"):
        distributed.distributed_settings(None)
    monkeypatch.delenv("RTO_JAX_COORDINATOR_ADDRESS")
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "w0,w1,w2,w3")
    assert distributed.distributed_settings(None) == {}  # jax.distributed detects the TPU slice itself


def test_single_process_helpers():
    import jax
    import jax.numpy as jnp

    from rto_jax.train import sharding

    assert distributed.is_main_process()
    assert distributed.process_slice() == {"process_index": 0, "process_count": 1}
    rows = np.arange(12).reshape(6, 2)
    np.testing.assert_array_equal(distributed.process_rows(rows, 1, 3), rows[2:4])
    mesh = sharding.make_mesh()
    batch = distributed.host_local_batch_to_global({"x": rows}, sharding.batch_sharding(mesh))
    assert isinstance(batch["x"], jax.Array) and jnp.array_equal(batch["x"], rows)
