"""Runs `experiments/run.py` on every worker of a Cloud TPU VM (creating the VM if asked).

    python experiments/launch_tpu.py --tpu_name=rto --zone=us-central2-b --accelerator_type=v4-32 \\
        --create --setup -- --config=configs/rto_tldr.py:6.9b --workdir=/mnt/runs/rto_6.9b

Everything after `--` is passed to run.py unchanged. The same command runs on all workers at once
(`gcloud compute tpus tpu-vm ssh --worker=all`); each worker's process joins the others through
`jax.distributed` (RTO_JAX_DISTRIBUTED=auto: JAX reads the slice topology from the TPU metadata).
Use a workdir every worker sees at the same path (a GCS bucket mounted with gcsfuse, Filestore or
other NFS): orbax writes checkpoints from all workers, logs and exports come from process 0 only, and
every worker reads the models the stages before exported. URLs (gs://...) are not accepted.

Before anything runs, the config is checked here as run.py would check it on the slice: `run.py
--dry_run` with the run's arguments on as many (CPU) devices as the slice has (--num_devices, default
the count of --accelerator_type: pass the existing VM's type, or its mesh is checked against a v4-8);
a bad config is one line and exit status 2, with no VM created and nothing copied.

Steps, each optional: --create (a VM of --accelerator_type if --tpu_name does not exist),
--code=archive (the working tree as it is on disk: tracked files and untracked ones git does not
ignore, as a tarball copied to every worker; files that differ from HEAD are named in a warning, since
the run's code is then no commit; `git` clones --repo_url instead, its commits only; `none` uses what
is there), --setup (venv + `pip install -e . jax[tpu]`), then the run.
--dry_run checks the config and prints the commands instead of running them.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shlex
import subprocess
import sys
import tarfile
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


class LaunchError(Exception):
    """A mistake of the user's (a bad config, no git checkout to ship): one line, exit status 2."""


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    if "--" in argv:
        split = argv.index("--")
        argv, run_args = argv[:split], argv[split + 1 :]
    else:
        run_args = []
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tpu_name", required=True, help="TPU VM name")
    p.add_argument("--zone", required=True, help="e.g. us-central2-b (v4), us-west4-a (v5e), us-east5-a (v5p)")
    p.add_argument("--project", default="", help="GCP project ('' = gcloud's default)")
    p.add_argument(
        "--accelerator_type", default="v4-8", help="slice type (created by --create; its device count checks the mesh)"
    )
    p.add_argument("--num_devices", type=int, default=0, help="the slice's JAX devices (0: from --accelerator_type)")
    p.add_argument("--runtime_version", default="tpu-ubuntu2204-base", help="TPU VM image for --create")
    p.add_argument("--create", action="store_true", help="create the VM when it does not exist")
    p.add_argument("--spot", action="store_true", help="create a spot (preemptible) VM")
    p.add_argument("--code", choices=("archive", "git", "none"), default="archive", help="how the code gets there")
    p.add_argument("--repo_url", default="", help="--code=git: the repository to clone")
    p.add_argument("--remote_dir", default="rto_jax", help="code folder on the workers (relative to $HOME)")
    p.add_argument("--setup", action="store_true", help="create the venv and install rto_jax + jax[tpu]")
    p.add_argument("--env", action="append", default=[], help="extra NAME=VALUE for the run (repeatable)")
    p.add_argument("--log", default="run.log", help="each worker tees its output to <remote_dir>/<log>")
    p.add_argument("--dry_run", action="store_true", help="print the commands, run nothing")
    args = p.parse_args(argv)
    if not run_args:
        p.error("give run.py's arguments after '--', e.g. -- --config=configs/rto_tldr.py:tiny --workdir=/mnt/runs/r")
    for arg in run_args:
        if arg.startswith("--workdir=") and "://" in arg:
            p.error(f"{arg}: URLs are not supported; mount the bucket (gcsfuse) at the same path on every worker")
    if args.code == "git" and not args.repo_url:
        p.error("--code=git needs --repo_url")
    return args, run_args


