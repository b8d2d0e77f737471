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

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from rto_jax.distributed import init_distributed, is_main_process
from rto_jax.errors import StorageError, UserError
from rto_jax.pipeline import run
from rto_jax.pipeline.loop import PREEMPTED_EXIT_STATUS, Preempted
from rto_jax.pipeline.overrides import check_overrides
from rto_jax.pipeline.workdir import WorkdirInUse

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/NAME.py[:preset]", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "run folder (checkpoints, metrics, models, results)", required=True)


STORAGE_EXIT_STATUS = 74  # EX_IOERR


def _fail(message: str, status: int = 2):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(status)


def parse_flags(argv):
    """absl's flag parsing, with bad config files, presets and override keys as one-line errors."""
    try:
        check_overrides(argv)  # unknown keys: named, with the nearest valid ones
        return flags.FLAGS(argv)
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
