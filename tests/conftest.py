"""Test-wide settings, applied before any test module imports JAX.

XLA's CPU backend compiles much faster without its expensive optimization passes (about half the
suite's CPU time is compilation of small programs); the programs compute the same functions, and
every comparison in the suite is within one set of flags or within a float tolerance. Tests that
start their own processes set the same flags there (test_multiprocess, test_sharding,
test_pipeline_sharded). Speed is measured by `make bench`, never here.
"""

import os

FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + FAST_COMPILE).strip()
