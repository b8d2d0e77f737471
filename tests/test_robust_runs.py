"""What a run does when the machine or the user gets in its way (issue 14): damaged checkpoints, two
runs on one workdir, a changed config on resume, a full disk, a collapsed run, a moved workdir and
the permissions of what it writes. Preemption (SIGTERM mid-stage, then resume) is tested end to end
in tests/test_pipeline_sharded.py.

All on `small_config` (tests/test_pipeline.py), mostly SFT alone: 5 steps, a checkpoint every 2,
the last 2 kept. An uninterrupted run is the reference every resumed run must equal.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from rto_jax.errors import ConfigError
from rto_jax.pipeline import run
from rto_jax.pipeline.checkpoint import CheckpointMismatch, NoIntactCheckpoint
from rto_jax.pipeline.logging import read_metrics
from rto_jax.pipeline.workdir import LOCK_NAME, WorkdirInUse, WorkdirLock

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from faults import SimulatedFailure, count_steps, kill_after_checkpoint
from tests.test_pipeline import fixture_data, same_numbers, small_config, strip_time  # noqa: F401  (fixture_data: a pytest fixture)

STORAGE_EXIT_STATUS = 74  # experiments/run.py
TIMEOUT = 600


@pytest.fixture(scope="module")
def reference(fixture_data, tmp_path_factory):
    """An uninterrupted SFT run: its metrics are what every interrupted and resumed run must log."""
    workdir = tmp_path_factory.mktemp("reference")
    run(small_config(*fixture_data, "sft"), workdir)
    return strip_time(read_metrics(workdir / "metrics.jsonl"))


def killed_after(fixture_data, workdir: Path, step: int, stages: str = "sft") -> Path:
    """`workdir` as a run killed right after SFT checkpoint `step` leaves it."""
    with kill_after_checkpoint("sft", step), pytest.raises(SimulatedFailure):
        run(small_config(*fixture_data, stages), workdir)
    return workdir


def checkpoint_dir(workdir: Path, step: int | None = None) -> Path:
    folder = workdir / "sft" / "checkpoints"
    return folder if step is None else folder / str(step)


def steps_of(folder: Path) -> list[int]:
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.exists() else []


def largest_data_file(step_folder: Path) -> Path:
    return max((step_folder / "state").rglob("ocdbt.process_0/d/*"), key=lambda p: p.stat().st_size)


# ----------------------------------------------------------------------------------------------
# Damaged checkpoints


def _truncate(folder: Path) -> str:
    data = largest_data_file(folder)
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    return "OUT_OF_RANGE"


def _remove(folder: Path) -> str:
    largest_data_file(folder).unlink()
    return "Error reading"


def _garbage_meta(folder: Path) -> str:
    (folder / "meta" / "metadata").write_text('{"step": 4, "da')
    return "JSONDecodeError"


@pytest.mark.parametrize("damage", [_truncate, _remove, _garbage_meta], ids=["truncated", "missing", "garbage_meta"])
def test_a_damaged_newest_checkpoint_is_moved_aside_and_the_run_resumes_from_the_one_before(
    fixture_data, reference, tmp_path, caplog, damage
):
    workdir = killed_after(fixture_data, tmp_path / "run", 4)
    assert steps_of(checkpoint_dir(workdir)) == [2, 4]
    why = damage(checkpoint_dir(workdir, 4))

    with caplog.at_level(logging.WARNING), count_steps() as steps:
        run(small_config(*fixture_data, "sft"), workdir)
    assert steps == {"sft": 3}  # steps 3, 4 and 5: resumed from checkpoint 2, not restarted
    assert json.loads((workdir / "sft" / "done.json").read_text())["resumed_from"] == 2
    aside = workdir / "sft" / "checkpoints_damaged" / "4"
    assert aside.is_dir()  # moved, not deleted
    warning = next(r.getMessage() for r in caplog.records if "is damaged" in r.getMessage())
    assert str(checkpoint_dir(workdir, 4)) in warning and why in warning and str(aside) in warning, warning
    same_numbers(reference, strip_time(read_metrics(workdir / "metrics.jsonl")))


def test_no_intact_checkpoint_is_one_error_naming_the_stage_and_every_folder(fixture_data, tmp_path):
    workdir = killed_after(fixture_data, tmp_path / "run", 4)
    _truncate(checkpoint_dir(workdir, 4))
    _garbage_meta(checkpoint_dir(workdir, 2))
    with count_steps() as steps, pytest.raises(NoIntactCheckpoint) as error:
        run(small_config(*fixture_data, "sft"), workdir)
    message = str(error.value)
    assert message.startswith("sft: no intact checkpoint"), message
    assert str(checkpoint_dir(workdir, 4)) in message and str(checkpoint_dir(workdir, 2)) in message, message
    assert steps == {}
    assert steps_of(checkpoint_dir(workdir)) == [2, 4]  # nothing moved when nothing can be resumed
    assert not (workdir / "sft" / "checkpoints_damaged").exists()


def test_a_changed_model_shape_is_named_not_taken_for_damage(fixture_data, tmp_path):
    workdir = killed_after(fixture_data, tmp_path / "run", 2)
    config = small_config(*fixture_data, "sft")
    config.model.hidden_size, config.resume_with_changes = 48, True
    with pytest.raises(CheckpointMismatch) as error:
        run(config, workdir)
    message = str(error.value)
    assert message.startswith("config.model: checkpoint " + str(checkpoint_dir(workdir, 2))), message
    assert "[320, 32] there, [320, 48] now" in message, message
    assert steps_of(checkpoint_dir(workdir)) == [2]  # intact, not moved aside


# ----------------------------------------------------------------------------------------------
# Config changes on resume


def test_a_changed_config_is_refused_naming_every_key_unless_resume_with_changes(
    fixture_data, reference, tmp_path, caplog
):
    workdir = killed_after(fixture_data, tmp_path / "run", 2)
    written = (workdir / "config.json").read_text()
    metrics = (workdir / "metrics.jsonl").read_text()
    changed = small_config(*fixture_data, "sft")
    changed.sft.lr, changed.sft.batch_size = 3e-3, 4

    with count_steps() as steps, pytest.raises(ConfigError) as error:
        run(changed, workdir)
    message = str(error.value)
    assert message.startswith("config.resume_with_changes: "), message
    assert "sft.batch_size: 8 -> 4" in message and "sft.lr: 0.001 -> 0.003" in message, message
    assert steps == {}
    assert (workdir / "config.json").read_text() == written and (workdir / "metrics.jsonl").read_text() == metrics

    # Checkpoint keys may change freely: the same config with checkpoints every 100 steps resumes.
    same = small_config(*fixture_data, "sft")
    same.checkpoint.every_steps = 100
    run(same, workdir)
    same_numbers(reference, strip_time(read_metrics(workdir / "metrics.jsonl")))
    history = json.loads((workdir / "config.json").read_text())["resume_history"]
    assert history[-1]["changes"] == {"checkpoint.every_steps": {"from": 2, "to": 100}}


def test_resume_with_changes_records_each_change_and_where_it_took_effect(fixture_data, tmp_path):
    workdir = killed_after(fixture_data, tmp_path / "run", 2)
    changed = small_config(*fixture_data, "sft")
    changed.sft.lr, changed.resume_with_changes = 3e-3, True
    with count_steps() as steps:
        run(changed, workdir)
    assert steps == {"sft": 3}
    config = json.loads((workdir / "config.json").read_text())
    assert config["sft"]["lr"] == 3e-3
    (entry,) = config["resume_history"]
    assert entry["changes"] == {
        "resume_with_changes": {"from": False, "to": True},
        "sft.lr": {"from": 1e-3, "to": 3e-3},
    }
    assert entry["took_effect_after"] == {"sft": 2} and entry["finished_stages"] == []


# ----------------------------------------------------------------------------------------------
# One run per workdir

HOLD_LOCK = """
import sys, time
from rto_jax.pipeline.workdir import WorkdirLock
with WorkdirLock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(600)
"""


def _env() -> dict:
    return {**os.environ, "JAX_PLATFORMS": "cpu", "RTO_JAX_NO_TQDM": "1"}


def _config_file(folder: Path, fixture_data, stages: str = "sft") -> Path:
    """A config file for experiments/run.py that builds `small_config` (the subprocess tests)."""
    data, tokenizer_dir = fixture_data
    path = folder / "small.py"
    path.write_text(
        textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(ROOT / "tests")!r})
        from test_pipeline import small_config


        def get_config():
            return small_config({str(data)!r}, {str(tokenizer_dir)!r}, {stages!r})
        """)
    )
    return path


