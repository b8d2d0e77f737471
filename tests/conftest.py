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

# One persistent XLA compilation cache for the whole run: the test workers and every process a test
# starts (they inherit the environment) share it. Many modules compile the same small programs (the
# same tiny model's steps, a study's PPO programs across seeds) and each module drops its compiled
# programs when it ends (below), so later modules read them from disk instead of compiling again. The
# process that makes the folder (pytest's main process, before it starts workers) removes it at exit;
# a JAX_COMPILATION_CACHE_DIR set by the caller is used as it is and kept.
import atexit  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache_dir = tempfile.mkdtemp(prefix="rto_jax_test_xla_cache_")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache_dir
    atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)
# Programs that compile in under a tenth of a second cost more to look up than to compile.
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.1")

# ----------------------------------------------------------------------------------------------
# The offline sample data (../shared/data beside the repository, or $RTO_JAX_SHARED_DATA): tests
# marked `@pytest.mark.needs_shared_data` (e.g. everything that builds a `:tiny` TL;DR preset, which
# reads it) skip, naming the folder, where a clone has no such folder.

import pytest  # noqa: E402  (after XLA_FLAGS, which must be set before anything imports JAX)

SHARED_FILES = ("tldr_sft_oai1b.csv", "tldr_comparisons_10k.parquet", "hh_rlhf_harmless_test.jsonl.gz")


def shared_data_skip_reason() -> str | None:
    """Why a test that reads the offline samples cannot run here (None: every file is there)."""
    from rto_jax.pipeline.config import shared_data_dir  # noqa: PLC0415  (imports JAX: after XLA_FLAGS)

    folder = shared_data_dir()
    missing = [name for name in SHARED_FILES if not (folder / name).is_file()]
    if not missing:
        return None
    return (
        f"needs the offline sample data in {folder} (missing {', '.join(missing)}): put ../shared/data "
        "beside the repository or set RTO_JAX_SHARED_DATA"
    )


def pytest_configure(config):
    config.addinivalue_line("markers", "needs_shared_data: reads the offline samples (skipped where they are absent)")


def pytest_runtest_setup(item):
    if item.get_closest_marker("needs_shared_data") is not None and (reason := shared_data_skip_reason()):
        pytest.skip(reason)


# ----------------------------------------------------------------------------------------------
# Scheduling under `make test` (pytest-xdist, `--dist loadfile --no-loadscope-reorder`): each module runs
# whole on one worker, so its module-scoped fixtures (a study at toy sizes, a trained pipeline, a sharded
# run) are built once, not once on each worker that happens to receive one of its tests; and the slowest
# modules start first, so that neither worker is left running one of them alone at the end. The order is
# measured (`--durations=0` summed per module, 2026-12-07, seconds on a 2-core VM; test_sharding's is that
# run's 161 less what its mesh test saved in the next, 143 -> 102 s, once its step variants ran on one
# mesh); the rest follow in collection order.
SLOWEST_MODULES_FIRST = (
    "test_synthetic_study.py",  # 186 (its study_smoke fixture: 172)
    "test_pipeline_sharded.py",  # 157
    "test_sharding.py",  # 120
    "test_benchmarks.py",  # 99
    "test_train.py",  # 94
    "test_smollm2_preset.py",  # 94
    "test_critic_free_pipeline.py",  # 65
    "test_synthetic_benchmark.py",  # 65
)


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(SLOWEST_MODULES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: collection order otherwise


# ----------------------------------------------------------------------------------------------
# Compiled programs. Each compiled XLA program holds ~30 memory maps while it is cached; a test worker
# that runs hundreds of modules reached the kernel's vm.max_map_count (65530) and segfaulted in the
# next compile (CI, December 2026: 52,000 maps in one worker). After each module: the stages' step
# caches and JAX's compiled programs are released (the next module compiles its own).


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    yield
    import gc  # noqa: PLC0415

    import jax  # noqa: PLC0415

    from rto_jax.pipeline import stages  # noqa: PLC0415

    stages.clear_step_caches()
    jax.clear_caches()
    gc.collect()
