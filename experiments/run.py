"""Runs an experiment: `python experiments/run.py --config=configs/rto_tldr.py:tiny --workdir=/tmp/run`.

Any config field can be overridden: `--config.ppo.lr=1e-6`, `--config.stages=ppo,evaluate`.
Restarting the same command resumes: finished stages are skipped, an interrupted stage continues
from its last checkpoint.
"""

import logging

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from rto_jax.distributed import init_distributed
from rto_jax.pipeline import ConfigError, run, validate

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/NAME.py[:preset]", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "run folder (checkpoints, metrics, models, results)", required=True)


def main(argv):
    del argv
    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every save at INFO
    logging.getLogger("rto_jax").setLevel(logging.INFO)
    config = _CONFIG.value
    if "://" in _WORKDIR.value:  # every file the pipeline writes goes through the local filesystem
        raise app.UsageError(
            f"--workdir={_WORKDIR.value}: URLs are not supported; mount the bucket (e.g. gcsfuse) at the same "
            "path on every host and pass that path"
        )
    init_distributed(config)  # multi-process runs: before anything touches a device
    try:
        validate(config, _WORKDIR.value)  # before any work: a bad value fails here, naming its key
    except ConfigError as e:
        raise app.UsageError(str(e)) from None
    run(config, _WORKDIR.value)


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    app.run(main)
