"""The recipe's token rewards, called on small fake inputs before any stage runs.

A reward that breaks its contract (rto_jax/objectives/token_rewards.py) otherwise surfaces after
SFT, the reward model and DPO have trained, as a JAX traceback from deep inside PPO's jitted step
that names neither the reward nor `[B, R]`. `check_recipe_rewards(config)` (run by
`config.validate`) calls the recipe's TOKEN_REWARD and every entry of its METHODS with the
coefficients the run will use, under jax.jit as in training (where a reward can fail that works
eagerly; a failing one is run eagerly as well, to say which), and raises one ConfigError naming the
reward, its file and line, and what was expected:

    rewards [B, R] float32; parts {name: [B, R] float} that sum to the rewards; every value finite;
    rewards and parts 0 where the mask is 0; no exception; every name in `uses` a model the recipe
    offers (its `MODELS`, default `("ref", "dpo")`, and the reward model)

The fake rows have different lengths, one of a single token, as rollouts do; log-probs are 0
outside the mask, as `token_reward_logprobs` gives them.
"""

from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Collection, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from rto_jax.errors import ConfigError
from rto_jax.objectives.token_rewards import (
    GOLD,
    REWARD_MODEL,
    BoundReward,
    bind,
    frozen_models,
    needs_gold,
    needs_reward_model,
    untempered,
)

# The frozen language models a recipe offers its token rewards when it declares no `MODELS`: those
# experiments/rto.py and the synthetic recipes pass to stages.run_ppo (`models={"ref": ..., "dpo": ...}`).
DEFAULT_MODELS = ("ref", "dpo")
LENGTHS = (5, 3, 1)  # the fake rows' response lengths: B = 3, R = 5, one row of a single token
# Parts and rewards are float32 sums of a few terms: they agree to float32 rounding, relative to their size.
SUM_RTOL = 1e-5


def offered_models(recipe, config=None) -> tuple[str, ...]:
    """The models a recipe's token rewards may list in `uses`: its frozen language models
    (`MODELS`, default DEFAULT_MODELS), the reward model (always loaded: the critic starts from it)
    and, on a task with a known gold reward (`config.data.source` 'synthetic'), GOLD."""
    gold = (GOLD,) if config is not None and config.data.source == "synthetic" else ()
    return (*getattr(recipe, "MODELS", DEFAULT_MODELS), REWARD_MODEL, *gold)


def check_recipe_rewards(config) -> None:
    """ConfigError (key `recipe`) unless the recipe's TOKEN_REWARD, bound to `ppo.reward_args`, and
    each of its METHODS, bound to the coefficients the run gives it (`ppo.per_method`), keep the
    token reward contract. Call after the recipe and its coefficients are checked."""
    from rto_jax.pipeline.config import method_settings, parse_per_method
    from rto_jax.pipeline.recipes import load_recipe

    recipe = load_recipe(config.recipe)
    offered = offered_models(recipe, config)
    check_token_reward(recipe.TOKEN_REWARD, config.ppo.reward_args.to_dict(), offered, config.recipe)
    per_method = parse_per_method(config.ppo.per_method)
    for fn in getattr(recipe, "METHODS", ()):
        _, args = method_settings(config, fn, per_method.get(fn.__name__, {}))
        check_token_reward(fn, args, offered, config.recipe)


def check_token_reward(fn, args: Mapping, offered: Collection[str], recipe: str) -> None:
    """ConfigError (key `recipe`) naming `fn`, its file and line and what was expected, unless `fn`
    bound to `args` keeps the token reward contract on fake inputs; `offered`: the names its
    `uses` may list (`offered_models`); `recipe`: the recipe's path, for the message."""
    if not callable(fn):
        raise ConfigError("recipe", f"{recipe}: its token reward {fn!r} is not a function")
    if not hasattr(fn, "uses"):
        expected = 'expected the models it reads, e.g. @token_reward("ref", "reward") over its def'
        raise _error(BoundReward(fn), f"is not marked @token_reward(...); {expected}")
    reward, offered = bind(fn, **args), tuple(offered)
    try:
        hash(reward)
    except TypeError:  # a coefficient that is not a number: checked every time
        return _check.__wrapped__(reward, offered, recipe)
    _check(reward, offered, recipe)


@functools.lru_cache(maxsize=64)  # validate runs once per seed and variant; the reward is a pure function
def _check(reward, offered: tuple[str, ...], recipe: str) -> None:
    error = functools.partial(_error, reward)
    for model in reward.uses:
        if model not in offered:
            hint = " ('policy' is always given: list only frozen models)" if model == "policy" else ""
            raise error(
                f"uses {model!r}, which {recipe} does not offer{hint}; it offers {', '.join(offered)} "
                "(a recipe passing other models to stages.run_ppo lists them in MODELS = (...))"
            )
    with jax.default_device(_host_device()):
        logps, score, mask = fake_inputs(reward.fn)
        try:  # as in training: inside jax.jit, the float coefficients traced (one compilation: faster than op by op)
            out = jax.jit(BoundReward.__call__)(reward, logps, score, mask)
        except Exception as traced:  # noqa: BLE001 - whatever the user's code raises is the user's to fix
            try:  # the error eagerly, if it fails eagerly too; else the traced one, saying so
                reward(logps, score, mask)
            except Exception as eager:  # noqa: BLE001
                raise error(_raised(eager, logps, score), values=True) from None
            what = _raised(traced, logps, score) + " when traced (under jax.jit, as in training)"
            if isinstance(traced, jax.errors.ConcretizationTypeError):  # TracerBoolConversionError among them
                what += (
                    ": its float coefficients and inputs are traced values there; branch on one with "
                    "jnp.where, not a Python if"
                )
            raise error(what, values=True) from None
        _check_output(out, mask, error, values=True)