def _run_py(config_file: Path, workdir: Path, *extra: str, file_size_limit: int = 0) -> subprocess.CompletedProcess:
    """experiments/run.py in a subprocess; file_size_limit > 0: no file it writes may grow past it
    (RLIMIT_FSIZE, set in the child before run.py starts; Python ignores SIGXFSZ, so writes fail
    with EFBIG as they would with ENOSPC on a full disk)."""
    script = str(ROOT / "experiments" / "run.py")
    prelude = "import resource, runpy, sys\n"
    if file_size_limit:
        prelude += f"resource.setrlimit(resource.RLIMIT_FSIZE, ({file_size_limit}, {file_size_limit}))\n"
    prelude += f"sys.argv[0] = {script!r}\nrunpy.run_path({script!r}, run_name='__main__')\n"
    command = [sys.executable, "-c", prelude, f"--config={config_file}", f"--workdir={workdir}", *extra]
    return subprocess.run(command, env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT, check=False)


def test_a_second_run_is_refused_naming_the_holder_and_a_dead_runs_lock_is_taken_over(fixture_data, tmp_path, caplog):
    workdir = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(workdir)], env=_env(), stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        named = f"host {socket.gethostname()}, pid {holder.pid}, started "

        with pytest.raises(WorkdirInUse, match=rf"{workdir} is in use by another run: {named}"):
            run(small_config(*fixture_data, "sft"), workdir)
        proc = _run_py(_config_file(tmp_path, fixture_data), workdir)
        assert proc.returncode == 2, proc.stderr[-4000:]
        lines = proc.stderr.strip().splitlines()
        assert lines[-1].startswith(f"error: {workdir} is in use by another run: {named}"), proc.stderr[-4000:]
        assert "Traceback" not in proc.stderr
        assert sorted(p.name for p in workdir.iterdir()) == [LOCK_NAME]  # nothing written, nothing removed
    finally:
        holder.send_signal(signal.SIGKILL)  # dies holding the lock: the kernel drops the flock
        holder.wait(timeout=60)

    assert (workdir / LOCK_NAME).exists()  # left behind by the killed holder
    with caplog.at_level(logging.WARNING):
        run(small_config(*fixture_data, "sft"), workdir)
    taken = [r.getMessage() for r in caplog.records if "took over the lock" in r.getMessage()]
    assert len(taken) == 1 and f"pid {holder.pid}" in taken[0], taken
    assert (workdir / "sft" / "done.json").exists() and not (workdir / LOCK_NAME).exists()


