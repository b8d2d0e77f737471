"""Policy evaluation on held-out prompts: sample, then score every response in one jitted call.

Per response: reward-model score, gold reward (when the task has one), KL to the reference policy
(the sampled sequence's log-ratio, an unbiased estimate of KL(pi || pi_ref)), length, EOS.
Host-side `summarize` turns the per-row arrays into means, standard errors and win rates.
`token_reward_parts` recomputes, for given responses, the token reward exactly as PPO's experience
maker does (the log-probs of the named models, the normalized and clipped score), for display.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rto_jax.objectives.ppo import normalized_score
from rto_jax.objectives.token_rewards import GOLD, as_bound, gold_credit_argument, needs_gold, needs_reward_model
from rto_jax.sampling import SamplingConfig, generate, response_inputs
from rto_jax.scoring import response_logprobs, sequence_scores, token_reward_logprobs


def score_rollouts(
    policy_graphdef: nnx.GraphDef,
    policy_params,
    ref_params,
    reward_graphdef: nnx.GraphDef | None,
    reward_params,
    prompt_ids,
    prompt_mask,
    rng,
    config: SamplingConfig,
    gold_fn: Callable | None = None,
) -> dict:
    """Samples one response per prompt `[B, P]` and scores it; every output is `[B]` (tokens `[B, R]`).
    Jitted (the graphdefs and `config` static).

    gold_fn(prompt_ids, prompt_mask, response_ids, response_mask) -> `[B]`: jittable; a
    jax.tree_util.Partial's arrays (a task's tables) are traced, a plain function is static.
    """
    args = (policy_graphdef, policy_params, ref_params, reward_graphdef, reward_params, prompt_ids, prompt_mask, rng)
    return _score_rollouts(*args, config, gold_credit_argument(gold_fn))


@functools.partial(jax.jit, static_argnames=("policy_graphdef", "reward_graphdef", "config"))
def _score_rollouts(
    policy_graphdef, policy_params, ref_params, reward_graphdef, reward_params, prompt_ids, prompt_mask, rng, config,
    gold_fn,
) -> dict:  # fmt: skip
    samples = generate(policy_graphdef, policy_params, prompt_ids, prompt_mask, rng, config)
    inputs = response_inputs(prompt_ids, prompt_mask, samples)
    mask = samples.response_mask
    tau = config.temperature
    logp, _ = response_logprobs(nnx.merge(policy_graphdef, policy_params), *inputs, mask, tau)
    logp_ref, _ = response_logprobs(nnx.merge(policy_graphdef, ref_params), *inputs, mask, tau)
    out = {
        "tokens": samples.tokens,
        "response_mask": mask,
        "kl": jnp.sum(jnp.where(mask > 0, logp - logp_ref, 0.0), axis=1),
        "length": jnp.sum(mask, axis=1),
        "eos": jnp.any((samples.tokens == config.eos_id) & (mask > 0), axis=1).astype(jnp.float32),
    }
    if reward_graphdef is not None:
        out["score"] = sequence_scores(nnx.merge(reward_graphdef, reward_params), *inputs, mask)
    if gold_fn is not None:
        out["gold"] = gold_fn(prompt_ids, prompt_mask, samples.tokens, mask)
    return out


def evaluate_policy(
    policy_graphdef,
    policy_params,
    ref_params,
    prompts: dict,
    rng,
    config: SamplingConfig,
    *,
    reward_graphdef=None,
    reward_params=None,
    gold_fn=None,
    batch_size: int = 256,
    progress: Callable | None = None,
) -> dict[str, np.ndarray]:
    """`score_rollouts` over all `prompts` (`prompt_ids`, `prompt_mask` `[N, P]`): numpy arrays `[N]` per
    metric. progress: a progress bar over the prompt batches, as `over_prompt_batches` takes it."""
    return over_prompt_batches(
        lambda prompt_ids, prompt_mask, batch_rng: score_rollouts(
            policy_graphdef,
            policy_params,
            ref_params,
            reward_graphdef,
            reward_params,
            prompt_ids,
            prompt_mask,
            batch_rng,
            config,
            gold_fn,
        ),
        prompts,
        rng,
        batch_size,
        progress=progress,
    )


def over_prompt_batches(
    fn, prompts: dict, rng, batch_size: int, progress: Callable | None = None
) -> dict[str, np.ndarray]:
    """Calls `fn(prompt_ids, prompt_mask, rng) -> {name: [b, ...]}` on fixed-size batches of `prompts` `[N, P]`.

    The last batch is padded by repeating prompts so every call has the same shape (one compile); the
    padding rows are dropped. Batch i gets `fold_in(rng, i)`. Returns numpy arrays `[N, ...]`.
    progress: `progress(total)` -> a bar with `update(n)` and `close()`, advanced once per batch (the
    evaluation stage gives a labelled tqdm bar, rto_jax.pipeline.logging.progress); None: no bar.
    """
    total = prompts["prompt_ids"].shape[0]
    batch_size = min(batch_size, total)
    rows: dict[str, list] = {}
    starts = range(0, total, batch_size)
    bar = progress(len(starts)) if progress is not None else None
    for index, start in enumerate(starts):
        take = np.arange(start, start + batch_size) % total
        out = fn(
            jnp.asarray(prompts["prompt_ids"][take]),
            jnp.asarray(prompts["prompt_mask"][take]),
            jax.random.fold_in(rng, index),
        )
        valid = min(batch_size, total - start)
        for key, value in out.items():
            rows.setdefault(key, []).append(np.asarray(value)[:valid])
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return {key: np.concatenate(parts) for key, parts in rows.items()}


def token_reward_parts(*args, token_reward, gold_credit=None, **kwargs) -> dict:
    """`_token_reward_parts`, jitted, with `token_reward` as a BoundReward (a plain token reward function is
    bound with its defaults) and `gold_credit` as a jit argument (`gold_credit_argument`)."""
    return _token_reward_parts(
        *args, token_reward=as_bound(token_reward), gold_credit=gold_credit_argument(gold_credit), **kwargs
    )


@functools.partial(
    jax.jit,
    static_argnames=("graphdef", "reward_graphdef", "temperature", "eos_id", "score_clip"),
)
def _token_reward_parts(
    graphdef: nnx.GraphDef,
    params,
    frozen: dict,
    reward_graphdef: nnx.GraphDef | None,
    reward_params,
    input_ids,
    attention_mask,
    positions,
    response_mask,
    *,
    token_reward,
    temperature: float,
    eos_id: int,
    reward_mean=0.0,
    reward_std=1.0,
    score_clip: float = 10.0,
    missing_eos_penalty=1.0,
    gold_credit=None,
) -> dict:
    """The token reward of given responses (SFT-layout arrays `[B, P+R]`, `response_mask` `[B, R]`),
    computed as PPO's experience maker computes it for its rollouts (rto_jax/train/ppo.py):

        logps  {"policy": the policy `params`, name: each of `frozen` {name: params}} at `temperature`
               and, as untempered(name), at temperature 1; every model on `graphdef` (the policy's
               architecture, as in PPO)
        score  (raw - reward_mean) / reward_std, clipped to +-score_clip, minus missing_eos_penalty
               for a response without EOS; passed to the reward only when it reads the reward model
        token_reward(logps, score, mask) -> (rewards, parts)   a BoundReward (float coefficients traced)
        logps[GOLD] gold_credit(prompt_ids, prompt_mask, response_ids, mask), when the reward reads GOLD
               (a jax.tree_util.Partial's arrays are traced: `gold_credit_argument`)

    Returns {"logps": {model: [B, R]}, "rewards": [B, R], "parts": {name: [B, R]}} and, with a reward
    model, "raw_score" and "score" `[B]` (the score as PPO would use it, whether or not the reward reads it).
    """
    mask = response_mask
    inputs = (input_ids, attention_mask, positions)
    logps = token_reward_logprobs(graphdef, {"policy": params, **frozen}, *inputs, mask, temperature)
    out = {"logps": logps}
    if needs_gold(token_reward):
        if gold_credit is None:
            raise ValueError(f"token reward {token_reward.name!r} reads {GOLD!r}: give gold_credit")
        prompt_length = input_ids.shape[1] - mask.shape[1]
        credit = gold_credit(
            input_ids[:, :prompt_length], attention_mask[:, :prompt_length], input_ids[:, prompt_length:], mask
        )
        logps = {**logps, GOLD: jnp.where(mask > 0, jnp.asarray(credit, jnp.float32), 0.0)}
    score = None
    if reward_graphdef is not None:
        tokens = input_ids[:, -mask.shape[1] :]
        has_eos = jnp.any((tokens == eos_id) & (mask > 0), axis=1)
        raw = sequence_scores(nnx.merge(reward_graphdef, reward_params), *inputs, mask)
        score = normalized_score(
            raw, has_eos, mean=reward_mean, std=reward_std, clip=score_clip, missing_eos_penalty=missing_eos_penalty
        )
        out.update(raw_score=raw, score=score)
    out["rewards"], out["parts"] = token_reward(logps, score if needs_reward_model(token_reward) else None, mask)
    return out


def mean_and_se(x) -> tuple[float, float]:
    x = np.asarray(x, np.float64)
    return float(x.mean()), float(x.std(ddof=1) / np.sqrt(len(x))) if len(x) > 1 else 0.0


def win_rate(a, b) -> float:
    """P(a > b) + P(a == b) / 2 over paired rows (same prompt)."""
    a, b = np.asarray(a), np.asarray(b)
    return float(np.mean((a > b) + 0.5 * (a == b)))


def summarize(rows: dict[str, np.ndarray], baseline: dict[str, np.ndarray] | None = None) -> dict[str, float]:
    """Means and standard errors of `evaluate_policy` rows; gold win rate against `baseline` (same prompts)."""
    names = {"gold": "gold_reward", "score": "score", "kl": "kl", "length": "length", "eos": "eos_rate"}
    summary = {}
    for key, name in names.items():
        if key in rows:
            summary[name], summary[f"{name}_se"] = mean_and_se(rows[key])
    if baseline is not None and "gold" in rows:
        summary["gold_win_rate_vs_sft"] = win_rate(rows["gold"], baseline["gold"])
    return summary


def episodes_to_reach(curve: list, target: float) -> float | None:
    """First episode count at which `curve` [(episodes, value), ...] reaches `target`, linearly
    interpolated between evaluation points; None if it never does."""
    for (x0, y0), (x1, y1) in itertools.pairwise(curve):
        if y0 >= target:
            return float(x0)
        if y1 >= target:
            return float(x0 + (x1 - x0) * (target - y0) / (y1 - y0))
    return None
