"""How `make test` schedules the suite (tests/conftest.py): whole modules per worker, the slowest first."""

import re
import subprocess
import sys
from pathlib import Path

from tests.conftest import SLOWEST_MODULES_FIRST

HERE = Path(__file__).resolve().parent


def test_make_test_keeps_modules_whole_in_the_collected_order():
    makefile = (HERE.parent / "Makefile").read_text()
    (line,) = [line for line in makefile.splitlines() if "-m pytest" in line and " tests" in line and "FAST" not in line]
    assert "--dist loadfile" in line and "--no-loadscope-reorder" in line, line


def test_the_slowest_modules_exist_and_are_collected_first():
    assert all((HERE / name).is_file() for name in SLOWEST_MODULES_FIRST)  # a renamed module would drop out
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:xdist", str(HERE)],
        cwd=HERE.parent,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    modules = []
    for line in proc.stdout.splitlines():
        match = re.match(r"tests/(test_\w+\.py)::", line)
        if match and match.group(1) not in modules:
            modules.append(match.group(1))
    assert modules[: len(SLOWEST_MODULES_FIRST)] == list(SLOWEST_MODULES_FIRST), proc.stdout[-2000:]
    assert len(modules) > 2 * len(SLOWEST_MODULES_FIRST)