def slice_devices(accelerator_type: str) -> int:
    """The JAX devices of a slice type: one per chip (v4 and v5p name TensorCores, two per chip;
    v2 and v3 one device per core; v5e/v5litepod and v6e one core per chip)."""
    match = re.fullmatch(r"(v\d+[a-z]*|v5litepod)-(\d+)", accelerator_type)
    if not match:
        raise LaunchError(f"--accelerator_type={accelerator_type}: not a slice type such as v4-32; pass --num_devices")
    kind, count = match.group(1), int(match.group(2))
    return count // 2 if kind in ("v4", "v5p") else count


def check_config(args, run_args: list[str]) -> str:
    """Runs `run.py --dry_run` with the run's arguments on the slice's device count (CPU devices):
    the config, every override and the mesh are checked as on the slice. Returns what was checked;
    a refused config raises LaunchError with run.py's one-line message."""
    devices = args.num_devices or slice_devices(args.accelerator_type)
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}".strip(),
    }
    command = [sys.executable, str(REPO / "experiments" / "run.py"), *run_args, "--dry_run"]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, check=False)
    if done.returncode:
        lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
        if done.returncode == 2 and lines:  # run.py's one-line message for a mistake of the user's
            raise LaunchError(f"the run's config is refused: {lines[-1].removeprefix('error: ')}")
        sys.stderr.write(done.stderr)  # anything else is a bug: its traceback as run.py printed it
        raise RuntimeError(f"run.py --dry_run failed ({done.returncode}): {shlex.join(command)}")
    config = next((a.split("=", 1)[1] for a in run_args if a.startswith("--config=")), "(no --config)")
    return f"{config} checked for {devices} devices"


def _git(repo: Path, *command: str) -> str:
    done = subprocess.run(["git", "-C", str(repo), *command], capture_output=True, text=True, check=False)
    if done.returncode:
        message = " ".join(done.stderr.split()) or f"git {command[0]} failed"
        raise LaunchError(f"--code=archive ships a git working tree, and {repo} is not one ({message}); "
                          "use --code=git or --code=none")  # fmt: skip
    return done.stdout


def shipped_files(repo: Path) -> tuple[list[str], list[str]]:
    """What --code=archive ships: the working tree's files as they are on disk (tracked ones and
    untracked ones git does not ignore; a deleted file is not shipped), and `git status` lines of
    those that differ from HEAD (" M path", "?? path", " D path")."""
    listed = _git(repo, "ls-files", "-z", "--cached", "--others", "--exclude-standard").split("\0")
    files = sorted({f for f in listed if f and os.path.lexists(repo / f) and not (repo / f).is_dir()})
    changed = [line for line in _git(repo, "status", "--porcelain", "--untracked-files=all").splitlines() if line]
    return files, changed


def write_archive(repo: Path, files: list[str], tarball: str) -> None:
    """A gzipped tarball of `files` (paths relative to `repo`), written whole or not at all."""
    partial = f"{tarball}.partial"
    with tarfile.open(partial, "w:gz") as tar:
        for name in files:
            tar.add(repo / name, arcname=name, recursive=False)
    os.replace(partial, tarball)


@dataclasses.dataclass
class LocalStep:
    """A step done here in Python rather than by a command: `shown` is what a dry run prints."""

    shown: str
    run: Callable[[], None]


def _gcloud(args, *command: str) -> list[str]:
    base = ["gcloud", "compute", "tpus", "tpu-vm", *command, f"--zone={args.zone}"]
    return base + ([f"--project={args.project}"] if args.project else [])


def ssh_all(args, remote_command: str) -> list[str]:
    """The command that runs `remote_command` on every worker of the slice at once."""
    return _gcloud(args, "ssh", args.tpu_name, "--worker=all") + [f"--command={remote_command}"]


