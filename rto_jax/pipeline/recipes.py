"""Recipes: the short files in `experiments/` that compose the stages into one experiment.

A recipe is a Python module with

    TOKEN_REWARD = <a token reward>       # rto_jax.objectives.token_rewards, or one written in the file
    def run(pipeline) -> dict: ...        # calls pipeline.stage(...) for each stage, returns the results

and a config names it (`config.recipe = "experiments/rto.py"`, or the module name "experiments.rto").
Its coefficients are the config's `ppo.reward_args`, which start from the reward's own defaults
(`set_recipe`). Optionally:

    METHODS = (ppo, rto, ...)             # a recipe training several token rewards: config.ppo.per_method
                                          # may give each its own lr and coefficients; an entry
                                          # `method(rto, "rto_rloo", estimator="rloo", samples_per_prompt=4)`
                                          # is a token reward trained with its own config.ppo values
    def validate(config): ...             # checks of the recipe's own config keys (ConfigError), run by
                                          # config.validate before any work

`experiments/` and `configs/` are packages: a recipe imports another as `from experiments import rto`,
a config file another as `from configs import rto_tldr`. A file of the repository's packages loads
as that package's module (experiments/rto.py is `experiments.rto`, whichever way it is named); a file
elsewhere loads under a name of its own, registered in `sys.modules` before its code runs (so it may
define dataclasses).
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
import os
import sys
from pathlib import Path

from ml_collections import config_dict

from rto_jax.objectives.token_rewards import reward_args

REPO_ROOT = Path(__file__).resolve().parents[2]


class RecipeError(ValueError):
    """A recipe path that does not exist or a file that is not a recipe."""


def make_repo_importable() -> None:
    """Puts the repository root on sys.path, so that `experiments` and `configs` import as packages
    from any working directory. Appended: a copy of them first on the path (experiments/run.py puts its
    own repository there) is the one imported."""
    if str(REPO_ROOT) not in sys.path:
        sys.path.append(str(REPO_ROOT))


def _is_module_name(ref: str) -> bool:
    return not ref.endswith(".py") and "/" not in ref and os.sep not in ref


def recipe_path(ref: str) -> Path:
    """The file of `ref`: a path as given (absolute or from the working directory), else relative to the
    repository root; or a module name of the repository ('experiments.rto')."""
    if _is_module_name(ref) and not Path(ref).is_file():
        candidates = [REPO_ROOT / (ref.replace(".", "/") + ".py")]
    else:
        candidates = [Path(ref).expanduser()]
        if not candidates[0].is_absolute():
            candidates.append(REPO_ROOT / ref)
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    raise RecipeError(f"recipe {ref!r} not found (looked in {', '.join(str(c) for c in candidates)})")


def recipe_name(ref: str) -> str:
    """The short name of a recipe: 'experiments/length_bonus.py' and 'experiments.length_bonus' -> 'length_bonus'."""
    return Path(ref).stem if not _is_module_name(ref) else ref.rpartition(".")[2]


def package_module_name(path: Path) -> str | None:
    """The dotted name of a file inside a package of the repository ('experiments.rto'), else None."""
    try:
        parts = path.resolve().relative_to(REPO_ROOT).with_suffix("").parts
    except ValueError:
        return None
    packages = [REPO_ROOT.joinpath(*parts[:i]) for i in range(1, len(parts))]
    if not packages or not all((folder / "__init__.py").is_file() for folder in packages):
        return None
    return ".".join(parts)


def import_file(path: str | os.PathLike, prefix: str, *, fresh: bool = False):
    """The module of the Python file `path`.

    A file in a package of the repository is imported under its package name (one module however it is
    named). Any other file runs as the module `<prefix><stem>_<hash of its path>`, registered in
    sys.modules before its code runs (dataclasses and pickling look their module up there); `fresh`
    runs such a file again even if it was loaded before.
    """
    path = Path(path).resolve()
    make_repo_importable()
    name = package_module_name(path)
    if name is not None:
        return importlib.import_module(name)
    name = f"{prefix}{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"
    if name in sys.modules and not fresh:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


@functools.lru_cache(maxsize=None)
def _load(path: Path):
    module = import_file(path, "rto_jax_recipe_")
    for attr in ("run", "TOKEN_REWARD"):
        if not hasattr(module, attr):
            raise RecipeError(f"recipe {path} defines no {attr} (see rto_jax/pipeline/recipes.py)")
    return module


def load_recipe(ref: str | os.PathLike):
    """The recipe module `ref` names: a path, or a module name of the repository (loaded once per process)."""
    return _load(recipe_path(str(ref)))


def set_recipe(config, ref: str, *, name: str | None = None) -> None:
    """Points `config` at the recipe `ref`, resets `ppo.reward_args` to its token reward's defaults and
    names the run after it.

    name: the run's new `config.name`. By default a name that starts with the old recipe's name takes
    the new one instead ('rto_tldr_tiny' with experiments/length_bonus.py -> 'length_bonus_tldr_tiny'):
    a fork's results are not filed under its parent's name. Any other name (set by the user) is kept.
    """
    fn = load_recipe(ref).TOKEN_REWARD
    if name is None:
        old, new = recipe_name(str(config.recipe)), recipe_name(str(ref))
        name = config.name
        if name == old or name.startswith(old + "_"):
            name = new + name[len(old) :]
    with config.unlocked():
        config.recipe = str(ref)
        config.name = name
        config.ppo.reward_args = config_dict.ConfigDict(reward_args(fn))


def method(fn, name: str, **ppo_settings):
    """Token reward `fn` as a method of its own `name` that trains with `ppo_settings` (config.ppo
    keys, e.g. estimator="rloo", samples_per_prompt=4): RTO's reward with a critic-free estimator as one
    more row of a comparison. The same reward, coefficients and `uses`; config.validate checks the
    settings (rto_jax.pipeline.config.method_ppo_settings) and each PPO run of the method applies them."""

    @functools.wraps(fn)  # the signature (so its coefficients) and `uses` are fn's
    def renamed(logps, score, mask, **coefficients):
        return fn(logps, score, mask, **coefficients)

    renamed.__name__ = renamed.__qualname__ = name
    renamed.ppo_settings = dict(ppo_settings)
    return renamed
