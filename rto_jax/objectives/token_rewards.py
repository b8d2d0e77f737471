"""Token rewards of the token-level MDP (RTO, arXiv 2404.18922, eq. 4.4 and Alg. 2 line 5):

    r_h = beta_dpo * log(pi_dpo(y_h) / pi_ref(y_h))        # DPO's implicit token reward (clipped)
          - beta_kl * log(pi_old(y_h) / pi_ref(y_h))       # KL penalty
          + beta_rm * [h == H] * score                     # the reward model's score at the last token

The DPO term is DPO's implicit reward, a property of the two models' own distributions: it reads
their log-probs at temperature 1 (`untempered(name)`), whatever the sampling temperature. The KL
term is between the distributions the rollout sampled from and is penalized against, so it reads
the log-probs at the rollout temperature tau (as the importance ratio does).

A token reward is a pure function, passed to PPO's experience maker as it is:

    reward(logps, score, mask, **coefficients) -> (rewards [B, R] float32, parts {name: [B, R]})

    logps  {model: [B, R]}: log-probs of the sampled response tokens at the rollout temperature
           (0 where `mask` is 0); "policy" is the rollout policy pi_old, every other name is a
           frozen model the reward lists in `uses` ("ref" = pi_ref = pi_sft, "dpo" = pi_dpo, or any
           model a recipe loads); `untempered(model)` holds the same model's log-probs at temperature 1;
           `logps[GOLD]` (a reward listing GOLD, on a task with a known gold reward: the synthetic
           task) is not a log-prob but the task's exact per-token gold credit, summing to the gold
           reward over each response: the positive controls of experiments/synthetic_study.py
    score  [B]: the reward model's normalized sequence score, or None unless "reward" is in `uses`
    mask   [B, R]: response mask (1 up to and including EOS); H is each row's last valid token

    rewards, parts: float32 rewards [B, R]; parts {name: [B, R] float} that sum to the rewards, each
           logged as `reward/<part>` (a per-sequence sum over every column); all finite and 0 where
           `mask` is 0, also for a row of a single token

`@token_reward(*uses)` records which frozen models (and whether the reward model) the run must load;
a recipe offers "ref" and "dpo" unless it declares its own `MODELS`. The coefficients are
keyword-only with defaults: a config's `ppo.reward_args` starts from them (`reward_args(fn)`).
Float coefficients are traced values inside PPO's jitted step (`BoundReward`): runs that differ only in
them share one compiled program, and a reward branches on one with `jnp.where` (as `clip_symmetric`
does), not with a Python `if`.
`config.validate` calls the recipe's rewards on small fake inputs, eagerly and traced, before any
stage runs (rto_jax/pipeline/reward_check.py): a reward that breaks this contract is one error
naming it, its file and what was expected.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from rto_jax.objectives.masked import apply_mask, masked_sum

REWARD_MODEL = "reward"  # the name in `uses` that asks for the reward model's score
GOLD = "gold"  # the name in `uses` that asks for the task's gold credit per token (tasks with a gold reward)
_UNTEMPERED = "@T=1"


def untempered(model: str) -> str:
    """The `logps` key of `model`'s log-probs at temperature 1 (its own distribution)."""
    return model + _UNTEMPERED


def is_untempered(key: str) -> bool:
    return key.endswith(_UNTEMPERED)


def token_reward(*uses: str):
    """Marks `fn(logps, score, mask, **coefficients)` as a token reward reading `uses`."""

    def mark(fn):
        fn.uses = tuple(uses)
        return fn

    return mark


def frozen_models(fn) -> tuple[str, ...]:
    """The frozen language models whose log-probs `fn` reads (its `uses` without the reward model and GOLD)."""
    return tuple(name for name in fn.uses if name not in (REWARD_MODEL, GOLD))


def needs_reward_model(fn) -> bool:
    return REWARD_MODEL in fn.uses


def needs_gold(fn) -> bool:
    return GOLD in fn.uses


