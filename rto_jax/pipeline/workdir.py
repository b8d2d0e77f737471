"""What a workdir guards between runs: one run at a time, a config that matches the work already in
it, and paths that stay valid when the folder is copied or moved.

    with WorkdirLock(workdir):          # held for the run's life; a second run is refused by name
        check_config(config, workdir)   # a changed config is refused (or recorded with resume_with_changes)

The lock is `workdir/.lock`: an flock'ed file holding the holder's host, pid, start time and command.
The kernel drops an flock when its process dies (kill -9, OOM, preemption), so a lock file left
behind by a dead run is detected (the flock succeeds) and taken over with a warning.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import logging
import os
import socket
import sys
from pathlib import Path
from typing import Self

from rto_jax.errors import ConfigError, UserError

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"

# Keys whose change cannot alter work already done: which stages run, how often checkpoints are
# written, the device layout and the process group (a preempted run may come back on other hosts).
RESUMABLE_CHANGES = ("stages", "seeds", "checkpoint.", "mesh.", "distributed.", "resume_with_changes")
HISTORY_KEY = "resume_history"  # config.json: the changes a resumed run made, and where they took effect


class WorkdirInUse(UserError):
    """Another live run holds the workdir's lock."""


def _now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def _holder(text: str) -> str:
    try:
        info = json.loads(text)
        return f"host {info['host']}, pid {info['pid']}, started {info['started']} ({' '.join(info['command'])})"
    except (ValueError, KeyError, TypeError):
        return "a run that left no description"


class WorkdirLock:
    """An exclusive, non-blocking lock on a workdir for the life of a run (a context manager)."""

    def __init__(self, workdir: str | os.PathLike):
        self.path = Path(workdir) / LOCK_NAME
        self._fd: int | None = None

    def __enter__(self) -> Self:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    os.close(fd)
                    raise
                holder = os.pread(fd, 1 << 16, 0).decode(errors="replace")
                os.close(fd)
                raise WorkdirInUse(
                    f"{self.path.parent} is in use by another run: {_holder(holder)}. Wait for it to end, "
                    "or give this run another --workdir."
                ) from None
            # The holder we waited on may have released *and unlinked* the file between our open and
            # flock: then we hold a lock on a file nobody else can see, so try again on the new one.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        left = os.pread(fd, 1 << 16, 0).decode(errors="replace")
        if left.strip():  # a run that ended without releasing it: killed, or its machine went away
            log.warning("took over the lock of %s: a run that is no longer running (%s)", self.path, _holder(left))
        info = {"host": socket.gethostname(), "pid": os.getpid(), "started": _now(), "command": sys.argv}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode() + b"\n", 0)
        os.fsync(fd)
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is None:
            return
        # Unlink before unlocking: a run waiting on this file then sees it is stale and opens anew.
        self.path.unlink(missing_ok=True)
        os.close(self._fd)
        self._fd = None


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_changes(old: dict, new: dict) -> dict[str, tuple]:
    """{dotted key: (old value, new value)} of every key that differs (absent: None)."""
    a, b = _flatten({k: v for k, v in old.items() if k != HISTORY_KEY}), _flatten(new)
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def work_done(workdir: Path) -> dict:
    """What a run left in `workdir`: {"finished": [stages with done.json], "in_progress": {stage: last
    checkpoint step}}."""
    finished = sorted(p.parent.name for p in workdir.glob("*/done.json"))
    in_progress = {}
    for folder in sorted(workdir.glob("*/checkpoints")):
        steps = [int(p.name) for p in folder.iterdir() if p.name.isdigit()]
        if steps and folder.parent.name not in finished:
            in_progress[folder.parent.name] = max(steps)
    return {"finished": finished, "in_progress": in_progress}


def check_config(config, workdir: str | os.PathLike) -> dict:
    """The config to write to `workdir/config.json`: the new config plus the history of changes.

    A config that differs from the one the work in `workdir` was done with (a finished stage or a
    checkpoint exists) is refused, naming every changed key, unless `config.resume_with_changes`;
    then the changes are appended to the history with the stage steps they take effect after.
    Changes of `RESUMABLE_CHANGES` keys are always allowed (and recorded).
    """
    workdir = Path(workdir)
    path = workdir / "config.json"
    new = json.loads(config.to_json_best_effort(sort_keys=True))
    if not path.exists():
        return new
    try:
        old = json.loads(path.read_text())
    except ValueError as e:
        raise UserError(f"{path}: not the JSON config of a run ({e}); move it away to start this run") from None
    history = old.get(HISTORY_KEY, [])
    changes = config_changes(old, new)
    done = work_done(workdir)
    if changes and (done["finished"] or done["in_progress"]):
        refused = [k for k in changes if not k.startswith(RESUMABLE_CHANGES)]
        if refused and not config.get("resume_with_changes", False):
            listed = "; ".join(f"{k}: {changes[k][0]!r} -> {changes[k][1]!r}" for k in refused)
            raise ConfigError(
                "resume_with_changes",
                f"{workdir} holds a run made with another config ({listed}). Give this run another "
                "--workdir, or resume with --config.resume_with_changes=True to go on with the new values "
                f"(recorded in {path.name}'s {HISTORY_KEY})",
            )
        entry = {
            "time": _now(),
            "changes": {k: {"from": a, "to": b} for k, (a, b) in changes.items()},
            "finished_stages": done["finished"],  # these ran with the old values and are not redone
            "took_effect_after": done["in_progress"],  # {stage: checkpoint step}; later stages: from step 1
        }
        history = [*history, entry]
        log.warning(
            "config changed since the last run of %s, resuming with the new values: %s",
            workdir,
            ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changes.items()),
        )
    elif changes:
        log.info("config changed since the last run of %s (no work to keep): %s", workdir, ", ".join(changes))
    return {**new, HISTORY_KEY: history} if history else new


# ------------------------------------------------------------------------------------------------
# Paths in done.json and results.json are stored relative to the workdir, so a copied or moved
# workdir loads its own models.


PATH_KEYS = ("model_path", "path", "prm_path")  # the summary fields of done.json that hold a file or folder


def relative_to(obj, workdir: Path, keys=PATH_KEYS):
    """`obj` (nested dicts/lists) with every `keys` path that lies inside `workdir` made relative to it."""
    root = os.path.abspath(workdir)
    if isinstance(obj, list):
        return [relative_to(v, workdir, keys) for v in obj]
    if not isinstance(obj, dict):
        return obj
    out = {}
    for key, value in obj.items():
        if key in keys and isinstance(value, str) and value:
            full = os.path.abspath(value)
            out[key] = os.path.relpath(full, root) if full.startswith(root + os.sep) else value
        else:
            out[key] = relative_to(value, workdir, keys)
    return out


def resolve_in(result: dict, workdir: Path, keys=PATH_KEYS) -> dict:
    """A done.json summary with its relative `keys` paths joined to `workdir` (absolute ones, hub ids
    and '' stay as they are)."""
    out = dict(result)
    for key in keys:
        value = out.get(key)
        if isinstance(value, str) and value and not os.path.isabs(value) and (workdir / value).exists():
            out[key] = str(workdir / value)
    return out
