"""Wall-clock timing shared by the workers (framework-free: each worker passes its own `sync`)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def measure(fn: Callable[[], object], warmup: int, reps: int, sync: Callable[[object], object] = lambda x: x) -> dict:
    """Runs `fn` warmup + reps times; `sync(result)` blocks until the work is done (JAX is asynchronous).

    The first call (which compiles, for JAX) is reported separately as `first_s`; the median of the
    `reps` timed calls after warm-up is the figure every row reports.
    """
    times = []
    first = None
    for i in range(max(warmup, 1) + reps):
        start = time.perf_counter()
        sync(fn())
        elapsed = time.perf_counter() - start
        if i == 0:
            first = elapsed
        if i >= max(warmup, 1):
            times.append(elapsed)
    return {"first_s": first, "times_s": times, "median_s": statistics.median(times)}


class Unavailable(Exception):
    """A row this machine cannot run (e.g. cuDNN attention without a GPU): reported as `unavailable`, as an
    optional peer that is not installed, rather than as an error."""
