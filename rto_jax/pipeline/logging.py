"""Run logging: metrics.jsonl (one flushed JSON line per record), TensorBoard events, tqdm progress
bars, per-stage summary tables and atomically written JSON files (results.json, done markers).

A metrics record is `{"stage", "split", "step", <metric>: float, ..., "time": unix seconds}`; only
`time` differs between an interrupted-and-resumed run and an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from rto_jax.files import temp_file_for

TIME_KEYS = ("time",)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    """Writes JSON to a temporary file in the same folder, fsyncs it and renames it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temp_file_for(path)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True, default=_jsonable)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _jsonable(x):
    if isinstance(x, (np.generic, np.ndarray)) or hasattr(x, "__array__"):
        return np.asarray(x).tolist()
    raise TypeError(f"not JSON serializable: {type(x).__name__}")


def scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Host floats of a metrics dict (device scalars are fetched once, together)."""
    import jax

    host = jax.device_get(dict(metrics))
    return {k: float(np.asarray(v)) for k, v in host.items()}


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """All records of a metrics.jsonl (raises on a malformed line, naming it)."""
    records = []
    with open(path) as f:
        for i, line in enumerate(f):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}: line {i + 1} is not JSON: {e}") from None
    return records


class RunLog:
    """metrics.jsonl + TensorBoard events of one workdir. Appends survive a kill: every line is flushed
    and fsynced, and a partial last line left by a kill is dropped when the log is reopened.

    In a multi-process run only process 0 writes (`write` defaults to `is_main_process()`); the
    others still fetch and return each record, so every process runs the same code.
    """

    def __init__(self, workdir: str | os.PathLike, tensorboard: bool = True, write: bool | None = None):
        from rto_jax.distributed import is_main_process

        self.workdir = Path(workdir)
        self.path = self.workdir / "metrics.jsonl"
        self.write = is_main_process() if write is None else write
        self._file = self._tb = None
        if not self.write:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._repair()
        self._file = open(self.path, "a")
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(self.workdir / "tensorboard"), flush_secs=10)

    def _repair(self) -> None:
        if self.path.exists():
            text = self.path.read_text()
            if text and not text.endswith("\n"):
                self._rewrite(text[: text.rfind("\n") + 1].splitlines(keepends=True))

    def _rewrite(self, lines: Iterable[str]) -> None:
        fd, tmp = temp_file_for(self.path)
        with os.fdopen(fd, "w") as f:
            f.writelines(lines)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def log(self, stage: str, step: int, metrics: Mapping[str, Any], split: str = "train") -> dict:
        values = scalars(metrics)
        record = {"stage": stage, "split": split, "step": int(step), **values, "time": round(time.time(), 3)}
        if not self.write:
            return record
        self._file.write(json.dumps(record, allow_nan=True) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        if self._tb is not None:
            for key, value in values.items():
                if math.isfinite(value):
                    self._tb.add_scalar(f"{stage}/{split}/{key}", value, int(step))
        return record

    def truncate(self, stage: str, after_step: int) -> int:
        """Drops `stage`'s records with step > after_step (logged after the checkpoint a resume starts
        from, so they are logged again identically). Returns how many were dropped."""
        if not self.write:
            return 0
        self._file.close()
        keep, dropped = [], 0
        for line in self.path.read_text().splitlines(keepends=True):
            record = json.loads(line) if line.strip() else None
            if record and record.get("stage") == stage and record.get("step", 0) > after_step:
                dropped += 1
            else:
                keep.append(line)
        if dropped:
            self._rewrite(keep)
        self._file = open(self.path, "a")
        return dropped

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()


def progress(stage: str, total: int, initial: int = 0):
    """A tqdm bar for a stage's steps showing its main metric (process 0 only; RTO_JAX_NO_TQDM=1 turns bars off)."""
    from tqdm.auto import tqdm

    from rto_jax.distributed import is_main_process

    quiet = bool(os.environ.get("RTO_JAX_NO_TQDM")) or not is_main_process()
    return tqdm(total=total, initial=initial, desc=stage, dynamic_ncols=True, disable=quiet)


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def table(title: str, rows: Mapping[str, Mapping[str, Any]]) -> str:
    """A plain-text table: one row per key of `rows`, one column per metric (union, first-seen order)."""
    columns: list[str] = []
    for row in rows.values():
        columns += [c for c in row if c not in columns]
    header = [""] + columns
    body = [[name] + [_fmt(row.get(c, "")) for c in columns] for name, row in rows.items()]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *body)]
    line = lambda cells: "  ".join(
        str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(cells, widths))
    )
    rule = "-" * (sum(widths) + 2 * (len(widths) - 1))
    return "\n".join([f"== {title} ==", line(header), rule] + [line(r) for r in body])


def summary(title: str, metrics: Mapping[str, Any]) -> str:
    """A two-column table of one stage's final numbers."""
    width = max((len(k) for k in metrics), default=0)
    return "\n".join([f"== {title} =="] + [f"{k.ljust(width)}  {_fmt(v)}" for k, v in metrics.items()])
