"""Command-line config overrides checked before absl parses them: a config file that does not load, an
unknown preset or an unknown key (`--config.ppo.betadpo=0.1`) is a `ConfigError` naming it, with the
nearest valid keys, instead of ml_collections' traceback.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Sequence

from ml_collections import config_dict

from rto_jax.errors import ConfigError, UserError

_FLAG = "config"


def config_keys(config: config_dict.ConfigDict, prefix: str = "") -> list[str]:
    """Every key path of `config`, sections included: ['name', 'data', 'data.sft', 'data.sft.path', ...]."""
    keys = []
    for name, value in config.items():
        key = f"{prefix}{name}"
        keys.append(key)
        if isinstance(value, config_dict.ConfigDict):
            keys.extend(config_keys(value, key + "."))
    return keys


def nearest_keys(key: str, keys: Sequence[str], count: int = 4) -> list[str]:
    """Valid keys a mistyped `key` most likely meant: same leaf name elsewhere, then close spellings."""
    leaf = key.rpartition(".")[2]
    same_leaf = [k for k in keys if k.rpartition(".")[2] == leaf and k != key]
    close = difflib.get_close_matches(key, keys, n=count, cutoff=0.6)
    close_leaf = [
        k
        for k in keys
        if k.rpartition(".")[0] == key.rpartition(".")[0]
        and difflib.SequenceMatcher(None, leaf, k.rpartition(".")[2]).ratio() >= 0.6
    ]
    out: list[str] = []
    for k in same_leaf + close + close_leaf:
        if k not in out:
            out.append(k)
    return out[:count]


def _config_arg(argv: Sequence[str]) -> str | None:
    for i, arg in enumerate(argv):
        if arg.startswith(f"--{_FLAG}="):
            return arg.split("=", 1)[1]
        if arg == f"--{_FLAG}" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def override_keys(argv: Sequence[str]) -> list[str]:
    """The keys of `--config.KEY=VALUE` / `--config.KEY VALUE` / `--[no]config.KEY` arguments."""
    keys = []
    for arg in argv:
        for start in (f"--{_FLAG}.", f"--no{_FLAG}."):
            if arg.startswith(start):
                keys.append(arg[len(start) :].split("=", 1)[0])
    return keys


def load_config_arg(value: str):
    """The config of `--config=FILE[:preset]`; a missing file or unknown preset is a UserError."""
    from rto_jax.pipeline.config import config_from_file

    path, _, preset = value.partition(":")
    if not os.path.isfile(path):
        raise UserError(f"--config={value}: no such config file {path!r}")
    try:
        return config_from_file(path, preset or None)
    except UserError:
        raise
    except ValueError as e:  # the config files' way to refuse a preset
        raise UserError(f"--config={value}: {e}") from None


def check_overrides(argv: Sequence[str]) -> None:
    """Raises ConfigError for the first override key the config does not have (before absl does)."""
    value = _config_arg(argv)
    keys = override_keys(argv)
    if value is None:
        return
    config = load_config_arg(value)
    valid = config_keys(config)
    for key in keys:
        if key in valid:
            continue
        near = nearest_keys(key, valid)
        hint = f"; did you mean {', '.join('config.' + k for k in near)}?" if near else ""
        raise ConfigError(key, f"no such key in {value}{hint}")
