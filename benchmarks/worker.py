"""Worker process: `python -m benchmarks.worker ROWS.json RESULTS.json` runs rows of one backend in order.

Imports only that backend's framework, so JAX rows never pay for torch's memory and vice versa. The
results file is rewritten after every row, so a row that crashes or times out keeps the ones before it.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
import traceback

from benchmarks.timing import Unavailable  # framework-free: safe before the backend's import


def _write(path: str, results: list[dict]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(results, f)
    os.replace(tmp, path)


def _out_of_memory(error: BaseException) -> bool:
    """XLA's RESOURCE_EXHAUSTED or torch's CUDA out-of-memory error."""
    return "RESOURCE_EXHAUSTED" in str(error) or type(error).__name__ == "OutOfMemoryError"


def main(argv: list[str]) -> int:
    rows_path, out_path = argv
    with open(rows_path) as f:
        rows = json.load(f)
    backends = {row["backend"] for row in rows}
    if len(backends) != 1:
        raise ValueError(f"one backend per worker, got {sorted(backends)}")
    if backends == {"jax"}:
        from benchmarks import jax_rows as runner
    elif backends == {"tunix"}:
        from benchmarks import tunix_rows as runner
    else:
        from benchmarks import torch_rows as runner
    results = []
    for row in rows:
        start = time.perf_counter()
        try:
            result = {"status": "ok", **runner.RUNNERS[row["kind"]](row)}
        except (ModuleNotFoundError, Unavailable) as e:  # an optional peer (TRL, tunix) not installed; no GPU
            result = {"status": "unavailable", "reason": f"{type(e).__name__}: {e}"}
        except Exception as e:  # noqa: BLE001 - a failing row is reported, the others still run
            if _out_of_memory(e):  # a row that does not fit the device is a finding (xla's scores at 8k tokens)
                result = {"status": "unavailable", "reason": f"out of memory: {type(e).__name__}: {str(e)[:300]}"}
            else:
                tail = traceback.format_exc().strip().splitlines()[-6:]
                result = {"status": "error", "reason": f"{type(e).__name__}: {e}", "traceback": tail}
        result["id"] = row["id"]
        result["device"] = runner.device_kind()
        result["wall_s"] = time.perf_counter() - start
        # ru_maxrss is in KiB on Linux: the peak of this process so far (so of this row when it runs alone).
        result["self_maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        # On an accelerator: the device memory's peak (of this process so far; None on a CPU).
        device_peak = getattr(runner, "device_peak_mb", None)
        result["device_peak_mb"] = device_peak() if device_peak is not None else None
        results.append(result)
        _write(out_path, results)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
