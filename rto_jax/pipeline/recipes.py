"""Recipes: the short files in `experiments/` that compose the stages into one experiment.

A recipe is a Python file with

    TOKEN_REWARD = <a token reward>       # rto_jax.objectives.token_rewards, or one written in the file
    def run(pipeline) -> dict: ...        # calls pipeline.stage(...) for each stage, returns the results

and a config names it (`config.recipe = "experiments/rto.py"`). Its coefficients are the config's
`ppo.reward_args`, which start from the reward's own defaults (`set_recipe`). Optionally:

    METHODS = (ppo, rto, ...)             # a recipe training several token rewards: config.ppo.per_method
                                          # may give each its own lr and coefficients
    def validate(config): ...             # checks of the recipe's own config keys (ConfigError), run by
                                          # config.validate before any work
"""

from __future__ import annotations

import functools
import importlib.util
import os
import sys
from pathlib import Path

from ml_collections import config_dict

from rto_jax.objectives.token_rewards import reward_args

REPO_ROOT = Path(__file__).resolve().parents[2]


class RecipeError(ValueError):
    """A recipe path that does not exist or a file that is not a recipe."""


def recipe_path(path: str) -> Path:
    """`path` as given (absolute or from the working directory), else relative to the repository root."""
    candidates = [Path(path).expanduser()]
    if not candidates[0].is_absolute():
        candidates.append(REPO_ROOT / path)
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    raise RecipeError(f"recipe {path!r} not found (looked in {', '.join(str(c) for c in candidates)})")


@functools.lru_cache(maxsize=None)
def _load(path: Path):
    name = "rto_jax_recipe_" + path.stem
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    # A recipe may import its sibling recipes by name (`import rto`), as when run from experiments/.
    sys.path.insert(0, str(path.parent))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(path.parent))
    for attr in ("run", "TOKEN_REWARD"):
        if not hasattr(module, attr):
            raise RecipeError(f"recipe {path} defines no {attr} (see rto_jax/pipeline/recipes.py)")
    return module


def load_recipe(path: str | os.PathLike):
    """The recipe module at `path` (loaded once per process)."""
    return _load(recipe_path(str(path)))


def set_recipe(config, path: str) -> None:
    """Points `config` at the recipe and resets `ppo.reward_args` to its token reward's defaults."""
    fn = load_recipe(path).TOKEN_REWARD
    with config.unlocked():
        config.recipe = path
        config.ppo.reward_args = config_dict.ConfigDict(reward_args(fn))