def reward_args(fn) -> dict:
    """`fn`'s keyword-only coefficients and their defaults (the only place they are defined)."""
    params = inspect.signature(fn).parameters.values()
    return {p.name: p.default for p in params if p.kind is p.KEYWORD_ONLY}


def is_traced_coefficient(value) -> bool:
    """Whether a jitted step takes this coefficient value as traced data: a float (or an array, already
    traced inside a step), not an int (it may be a size or a count) nor a bool or a string (a switch)."""
    return isinstance(value, float | np.floating | jax.Array)


class _Traced:
    """Stands for a traced coefficient in `BoundReward.structure()`: any arithmetic with it fails."""

    def __repr__(self) -> str:
        return "<traced>"


TRACED = _Traced()


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True)
class BoundReward:
    """A token reward with its coefficients fixed.

    Hashable (a config holding it can key a cache) and a pytree whose leaves are its float
    coefficients (`is_traced_coefficient`): a jitted step takes it as an argument, so its float
    coefficients are traced values, not constants of the program, and runs that differ only in them
    (a sweep of beta_kl, each method's own values, a study's cells) share one compiled program. Its
    function, the coefficient names and any other value are the pytree's static part.
    """

    fn: Callable
    args: tuple = ()  # sorted (name, value) pairs

    @property
    def uses(self) -> tuple[str, ...]:
        return self.fn.uses

    @property
    def name(self) -> str:
        return self.fn.__name__

    def __call__(self, logps, score, mask):
        return self.fn(logps, score, mask, **dict(self.args))

    def structure(self) -> "BoundReward":
        """This reward with every traced coefficient's value replaced by TRACED: what a step's program
        depends on (equal for two rewards that differ only in traced coefficients); not callable."""
        return BoundReward(self.fn, tuple((k, TRACED if is_traced_coefficient(v) else v) for k, v in self.args))

    def tree_flatten(self):
        traced = tuple(is_traced_coefficient(v) for _, v in self.args)
        leaves = tuple(v for (_, v), t in zip(self.args, traced, strict=True) if t)
        return leaves, (self.fn, self.structure().args)

    @classmethod
    def tree_unflatten(cls, static, leaves):
        fn, args = static
        leaves = iter(leaves)
        return cls(fn, tuple((k, next(leaves) if v is TRACED else v) for k, v in args))


def as_bound(fn) -> BoundReward:
    """`fn` as a BoundReward: a BoundReward as it is, a plain token reward with its defaults (`bind(fn)`)."""
    return fn if isinstance(fn, BoundReward) else bind(fn)


def gold_credit_argument(fn):
    """A task's gold function (`fn(prompt_ids, prompt_mask, response_ids, response_mask)`) as an argument
    of a compiled program: a jax.tree_util.Partial, whose array arguments (a synthetic task's tables)
    are traced leaves, so tasks that differ only in their tables (seeds) share one program; the function
    itself is static. A plain function becomes a Partial with no leaves (static, as before); None stays None."""
    if fn is None or isinstance(fn, jax.tree_util.Partial):
        return fn
    return jax.tree_util.Partial(fn)


def bind(fn, **coefficients) -> BoundReward:
    """`fn` with `coefficients` (a subset of `reward_args(fn)`; the rest keep their defaults)."""
    unknown = sorted(set(coefficients) - set(reward_args(fn)))
    if unknown:
        raise TypeError(f"token reward {fn.__name__!r} takes no {unknown}; its coefficients: {sorted(reward_args(fn))}")
    return BoundReward(fn, tuple(sorted(coefficients.items())))


# ----------------------------------------------------------------------------------------------
# Pieces.


def last_token_index(mask):
    """Index of the last valid token per row: ``[B, T] -> [B]`` int32; -1 for an empty row."""
    cols = jnp.arange(mask.shape[-1], dtype=jnp.int32)
    return jnp.max(jnp.where(mask > 0, cols, -1), axis=-1)


def at_last_token(values, mask):
    """``values [B]`` placed at each row's last valid token of ``mask [B, T]``, 0 elsewhere: ``[B, T]``."""
    is_last = jnp.arange(mask.shape[-1])[None, :] == last_token_index(mask)[:, None]
    return jnp.where(is_last, jnp.asarray(values, jnp.float32)[:, None], 0.0)


