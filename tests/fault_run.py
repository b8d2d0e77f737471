"""`experiments/run.py` with a fault from tests/faults.py, for subprocess tests:

python tests/fault_run.py --kill_after_checkpoint=dpo:2 --config=... --workdir=... [overrides]
"""

import runpy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from faults import kill_after_checkpoint  # noqa: E402

if __name__ == "__main__":
    flag = sys.argv.pop(1)
    name, _, value = flag.partition("=")
    assert name == "--kill_after_checkpoint", flag
    stage, _, step = value.partition(":")
    with kill_after_checkpoint(stage, int(step)):
        runpy.run_path(str(Path(__file__).resolve().parents[1] / "experiments" / "run.py"), run_name="__main__")