def test_the_lock_is_released_when_a_run_fails(fixture_data, tmp_path):
    workdir = killed_after(fixture_data, tmp_path / "run", 2)
    assert not (workdir / LOCK_NAME).exists()
    with WorkdirLock(workdir):  # not refused: the failed run let go of it
        assert json.loads((workdir / LOCK_NAME).read_text())["pid"] == os.getpid()


# ----------------------------------------------------------------------------------------------
# A full disk


def test_a_full_disk_is_one_line_naming_the_checkpoint_and_the_previous_one_stays_intact(
    fixture_data, reference, tmp_path
):
    """A file-size limit below what every checkpoint writes whole (its _METADATA, ~34 kB here; its data
    files are split by OCDBT in a varying way: checkpoint 4's largest was 335 kB in one run, 213 kB in
    another, so a limit taken from checkpoint 2's data files did not always stop checkpoint 4) but above
    everything the resumed run writes before it (config.json ~5.5 kB): checkpoint 4 fails like a full
    disk would (EFBIG instead of ENOSPC)."""
    workdir = killed_after(fixture_data, tmp_path / "run", 2)
    limit = 16 * 1024
    assert (checkpoint_dir(workdir, 2) / "state" / "_METADATA").stat().st_size > 2 * limit  # the premise
    assert (workdir / "config.json").stat().st_size < limit // 2

    config_file = _config_file(tmp_path, fixture_data)
    proc = _run_py(config_file, workdir, file_size_limit=limit)
    output = proc.stdout + proc.stderr
    assert proc.returncode == STORAGE_EXIT_STATUS, output[-6000:]
    assert "Traceback" not in output and "Event loop" not in output, output[-6000:]
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, output[-6000:]
    assert errors[0].startswith(f"error: sft step 4: writing checkpoint {checkpoint_dir(workdir, 4)} failed: "), errors
    assert f"the previous checkpoint {checkpoint_dir(workdir, 2)} is intact" in errors[0], errors
    assert len(output.splitlines()) < 40, output
    assert steps_of(checkpoint_dir(workdir)) == [2]
    assert not list(checkpoint_dir(workdir).glob("*tmp*"))  # the partial write is removed

    proc = _run_py(config_file, workdir)  # space freed: the same command resumes from checkpoint 2
    assert proc.returncode == 0, proc.stderr[-6000:]
    assert json.loads((workdir / "sft" / "done.json").read_text())["resumed_from"] == 2
    assert not list(checkpoint_dir(workdir).glob("*tmp*"))
    same_numbers(reference, strip_time(read_metrics(workdir / "metrics.jsonl")))


