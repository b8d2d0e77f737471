"""experiments/launch_tpu.py without a network: what --code=archive ships (the working tree, not git
HEAD), and the config check that runs before any step (a dry run included)."""

import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from experiments import launch_tpu

ROOT = Path(__file__).resolve().parents[1]


def _git(repo, *args):
    subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", *args], check=True,
                   capture_output=True)  # fmt: skip


def test_the_archive_is_the_working_tree_and_the_changes_are_named(tmp_path):
    repo = tmp_path / "repo"
    (repo / "pkg").mkdir(parents=True)
    (repo / ".gitignore").write_text("*.log\nbuild/\n")
    (repo / "pkg" / "a.py").write_text("committed\n")
    (repo / "gone.py").write_text("deleted after the commit\n")
    _git(repo, "init", "-q")
    _git(repo, "add", ".")
    _git(repo, "commit", "-q", "-m", "first")
    (repo / "pkg" / "a.py").write_text("edited, not committed\n")
    (repo / "gone.py").unlink()
    (repo / "pkg" / "new.py").write_text("untracked\n")
    (repo / "run.log").write_text("ignored\n")
    (repo / "build").mkdir()
    (repo / "build" / "out.bin").write_text("ignored\n")

    files, changed = launch_tpu.shipped_files(repo)
    assert files == [".gitignore", "pkg/a.py", "pkg/new.py"]
    assert sorted(line.strip() for line in changed) == ["?? pkg/new.py", "D gone.py", "M pkg/a.py"]

    tarball = tmp_path / "code.tar.gz"
    launch_tpu.write_archive(repo, files, str(tarball))
    with tarfile.open(tarball) as tar:
        assert sorted(tar.getnames()) == files
        assert tar.extractfile("pkg/a.py").read() == b"edited, not committed\n"  # the file on disk, not HEAD's


def test_a_folder_that_is_no_git_checkout_is_one_line(tmp_path):
    with pytest.raises(launch_tpu.LaunchError, match="is not one .*--code=git or --code=none"):
        launch_tpu.shipped_files(tmp_path)


@pytest.mark.parametrize(
    "kind, devices",
    [("v4-8", 4), ("v4-32", 16), ("v5p-8", 4), ("v5litepod-8", 8), ("v5e-16", 16), ("v6e-64", 64), ("v3-8", 8)],
)
def test_slice_device_counts(kind, devices):
    assert launch_tpu.slice_devices(kind) == devices


def _dry_run(*args):
    command = [sys.executable, str(ROOT / "experiments" / "launch_tpu.py"), "--tpu_name=t", "--zone=z", "--dry_run"]
    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=300, check=False)


def test_dry_run_refuses_a_bad_config_in_one_line():
    run = ["--", "--config=configs/rto_tldr.py:tiny", "--workdir=/mnt/runs/r", "--config.ppo.betadpo=0.1"]
    proc = _dry_run(*run)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: the run's config is refused: config.ppo.betadpo: no such key")
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert "gcloud" not in proc.stdout  # nothing planned, let alone run


@pytest.mark.needs_shared_data
def test_dry_run_checks_the_mesh_against_the_slice():
    run = ["--", "--config=configs/rto_tldr.py:tiny", "--workdir=/mnt/runs/r", "--config.mesh.fsdp=8"]
    small = _dry_run("--accelerator_type=v4-8", *run)  # 4 devices: fsdp 8 does not fit
    assert small.returncode == 2 and "config.mesh" in small.stderr and "4 devices" in small.stderr, small.stderr
    fits = _dry_run("--num_devices=8", "--code=none", *run)
    assert fits.returncode == 0, fits.stderr
    assert fits.stdout.startswith("# config: configs/rto_tldr.py:tiny checked for 8 devices\n")
    assert "experiments/run.py --config=configs/rto_tldr.py:tiny" in fits.stdout.splitlines()[-1]