def run_command(args, run_args: list[str]) -> str:
    """The shell line each worker runs: the same run.py command everywhere, jax.distributed auto-detected."""
    env = ["RTO_JAX_DISTRIBUTED=auto", *args.env]
    run = " ".join([*env, ".venv/bin/python", "experiments/run.py", *map(shlex.quote, run_args)])
    return f"cd ~/{args.remote_dir} && {run} 2>&1 | tee -a {shlex.quote(args.log)}"


def plan(args, run_args: list[str], shipped: tuple[list[str], list[str]] = ((), ())) -> list[tuple]:
    """(description, argv or LocalStep) of every step, in order; shipped: `shipped_files(REPO)` for
    --code=archive."""
    steps = []
    if args.create:
        create = _gcloud(args, "create", args.tpu_name) + [
            f"--accelerator-type={args.accelerator_type}",
            f"--version={args.runtime_version}",
        ]
        steps.append(("create the TPU VM (if missing)", create + (["--spot"] if args.spot else [])))
    remote = f"~/{args.remote_dir}"
    if args.code == "archive":
        tarball = f"/tmp/{args.remote_dir}.tar.gz"
        files, changed = shipped
        archive = LocalStep(
            f"tar -czf {tarball} <the {len(files)} files of `git ls-files --cached --others --exclude-standard`>",
            lambda: write_archive(REPO, files, tarball),
        )
        what = f"{len(changed)} changes not in git HEAD" if changed else "as committed"
        steps.append((f"archive the working tree ({len(files)} files, {what})", archive))
        steps.append(
            ("copy it to every worker", _gcloud(args, "scp", tarball, f"{args.tpu_name}:/tmp/", "--worker=all"))
        )
        unpack = f"mkdir -p {remote} && tar -xzf /tmp/{args.remote_dir}.tar.gz -C {remote}"
        steps.append(("unpack it on every worker", ssh_all(args, unpack)))
    elif args.code == "git":
        clone = f"test -d {remote} || git clone {shlex.quote(args.repo_url)} {remote}; cd {remote} && git pull"
        steps.append(("clone / update the repository on every worker", ssh_all(args, clone)))
    if args.setup:
        setup = (
            f"cd {remote} && (test -x .venv/bin/python || python3 -m venv .venv) && "
            ".venv/bin/pip install -q -U pip && .venv/bin/pip install -q -e . 'jax[tpu]'"
        )
        steps.append(("install on every worker", ssh_all(args, setup)))
    steps.append(("run on every worker", ssh_all(args, run_command(args, run_args))))
    return steps


def _exists(args) -> bool:
    describe = _gcloud(args, "describe", args.tpu_name) + ["--format=value(state)"]
    return subprocess.run(describe, capture_output=True, text=True, check=False).returncode == 0


def _shown(command: list[str] | LocalStep) -> str:
    return command.shown if isinstance(command, LocalStep) else shlex.join(command)


def main(argv: list[str] | None = None) -> int:
    args, run_args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        checked = check_config(args, run_args)
        shipped = shipped_files(REPO) if args.code == "archive" else ([], [])
    except LaunchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    steps, changed = plan(args, run_args, shipped), shipped[1]
    print(f"# config: {checked}", flush=True)
    if changed:  # the run's code is then no commit: say which files make the difference
        shown = ", ".join(line.strip() for line in changed[:20])
        shown += f", ... ({len(changed)} in all)" if len(changed) > 20 else ""
        print(f"warning: shipping the working tree, with changes not in git HEAD: {shown}", file=sys.stderr, flush=True)
    for description, command in steps:
        if args.dry_run:
            print(f"# {description}\n{_shown(command)}")
            continue
        if isinstance(command, LocalStep):
            print(f"# {description}\n{command.shown}", flush=True)
            command.run()
            continue
        if command[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "create"] and _exists(args):
            print(f"# {args.tpu_name} exists: not creating it", flush=True)
            continue
        print(f"# {description}\n{shlex.join(command)}", flush=True)
        result = subprocess.run(command, check=False)
        if result.returncode:
            print(f"failed ({result.returncode}): {description}", file=sys.stderr)
            return result.returncode
    return 0


if __name__ == "__main__":
    sys.exit(main())
