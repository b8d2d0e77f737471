"""Process-wide behaviour every entry point gets from `import rto_jax`.

Memory after XLA compilations: compiling a large program (a 135M model's unrolled training step)
allocates about a gigabyte in many small blocks on glibc's heap. Freed, those blocks stay in the
process, and the step's buffers, which XLA takes in large blocks outside that heap, are added on top:
at SmolLM2-135M's PPO update (4 x 256) the peak RSS was 8.16 GB with 3.0 GB of state and 3.6 GB of
XLA temporaries. Returning the freed heap to the system after each long compile (`malloc_trim`)
took it to 7.52 GB, PyTorch's peak on the same update (docs/performance.md#memory).
"""

from __future__ import annotations

import ctypes
import sys

import jax

# The event JAX records after each backend compilation (jax._src.dispatch.BACKEND_COMPILE_EVENT); a
# test checks that compiling still records it.
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
# Shorter compiles leave little behind; the trim itself walks the heap (milliseconds).
TRIM_AFTER_COMPILE_SECONDS = 1.0

_installed = False


def malloc_trim():
    """glibc's `malloc_trim`, or None where there is none (macOS, musl)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return getattr(ctypes.CDLL("libc.so.6"), "malloc_trim", None)
    except OSError:
        return None


def release_memory_after_compiles(min_seconds: float = TRIM_AFTER_COMPILE_SECONDS) -> bool:
    """After every XLA compilation of at least `min_seconds`, hands the heap memory freed since back to the
    system. Idempotent; False where the C library has no `malloc_trim`."""
    global _installed
    trim = malloc_trim()
    if trim is None:
        return False
    if not _installed:

        def listener(event: str, duration_secs: float, **_metadata) -> None:
            if event == COMPILE_EVENT and duration_secs >= min_seconds:
                trim(0)

        jax.monitoring.register_event_duration_secs_listener(listener)
        _installed = True
    return True