# ----------------------------------------------------------------------------------------------
# Collapse


def test_a_collapsed_run_warns_and_counts_its_collapsed_steps(fixture_data, tmp_path, caplog):
    """lr=1e6: no NaN, but the logits saturate, the gradients are exactly zero from step 2 and the
    loss sits at ln(vocabulary). The run goes on (it is not an error), but says so."""
    config = small_config(*fixture_data, "sft")
    config.sft.lr, config.collapse_steps = 1e6, 2
    with caplog.at_level(logging.WARNING):
        run(config, tmp_path)
    warnings = [r.getMessage() for r in caplog.records if "training has collapsed" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].startswith("sft: gradients exactly zero for 2 steps"), warnings
    train = [r for r in read_metrics(tmp_path / "metrics.jsonl") if r["split"] == "train"]
    assert [r["collapse_steps"] for r in train] == [0, 1, 2, 3, 4]
    assert all(r["grad_norm"] == 0 for r in train[1:])

    healthy = small_config(*fixture_data, "sft")
    run(healthy, tmp_path / "healthy")
    assert all(
        r["collapse_steps"] == 0 for r in read_metrics(tmp_path / "healthy" / "metrics.jsonl") if r["split"] == "train"
    )


# ----------------------------------------------------------------------------------------------
# A moved workdir, and what others may read


def test_a_copied_workdir_uses_its_own_models_and_outputs_take_the_umask(fixture_data, tmp_path):
    old_umask = os.umask(0o022)
    try:
        run(small_config(*fixture_data, "sft"), tmp_path / "a")
    finally:
        os.umask(old_umask)
    done = json.loads((tmp_path / "a" / "sft" / "done.json").read_text())
    assert done["model_path"] == "sft/model"
    model = tmp_path / "a" / "sft" / "model"
    assert stat.S_IMODE(model.stat().st_mode) == 0o755
    for file in [*model.iterdir(), tmp_path / "a" / "sft" / "done.json", tmp_path / "a" / "config.json"]:
        assert stat.S_IMODE(file.stat().st_mode) == 0o644, file

    # Copy, remove the original: the copy's next stage must find SFT's model in the copy.
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "a")
    results = run(small_config(*fixture_data, "sft,reward_model"), tmp_path / "b")  # the RM starts from SFT
    assert results["stages"]["reward_model"]["model_path"] == str(tmp_path / "b" / "reward_model" / "model")
    stored = json.loads((tmp_path / "b" / "results.json").read_text())
    assert stored["stages"]["sft"]["model_path"] == "sft/model", stored
    assert str(tmp_path) not in json.dumps(stored), stored
