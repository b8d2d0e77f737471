"""Runs `experiments/run.py` on every worker of a Cloud TPU VM (creating the VM if asked).

    python experiments/launch_tpu.py --tpu_name=rto --zone=us-central2-b --accelerator_type=v4-32 \\
        --create --setup -- --config=configs/rto_tldr.py:6.9b --workdir=/mnt/runs/rto_6.9b

Everything after `--` is passed to run.py unchanged. The same command runs on all workers at once
(`gcloud compute tpus tpu-vm ssh --worker=all`); each worker's process joins the others through
`jax.distributed` (RTO_JAX_DISTRIBUTED=auto: JAX reads the slice topology from the TPU metadata).
Use a workdir every worker sees at the same path (a GCS bucket mounted with gcsfuse, Filestore or
other NFS): orbax writes checkpoints from all workers, logs and exports come from process 0 only, and
every worker reads the models the stages before exported. URLs (gs://...) are not accepted.

Steps, each optional: --create (a VM of --accelerator_type if --tpu_name does not exist),
--code=archive (the current git HEAD, as a tarball copied to every worker; `git` clones --repo_url
instead; `none` uses what is there), --setup (venv + `pip install -e . jax[tpu]`), then the run.
--dry_run prints the commands instead of running them.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


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
    p.add_argument("--accelerator_type", default="v4-8", help="slice type for --create, e.g. v4-32, v5litepod-8")
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


def plan(args, run_args: list[str]) -> list[tuple[str, list[str]]]:
    """(description, argv) of every step, in order."""
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
        steps.append(("archive the code (git HEAD)", ["git", "-C", str(REPO), "archive", "-o", tarball, "HEAD"]))
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


def main(argv: list[str] | None = None) -> int:
    args, run_args = parse_args(sys.argv[1:] if argv is None else argv)
    for description, command in plan(args, run_args):
        if args.dry_run:
            print(f"# {description}\n{shlex.join(command)}")
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