def clip_symmetric(x, c):
    """``clip(x, -c, c)``; ``c <= 0`` means no clip (valid for a traced ``c`` as well)."""
    return jnp.where(c > 0, jnp.clip(x, -jnp.abs(c), jnp.abs(c)), x)


def log_ratio(logps: Mapping, model: str, base: str, mask):
    """``log pi_model(y_h) - log pi_base(y_h)`` in float32, 0 outside ``mask``: ``[B, R]``
    (`model` and `base` are `logps` keys: a model's name, or `untempered(name)`)."""
    f32 = lambda name: jnp.asarray(logps[name], jnp.float32)
    return apply_mask(f32(model) - f32(base), mask)


def dpo_log_ratio(logps: Mapping, mask):
    """``log pi_dpo(y_h) - log pi_ref(y_h)`` at temperature 1: ``[B, R]``; times beta_dpo, DPO's
    implicit token reward."""
    return log_ratio(logps, untempered("dpo"), untempered("ref"), mask)


def sum_parts(parts: dict, mask):
    """(rewards, parts) of a token reward from its named parts {name: [B, R]}: each cast to float32
    and set to 0 outside `mask`, and their sum."""
    parts = {k: apply_mask(jnp.asarray(v, jnp.float32), mask) for k, v in parts.items()}
    return sum(parts.values()), parts


# ----------------------------------------------------------------------------------------------
# The paper's methods and ablations.


@token_reward("ref", REWARD_MODEL)
def ppo(logps, score, mask, *, beta_kl=0.01, beta_rm=1.0):
    """PPO's reward (sparse): the KL penalty per token and the score at the last token."""
    return sum_parts(
        {"kl": -beta_kl * log_ratio(logps, "policy", "ref", mask), "score": beta_rm * at_last_token(score, mask)}, mask
    )


@token_reward("ref", "dpo", REWARD_MODEL)
def rto(logps, score, mask, *, beta_dpo=0.05, dpo_clip=0.05, beta_kl=0.01, beta_rm=1.0):
    """RTO: the clipped DPO token reward on every token, the KL penalty, the score at the last token."""
    return sum_parts(
        {
            "dpo": clip_symmetric(beta_dpo * dpo_log_ratio(logps, mask), dpo_clip),
            "kl": -beta_kl * log_ratio(logps, "policy", "ref", mask),
            "score": beta_rm * at_last_token(score, mask),
        },
        mask,
    )


@token_reward("ref", "dpo", REWARD_MODEL)
def rto_sequence_end(logps, score, mask, *, beta_dpo=0.05, dpo_clip=0.05, beta_kl=0.01, beta_rm=1.0):
    """Ablation: DPO's sequence reward (the sum of the unclipped token terms, then clipped) at the last token."""
    dpo_sequence = masked_sum(beta_dpo * dpo_log_ratio(logps, mask), mask, axis=-1)
    return sum_parts(
        {
            "dpo": at_last_token(clip_symmetric(dpo_sequence, dpo_clip), mask),
            "kl": -beta_kl * log_ratio(logps, "policy", "ref", mask),
            "score": beta_rm * at_last_token(score, mask),
        },
        mask,
    )


@token_reward("ref", "dpo")
def rto_no_rm(logps, score, mask, *, beta_dpo=0.05, dpo_clip=0.05, beta_kl=0.01):
    """Ablation: RTO without the reward model (DPO token reward and KL penalty only)."""
    del score
    return sum_parts(
        {
            "dpo": clip_symmetric(beta_dpo * dpo_log_ratio(logps, mask), dpo_clip),
            "kl": -beta_kl * log_ratio(logps, "policy", "ref", mask),
        },
        mask,
    )


# Named for configs (`ppo.reward`); a recipe may pass any function with the same signature instead.
TOKEN_REWARDS = {fn.__name__: fn for fn in (rto, ppo, rto_sequence_end, rto_no_rm)}
