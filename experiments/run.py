"""Runs an experiment: `python experiments/run.py --config=configs/rto_tldr.py:tiny --workdir=/tmp/run`.

Any config field can be overridden: `--config.ppo.lr=1e-6`, `--config.stages=ppo,evaluate`.
Restarting the same command resumes: finished stages are skipped, an interrupted stage continues
from its last checkpoint.

A mistake of the user's (an unknown override key, a bad value, a data file that cannot be read, a
model that cannot be had, another run holding the workdir, a config that differs from the one the
workdir's work was done with) is one line on stderr and exit status 2, and a workdir this command
created is removed again if no work was done in it; a full disk is one line naming the file and
the stage/step, exit status 74, with the last checkpoint intact; anything else is a bug and keeps
its traceback. SIGTERM (a preemptible
VM's notice) or Ctrl-C during a training stage finishes the step in flight, writes a checkpoint,
says where, and exits with status 75; the same command resumes.
"""

import logging
import os
import shutil
import sys
from pathlib import Path

# `experiments` and `configs` are packages of the repository root (recipes import `from experiments
# import rto`, configs `from configs import rto_tldr`): the root goes on sys.path instead of this
# script's folder, so that no recipe is also importable as a top-level module of another name.
_REPO_ROOT = str(Path(__file__).resolve().parents[1])
if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path[0] = _REPO_ROOT
elif _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from rto_jax.distributed import init_distributed, is_main_process
from rto_jax.errors import StorageError, UserError
from rto_jax.pipeline import run
from rto_jax.pipeline.loop import PREEMPTED_EXIT_STATUS, Preempted
from rto_jax.pipeline.config import validate, with_reused_models
from rto_jax.pipeline.overrides import RecipeOverrides, check_overrides, split_recipe_overrides
from rto_jax.pipeline.recipes import REPO_ROOT, import_file
from rto_jax.pipeline.workdir import WorkdirInUse

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/NAME.py[:preset]", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "run folder (checkpoints, metrics, models, results)", required=True)
_DRY_RUN = flags.DEFINE_bool(
    "dry_run", False, "validate the config (with every override applied), print it as JSON and exit: no work"
)
# --config.recipe and --config.ppo.reward_args.* of this command line (applied by main, after absl's).
_RECIPE_OVERRIDES = RecipeOverrides()


STORAGE_EXIT_STATUS = 74  # EX_IOERR


def _fail(message: str, status: int = 2):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(status)


HELP_FLAGS = ("--help", "-h", "-?", "--helpshort")


def config_listing(folder: Path = REPO_ROOT / "configs") -> str:
    """Every config file of `folder` with its first docstring line and its presets (`PRESETS`; the first
    is the default), as `--help` prints them."""
    lines = ["configs (--config=configs/NAME.py[:PRESET]):"]
    for path in sorted(folder.glob("*.py")):
        if path.name.startswith("_"):
            continue
        module = import_file(path, "rto_jax_config_")
        summary = " ".join((module.__doc__ or "").strip().split("\n\n")[0].split())
        presets = list(getattr(module, "PRESETS", ()))
        listed = ", ".join(f"{p} (default)" if i == 0 else p for i, p in enumerate(presets)) or "see the file"
        lines.append(f"  configs/{path.name}: {summary}")
        lines.append(f"      presets: {listed}")
    return "\n".join(lines)


def _print_help():
    print((__doc__ or "").strip())
    print()
    print(config_listing())
    print()
    print("flags:")
    for flag in (_CONFIG, _WORKDIR, _DRY_RUN):
        print(f"  --{flag.name}: {flags.FLAGS[flag.name].help}")
    print("  --config.KEY=VALUE: any field of rto_jax/pipeline/config.py:base_config (e.g. --config.ppo.lr=1e-6)")


def parse_flags(argv):
    """absl's flag parsing, with bad config files, presets and override keys as one-line errors.
    `--help` lists the flags, the config files and their presets, and exits 0."""
    global _RECIPE_OVERRIDES
    if any(arg in HELP_FLAGS for arg in argv[1:]):
        _print_help()
        sys.exit(0)
    try:
        check_overrides(argv)  # unknown keys: named, with the nearest valid ones
        rest, _RECIPE_OVERRIDES = split_recipe_overrides(argv)
        return flags.FLAGS(rest)
    except UserError as e:
        _fail(str(e))
    except flags.Error as e:
        _fail(" ".join(str(e).split()))


def main(argv):
    del argv
    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every save at INFO
    logging.getLogger("rto_jax").setLevel(logging.INFO)
    config, workdir = _CONFIG.value, _WORKDIR.value
    if "://" in workdir:  # every file the pipeline writes goes through the local filesystem
        _fail(
            f"--workdir={workdir}: URLs are not supported; mount the bucket (e.g. gcsfuse) at the same path on "
            "every host and pass that path"
        )
    try:
        _RECIPE_OVERRIDES.apply(config)  # the recipe (its reward's own coefficients), then the coefficients
        if _DRY_RUN.value:
            config = with_reused_models(config)  # as rto_jax.pipeline.run does
            validate(config, workdir if os.path.isdir(workdir) else None)
            print(config.to_json_best_effort(indent=2, sort_keys=True))
            return
    except UserError as e:
        _fail(str(e))
    init_distributed(config)  # multi-process runs: before anything touches a device
    created = not os.path.exists(workdir)
    try:
        run(config, workdir)  # validates and checks every source before it writes anything
    except UserError as e:
        # A workdir this command created and no run has written a config to (the checks before any
        # work failed) is removed: nothing half-written is left. Another run's workdir never is.
        started = os.path.exists(os.path.join(workdir, "config.json"))
        if created and not started and not isinstance(e, WorkdirInUse) and is_main_process():
            shutil.rmtree(workdir, ignore_errors=True)
        # A full disk (StorageError) has its own status: the run can resume once there is space.
        _fail(str(e), status=STORAGE_EXIT_STATUS if isinstance(e, StorageError) else 2)
    except Preempted as e:  # SIGTERM / SIGINT: the step in flight finished and was checkpointed
        print(f"stopped: {e}", file=sys.stderr)
        sys.exit(PREEMPTED_EXIT_STATUS)


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    app.run(main, flags_parser=parse_flags)
