"""Errors that are the user's to fix: a config key, a data file, a model source.

`experiments/run.py` prints such an error as one line (no traceback), removes what the run had
written when it failed before any work, and exits with status 2 (74 for the disk). Every other exception is a bug and keeps its traceback.

    ConfigError   a config value: the message starts with the key (`config.ppo.lr: ...`)
    DataError     a data file or dataset: names the file (and the row and column when there is one)
    ModelError    a model or tokenizer source: an unreachable hub id, an unsupported architecture
                  field, a tokenizer that does not fit the model; names the key and the source
    StorageError  the disk: full, over quota, read-only, failing; names the path and what was being
                  written (stage and step); exit status 74
"""

from __future__ import annotations

import contextlib
import errno
import os
import re


class UserError(ValueError):
    """Bad input from the user; the message alone says what is wrong and where."""


class ConfigError(UserError):
    """A bad config value; the message starts with the key (`config.a.b: ...`)."""

    def __init__(self, key: str, message: str):
        super().__init__(f"config.{key}: {message}")
        self.key = key


class DataError(UserError):
    """A data file or dataset that cannot be used: `<file>[: row R][, column 'C']: <what>`."""

    def __init__(self, source: str, message: str, row: int | None = None, column: str | None = None):
        where = str(source)
        if row is not None:
            where += f": row {row}"
        if column is not None:
            where += f", column {column!r}"
        super().__init__(f"{where}: {message}")
        self.source, self.row, self.column = str(source), row, column


class ModelError(UserError):
    """A model or tokenizer source that cannot be used as configured."""


class StorageError(UserError):
    """Writing a file failed for a reason of the disk's (full, quota, file-size limit, read-only, I/O)."""

    def __init__(self, message: str, where: str = ""):
        super().__init__(message)
        self.where = where  # what was being written ('sft step 20'); '' until a `disk_errors` block names it


# The errors of a disk rather than of the code: these say "free space / fix the mount and rerun".
DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO)


def disk_failure(error: BaseException) -> tuple[str, str] | None:
    """(what the OS said, the path) when `error` is a disk failure, else None. Understands OSError
    and the messages of tensorstore (orbax's writer), which carry the OS error code."""
    if isinstance(error, OSError) and error.errno in DISK_ERRNOS:
        return os.strerror(error.errno), str(error.filename or "")
    text = str(error)
    code = re.search(r"os_error_code='?(\d+)", text)
    if code and int(code.group(1)) in DISK_ERRNOS:
        path = re.search(r'(?:Failed writing|Error writing)[^"]*"(/[^"]+)"', text)
        return os.strerror(int(code.group(1))), path.group(1) if path else ""
    return None


@contextlib.contextmanager
def disk_errors(what: str):
    """Turns a disk failure inside the block into one StorageError naming `what` was being written
    (e.g. 'sft step 20') and the path; everything else passes through unchanged."""
    try:
        yield
    except StorageError as e:
        if e.where:  # an inner block named it already
            raise
        raise StorageError(f"{what}: {e}", where=what) from None
    except UserError:
        raise
    except Exception as e:
        failure = disk_failure(e)
        if failure is None:
            raise
        reason, path = failure
        raise StorageError(f"{what}: writing {path or 'a file'} failed: {reason}", where=what) from None