def _host_device():
    """The CPU (tiny arrays: no accelerator program compiled for them), unless JAX_PLATFORMS leaves it out."""
    try:
        return jax.local_devices(backend="cpu")[0]
    except RuntimeError:
        return jax.local_devices()[0]


def fake_inputs(fn, lengths=LENGTHS):
    """(logps, score, mask) as PPO's experience maker gives them to `fn`, for rows of `lengths`:
    float32 log-probs of "policy" and of every model in `fn.uses`, at the rollout temperature and
    at temperature 1, 0 outside the mask; the normalized score [B] when `fn` reads the reward model."""
    rng = np.random.default_rng(0)
    batch, length = len(lengths), max(lengths)
    mask = (np.arange(length)[None, :] < np.asarray(lengths)[:, None]).astype(np.float32)
    logps = {}
    for model in ("policy", *frozen_models(fn)):
        for key in (model, untempered(model)):
            logps[key] = jnp.asarray(rng.uniform(-4.0, -0.05, (batch, length)).astype(np.float32) * mask)
    if needs_gold(fn):  # the gold credit per token: r* in [-1, 1] split over the tokens
        logps[GOLD] = jnp.asarray(rng.uniform(-0.5, 0.5, (batch, length)).astype(np.float32) * mask)
    score = jnp.asarray(rng.normal(size=batch).astype(np.float32)) if needs_reward_model(fn) else None
    return logps, score, jnp.asarray(mask)


def _error(reward, what: str, values: bool = False) -> ConfigError:
    fn = reward.fn
    try:
        where = f"{_relative(inspect.getsourcefile(fn))}:{inspect.getsourcelines(fn)[1]}"
    except (OSError, TypeError):
        where = "source unknown"
    with_args = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in reward.args)
    args = f" with {with_args}" if values and with_args else ""
    name = getattr(fn, "__name__", repr(fn))
    return ConfigError("recipe", f"token reward {name!r} ({where}){args} {what}")


def _relative(path: str) -> str:
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


def _raised(error: Exception, logps: Mapping, score) -> str:
    message = str(error).strip().splitlines()[0] if str(error).strip() else ""
    what = f"raised {type(error).__name__}" + (f": {message}" if message else "")
    if isinstance(error, KeyError):
        what += f" (logps holds {', '.join(logps)}: a model it reads must be listed in @token_reward(...))"
    elif score is None and "None" in str(error):
        what += " (score is None unless 'reward' is listed in @token_reward(...))"
    return what


def _check_output(out, mask, error, values: bool) -> None:
    """Raises `error(what)` unless `out` is (rewards [B, R] float32, parts {name: [B, R] float}) and, with
    `values`, every value is finite, 0 outside `mask`, and the parts sum to the rewards."""
    expected = tuple(mask.shape)
    if not (isinstance(out, tuple | list) and len(out) == 2 and isinstance(out[1], Mapping)):
        raise error(f"returned {_describe(out)}; expected a pair (rewards [B, R], parts {{name: [B, R]}})")
    rewards, parts = out
    arrays = {}  # parts first: a non-finite reward is reported by the part that made it
    for key, part in parts.items():
        if not isinstance(key, str) or not key:
            raise error(f"returned a part named {key!r}; expected non-empty strings (logged as reward/<part>)")
        arrays[f"part {key!r}"] = part
    arrays["rewards"] = rewards
    for what in ("rewards", *(w for w in arrays if w != "rewards")):
        array = arrays[what]
        shape, dtype = tuple(getattr(array, "shape", ())), getattr(array, "dtype", None)
        if shape != expected or dtype is None:
            raise error(f"returned {what} as {_describe(array)}; expected [B, R] = {expected} (mask's shape)")
        ok = dtype == jnp.float32 if what == "rewards" else jnp.issubdtype(dtype, jnp.floating)
        if not ok:
            wanted = "float32" if what == "rewards" else "a float dtype"
            raise error(f"returned {what} of dtype {dtype}; expected {wanted}")
    if not values:
        return
    host = {what: np.asarray(array, np.float64) for what, array in arrays.items()}
    outside = np.asarray(mask) == 0
    for what, array in host.items():
        bad = np.argwhere(~np.isfinite(array))
        if len(bad):
            row, col = bad[0]
            raise error(
                f"returned {what} with {array[row, col]} at [{row}, {col}]; expected finite values", values=True
            )
    for what, array in host.items():
        bad = np.argwhere(outside & (array != 0))
        if len(bad):
            row, col = bad[0]
            raise error(
                f"returned {what} = {array[row, col]:.4g} at [{row}, {col}], outside the mask (row {row} has "
                f"{int(np.asarray(mask)[row].sum())} tokens); expected 0 there (apply_mask)",
                values=True,
            )
    total = sum((host[f"part {key!r}"] for key in parts), np.zeros(expected))
    scale = max(1.0, *(np.abs(a).max() for a in host.values()))
    gap = np.abs(total - host["rewards"])
    if gap.max() > SUM_RTOL * scale:
        row, col = np.unravel_index(gap.argmax(), gap.shape)
        names = " + ".join(parts) or "no parts"
        raise error(
            f"returned parts that do not sum to the rewards: {names} = {total[row, col]:.6g} at [{row}, {col}], "
            f"rewards {host['rewards'][row, col]:.6g}; expected equal (each part is logged as reward/<part>)",
            values=True,
        )


def _describe(value) -> str:
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        return f"an array of shape {tuple(value.shape)} {value.dtype}"
    if isinstance(value, tuple | list):
        return f"a {type(value).__name__} of {len(value)}"
    return f"a {type(value).__name__}"
