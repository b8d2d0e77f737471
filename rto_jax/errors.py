"""Errors that are the user's to fix: a config key, a data file, a model source.

`experiments/run.py` prints such an error as one line (no traceback), removes what the run had
written, and exits with status 2. Every other exception is a bug and keeps its traceback.

    ConfigError   a config value: the message starts with the key (`config.ppo.lr: ...`)
    DataError     a data file or dataset: names the file (and the row and column when there is one)
    ModelError    a model or tokenizer source: an unreachable hub id, an unsupported architecture
                  field, a tokenizer that does not fit the model; names the key and the source
"""

from __future__ import annotations


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
