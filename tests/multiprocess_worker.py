"""One process of a two-process jax.distributed run on 127.0.0.1 (CPU, gloo collectives).

    python tests/multiprocess_worker.py --process_id 0 --num_processes 2 --port 12345 --out results.npz

Each process has one CPU device; together they form a (data=1, fsdp=2, tensor=1) mesh, so parameters,
optimizer state and batches are split across the processes. Each process loads only its rows of
every batch; process 0 writes
the gathered results (DPO step, PPO rollout + update) to `--out` for tests/test_multiprocess.py to
compare with the single-process run.
"""

from __future__ import annotations

import os

os.environ["JAX_PLATFORMS"] = "cpu"

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import numpy as np

from rto_jax import distributed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--process_id", type=int, required=True)
    parser.add_argument("--num_processes", type=int, default=2)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--cases", default="dpo,ppo")
    args = parser.parse_args()
    config = {
        "distributed": {
            "coordinator_address": f"127.0.0.1:{args.port}",
            "num_processes": args.num_processes,
            "process_id": args.process_id,
        }
    }
    assert distributed.init_distributed(config)
    assert jax.process_index() == args.process_id and jax.device_count() == args.num_processes

    import sharding_cases as cases  # imports jax-using modules only after initialize

    from rto_jax.train import sharding

    mesh = sharding.make_mesh(data=1, fsdp=args.num_processes, tensor=1)
    results = {}
    for name in args.cases.split(","):
        result = cases.CASES[name](mesh)
        for key, value in result.items():
            if key == "params":
                results.update({f"{name}/params/{i}": v for i, v in enumerate(value)})
            else:
                results[f"{name}/{key}"] = np.asarray(value)
    if distributed.is_main_process():
        np.savez(args.out, **results)
    distributed.sync("done")
    print(f"process {args.process_id}: ok", flush=True)


if __name__ == "__main__":
    main()
