"""Command-line config overrides checked before absl parses them: a config file that does not load, an
unknown preset or an unknown key (`--config.ppo.betadpo=0.1`) is a `ConfigError` naming it, with the
nearest valid keys, instead of ml_collections' traceback.

The recipe and its coefficients are not left to absl: `--config.recipe=experiments/ppo.py` goes through
`recipes.set_recipe` (the new reward's own coefficients, not the old reward's), and only then are
`--config.ppo.reward_args.KEY=VALUE` applied, checked against that reward (`RecipeOverrides`).
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import difflib
import os
import re
import traceback
from collections.abc import Sequence
from pathlib import Path

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


def _config_file_error(path: str, e: Exception) -> UserError | None:
    """A locked-config mistake in a config file (a key ml_collections refuses, such as a coefficient
    the recipe's reward does not take, or a value of another type than the key's) as one line naming
    the file, line and statement; None for anything else (a bug keeps its traceback)."""
    frames = traceback.extract_tb(e.__traceback__)
    if not frames or "ml_collections" not in frames[-1].filename:
        return None
    config_files = {os.path.abspath(path)}
    ours = [f for f in frames if os.path.abspath(f.filename) in config_files or Path(f.filename).parent.name == "configs"]
    if not ours:
        return None
    where = ours[-1]
    message = str(e.args[0] if e.args else e)
    if message[:1] == message[-1:] == "'":  # ml_collections raises with the repr of its message
        with contextlib.suppress(ValueError, SyntaxError):
            message = ast.literal_eval(message)
    message = " ".join(message.split())
    locked = re.match(r'Key "(\w+)" does not exist and cannot be added since the config is locked\. Other fields present: "(.*)"$', message)
    if locked:
        try:
            present = ", ".join(ast.literal_eval(locked.group(2)))
        except (ValueError, SyntaxError, TypeError):
            present = locked.group(2)
        message = f"no key {locked.group(1)!r} there (the config is locked; its keys: {present})"
    hint = ""
    if "reward_args" in (where.line or ""):
        hint = (
            " (ppo.reward_args holds the coefficients of the recipe's token reward, set by "
            "rto_jax.pipeline.recipes.set_recipe: point the config at the recipe first, then set those it takes)"
        )
    return UserError(f"{where.filename}:{where.lineno}: `{where.line}`: {message}{hint}")


def load_config_arg(value: str):
    """The config of `--config=FILE[:preset]`; a missing file, an unknown preset or a key the config
    file sets that its config does not have is a UserError."""
    from rto_jax.pipeline.config import config_from_file

    path, _, preset = value.partition(":")
    if not os.path.isfile(path):
        raise UserError(f"--config={value}: no such config file {path!r}")
    try:
        return config_from_file(path, preset or None)
    except UserError:
        raise
    except (AttributeError, KeyError, TypeError) as e:  # TypeError: a value of another type than the key's
        error = _config_file_error(path, e)
        if error is None:
            raise
        raise error from None
    except ValueError as e:  # the config files' way to refuse a preset
        raise UserError(f"--config={value}: {e}") from None


RECIPE_KEY = "recipe"
REWARD_ARGS_PREFIX = "ppo.reward_args."


@dataclasses.dataclass
class RecipeOverrides:
    """`--config.recipe` and `--config.ppo.reward_args.*` of a command line, applied after the config
    file and absl's overrides: the recipe first (set_recipe: its reward's default coefficients; the run
    named after it unless --config.name is given), then the coefficients, checked against its reward."""

    recipe: str | None = None
    reward_args: dict[str, str] = dataclasses.field(default_factory=dict)  # key -> the value as typed
    name_given: bool = False

    def apply(self, config) -> None:
        from rto_jax.pipeline.recipes import RecipeError, load_recipe, set_recipe

        if self.recipe is not None:
            try:
                set_recipe(config, self.recipe, name=config.name if self.name_given else None)
            except RecipeError as e:
                raise ConfigError(RECIPE_KEY, str(e)) from None
        if not self.reward_args:
            return
        try:
            fn = load_recipe(config.recipe).TOKEN_REWARD
        except RecipeError as e:
            raise ConfigError(RECIPE_KEY, str(e)) from None
        known = config.ppo.reward_args
        for key, text in self.reward_args.items():
            if key not in known:
                raise ConfigError(
                    REWARD_ARGS_PREFIX + key,
                    f"the token reward {fn.__name__!r} of {config.recipe} takes no {key!r}; its coefficients: "
                    f"{', '.join(known) or 'none'}",
                )
            known[key] = _coefficient(REWARD_ARGS_PREFIX + key, text, known[key])


def _coefficient(key: str, text: str, default):
    """`text` as a value of the type of the coefficient's default (a number, or True/False)."""
    try:
        if isinstance(default, bool):
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError
            return text.lower() in ("true", "1")
        return int(text) if isinstance(default, int) else float(text)
    except ValueError:
        kind = "True or False" if isinstance(default, bool) else "an integer" if isinstance(default, int) else "a number"
        raise ConfigError(key, f"expected {kind}, got {text!r}") from None


def split_recipe_overrides(argv: Sequence[str]) -> tuple[list[str], RecipeOverrides]:
    """(argv without the recipe and reward-coefficient overrides, those overrides)."""
    rest, out = [], RecipeOverrides()
    out.name_given = "name" in override_keys(argv)
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        key, value = None, None
        if arg.startswith(f"--{_FLAG}."):
            key, sep, value = arg[len(f"--{_FLAG}.") :].partition("=")
            if not sep and (key == RECIPE_KEY or key.startswith(REWARD_ARGS_PREFIX)):
                value = args[i + 1] if i + 1 < len(args) else ""  # `--config.KEY VALUE`
                i += 1
        if key == RECIPE_KEY:
            out.recipe = value
        elif key is not None and key.startswith(REWARD_ARGS_PREFIX) and "." not in key[len(REWARD_ARGS_PREFIX) :]:
            out.reward_args[key[len(REWARD_ARGS_PREFIX) :]] = value
        else:
            rest.append(arg)
        i += 1
    return rest, out


def check_overrides(argv: Sequence[str]) -> None:
    """Raises ConfigError for the first override key the config does not have (before absl does), and
    for a recipe or reward coefficient that `RecipeOverrides` would refuse."""
    value = _config_arg(argv)
    if value is None:
        return
    config = load_config_arg(value)
    rest, recipe_overrides = split_recipe_overrides(argv)
    recipe_overrides.apply(config)
    valid = config_keys(config)
    for key in override_keys(rest):
        if key in valid:
            continue
        near = nearest_keys(key, valid)
        hint = f"; did you mean {', '.join('config.' + k for k in near)}?" if near else ""
        raise ConfigError(key, f"no such key in {value}{hint}")
