"""The package's layers: every module imports on its own in a fresh interpreter (an import cycle fails
there, even one that a test session hides by importing the cycle's modules in a lucky order), and no
module imports a layer above its own."""

import ast
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "rto_jax"

# Lowest first. A module may import modules of its own layer and of the layers below it, never above.
LAYERS = (
    # what everything may use: errors, file writing, process topology and runtime, the package root
    ("base", ("__init__", "errors", "files", "distributed", "runtime")),
    # losses and token rewards: pure functions of arrays
    ("objectives", ("objectives",)),
    # models, what runs them (sampling, scoring, chat) and the data they read
    ("models", ("models", "sampling", "scoring", "chat", "data")),
    # train states, steps, sharding
    ("train", ("train",)),
    # scores, win rates, reports, plots and token pages: functions of arrays and models
    ("eval", ("eval",)),
    # configs, workdirs, tasks and the stages that read them
    ("pipeline", ("pipeline",)),
    # command-line helpers over the library (the memory planner, screenshots)
    ("tools", ("tools",)),
)
# Never imported by the library: the recipes and scripts built on it.
OUTSIDE = ("experiments", "benchmarks", "tests", "third_party", "configs")
RANK = {part: rank for rank, (_, parts) in enumerate(LAYERS) for part in parts}
LAYER = {part: name for name, parts in LAYERS for part in parts}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> list[str]:
    return sorted(module_name(p) for p in PACKAGE.rglob("*.py"))


def recipes() -> list[str]:
    """The modules of experiments/ (the layer above the library: a recipe that imports what moved fails)."""
    return sorted(module_name(p) for p in (ROOT / "experiments").glob("*.py"))


def part_of(module: str) -> str:
    """The layer table's key of a module: rto_jax.eval.report -> eval, rto_jax.chat -> chat, rto_jax -> __init__."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imported(path: Path, package: str) -> list[tuple[int, str]]:
    """(line, module) of every import in `path`, the ones inside functions too (a deferred import is
    still a dependency); `from rto_jax import pipeline` is rto_jax.pipeline."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's package
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if base == "rto_jax":
                out += [(node.lineno, _module_or_root(f"rto_jax.{alias.name}")) for alias in node.names]
            else:
                out.append((node.lineno, base))
    return out


def _module_or_root(name: str) -> str:
    path = ROOT.joinpath(*name.split("."))
    return name if path.with_suffix(".py").exists() or (path / "__init__.py").exists() else "rto_jax"


def layer_violations() -> list[str]:
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        name = module_name(path)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        own = part_of(name)
        assert own in RANK, f"{path.relative_to(ROOT)}: {own!r} has no place in LAYERS; add it to the table"
        for line, target in imported(path, package):
            top = target.split(".")[0]
            where = f"{path.relative_to(ROOT)}:{line} imports {target}"
            if top in OUTSIDE:
                problems.append(f"{where} (the library may not import {top})")
            elif top == "rto_jax" and target != "rto_jax":
                other = part_of(target)
                if other not in RANK:
                    problems.append(f"{where} ({other!r} has no place in LAYERS)")
                elif RANK[other] > RANK[own]:
                    problems.append(f"{where} ({LAYER[own]} may not import {LAYER[other]})")
    return problems


def test_no_module_imports_a_layer_above_its_own():
    assert layer_violations() == []


def test_the_layer_check_names_an_upward_import(tmp_path, monkeypatch):
    """The check itself: an eval module importing the pipeline is reported with its file and line."""
    fake = tmp_path / "rto_jax"
    (fake / "eval").mkdir(parents=True)
    (fake / "pipeline").mkdir()
    for init in ("__init__.py", "eval/__init__.py", "pipeline/__init__.py", "pipeline/common.py"):
        (fake / init).write_text("")
    (fake / "eval" / "x.py").write_text("import numpy\n\n\ndef f():\n    from rto_jax.pipeline import common\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    assert layer_violations() == ["rto_jax/eval/x.py:5 imports rto_jax.pipeline (eval may not import pipeline)"]


# Imports each module named on the command line in a forked child of an interpreter that has loaded
# the third-party libraries but no rto_jax module: every child starts the package from nothing (so a
# cycle shows whichever of its modules comes first), and only rto_jax's own code runs per module.
RUNNER = r"""
import importlib, os, sys, traceback
for name in sys.argv[1].split(","):
    try:
        importlib.import_module(name)
    except Exception:
        pass  # a library that is absent or broken here shows in the child's import
assert not [m for m in sys.modules if m == "rto_jax" or m.startswith("rto_jax.")]
failed = []
for name in sys.argv[2].split(","):
    sys.stdout.flush(); sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        try:
            importlib.import_module(name)
        except BaseException:
            sys.stderr.write(f"--- import {name} failed:\n{traceback.format_exc()}")
            sys.stderr.flush()
            os._exit(1)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    if status:
        failed.append(name)
print("FAILED:" + ",".join(failed))
"""


def third_party_modules() -> list[str]:
    """The modules outside rto_jax that the package imports at module level (deferred ones stay out)."""
    names = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module != "__future__":
                names.add(node.module)
    return sorted(n for n in names if n.split(".")[0] != "rto_jax")


def test_every_module_imports_alone_in_a_fresh_interpreter():
    names = modules() + recipes()
    assert {"rto_jax.eval.policy_eval", "rto_jax.pipeline.evaluate", "experiments.synthetic_study"} <= set(names)
    env = {**os.environ, "MPLBACKEND": "Agg", "JAX_PLATFORMS": "cpu"}
    done = subprocess.run(
        [sys.executable, "-c", RUNNER, ",".join(third_party_modules()), ",".join(names)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-5000:]
    failed = done.stdout.strip().splitlines()[-1].removeprefix("FAILED:")
    assert failed == "", f"these modules fail to import on their own: {failed}\n{done.stderr[-8000:]}"
