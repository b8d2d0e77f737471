"""PPO over the token MDP with a token reward passed in (docs/algorithm.md#4-ppo-with-rto-token-rewards), as pure jitted functions.

    make_experience(state, prompts, rng) -> Experience      rollout, scoring, token rewards, advantages
    ppo_update(state, experience, rng) -> (state, metrics)   epochs x minibatches in lax.scan
    ppo_iteration(state, prompts, rng) -> (state, metrics)   both, in one jit

`PPOConfig.token_reward` (rto_jax.objectives.token_rewards: RTO, PPO, the ablations, or a recipe's own)
turns the per-token log-probs of named models and the reward model's score into `[B, R]` rewards.
The frozen language models it reads (reference, DPO policy, ...) share the policy's graphdef; they,
the critic, the reward model and its score normalization are fields of `PPOState`, so a step needs
nothing but its arguments.

`PPOConfig.estimator` (rto_jax/objectives/advantages.py) turns the token rewards into advantages: GAE
with the critic, or a critic-free estimator (GRPO, Dr. GRPO, RLOO, REINFORCE++), for which the state
holds no critic (`PPOState.critic` is None) and the update has no value loss. With
`samples_per_prompt` n > 1 each prompt is answered n times in one rollout; rows of one prompt share a
group id, which the group estimators compare.

`PPOConfig.online_prm` (PRIME, rto_jax/objectives/implicit_prm.py) names one of the models the token
reward reads (e.g. "dpo") that keeps training during PPO as an implicit process reward model: on
each rollout, by the cross-entropy of its implicit reward against outcome labels from the reward
model's score. The state holds it as `PPOState.prm` (a TrainState) instead of among the frozen models;
`online_prm_experience` trains it and scores the rollout with it (in the order `prm_update` says).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from rto_jax.models import LoraConfig, lora, with_adapters
from rto_jax.objectives import masked_mean, policy_loss, value_loss
from rto_jax.objectives.advantages import estimate, needs_critic
from rto_jax.objectives.implicit_prm import implicit_prm_loss, outcome_labels
from rto_jax.objectives.ppo import normalized_score
from rto_jax.objectives.token_rewards import (
    GOLD,
    BoundReward,
    as_bound,
    frozen_models,
    gold_credit_argument,
    needs_gold,
    needs_reward_model,
    rto,
    untempered,
)
from rto_jax.sampling import SamplingConfig, generate, response_inputs
from rto_jax.train.sharding import StepShardings, jit_step
from rto_jax.train.state import TrainState
from rto_jax.scoring import response_logprobs, response_scalars, sequence_scores, token_reward_logprobs


PRM_UPDATES = ("before", "after")  # PPOConfig.prm_update: train the online PRM before or after it scores


@dataclasses.dataclass(frozen=True)
class PPOConfig:
    sampling: SamplingConfig  # rollout: max_new_tokens R, temperature tau (also applied when training)
    # token_reward(logps, score, mask) -> (rewards, parts): a BoundReward (its float coefficients are
    # arguments of the compiled step: make_ppo_fns)
    token_reward: BoundReward = BoundReward(rto)
    # The advantage estimator (rto_jax.objectives.advantages.ESTIMATORS): "gae" reads a critic; "grpo",
    # "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline" need none (the state holds none).
    estimator: str = "gae"
    # Responses sampled per prompt in one rollout (a group); the rollout batch holds batch / n prompts.
    # The group estimators need n > 1 for a baseline; GAE and REINFORCE++ take any n.
    samples_per_prompt: int = 1
    gamma: float = 1.0
    lam: float = 0.95
    ppo_epochs: int = 4  # N+: 4
    num_minibatches: int = 1
    clip_eps: float = 0.2
    value_clip_eps: float = 0.2
    vf_coef: float = 0.1  # N+: 0.1
    entropy_coef: float = 0.0
    score_clip: float = 10.0  # the normalized reward-model score is clipped to [-score_clip, score_clip]
    missing_eos_penalty: float = 1.0  # subtracted from the score of responses that never emit EOS (N+: -1)
    whiten_advantages: bool = True  # GAE's advantages over the batch (REINFORCE++ always whitens; GRPO/RLOO never)
    # How the policy and value losses average over a ragged batch: "token" (every valid token of the
    # minibatch weighs the same) or "sequence" (each response's token mean, then the mean over
    # responses, as the RTO authors' code does).
    loss_average: str = "token"
    # The LM head over vocabulary slices of this size (rto_jax/scoring.py): no [B, R, V] logits in
    # scoring or in the update. 0 (or >= V): the whole vocabulary at once. On the 135M shape (V 49152)
    # 8192 scored the two frozen models 3% faster than the whole head on CPU (docs/results/benchmarks.md#ppo-switches).
    vocab_chunk: int = 8192
    # The frozen language models (reference, DPO policy, ...) scored in one pass vmapped over their
    # stacked parameters instead of one pass each: the same numbers; on CPU 3-7% slower (docs/results/benchmarks.md#ppo-switches).
    stack_frozen: bool = False
    # The policy's log-probs and entropy come from the sampler, which computed them while decoding
    # with the same model code. True scores the policy again with a teacher-forced pass (in bfloat16
    # the sampler's cached decode and the full pass may round differently).
    recompute_policy_logprobs: bool = False
    # gold_credit(prompt_ids, prompt_mask, response_ids, response_mask) -> [B, R]: the task's exact
    # per-token gold credit (rto_jax.pipeline.tasks.GoldCredit), given to a token reward that lists
    # GOLD as logps[GOLD]: positive controls on a task whose true reward is known. Hashable; a
    # jax.tree_util.Partial's arrays are arguments of the compiled step (make_ppo_fns).
    gold_credit: Any = None
    # Online implicit PRM (PRIME): the model of this name the token reward reads (e.g. "dpo") trains
    # during PPO on each rollout, by the cross-entropy of its implicit reward
    # prm_beta * sum_t log(pi / pi_ref) against outcome labels from the reward model's score; "" keeps
    # every model the reward reads frozen.
    online_prm: str = ""
    prm_beta: float = 0.05  # the implicit reward's scale in the PRM's loss (PRIME's beta_train)
    # Outcome labels from the normalized score s: "soft" sigmoid(s), "binary" [s > 0], "group" (default)
    # sigmoid(s - the mean s of the prompt's responses) (rto_jax/objectives/implicit_prm.py).
    prm_labels: str = "group"
    # "before": train the PRM on the rollout, then score the rollout with it (PRIME's default: a second
    # forward pass); "after": score with the PRM as it was, then train it (the reward one rollout behind).
    prm_update: str = "before"


class PPOState(struct.PyTreeNode):
    """Everything PPO updates or reads. `frozen`: {'models': {name: LM params (the policy's graphdef)},
    and, when the token reward uses the reward model, 'reward' params and the `reward_mean` /
    `reward_std` scalars that normalize its score}.

    On one shared base (`create_shared_base_ppo_state`), `base` holds the frozen language model once;
    the policy's and critic's params are their adapters (and the critic's head), `frozen['models']`
    and `frozen['reward']` hold only adapters (and the reward head) on their own graphdefs
    (`frozen_graphdefs`), and the reference is the base itself (the policy with its adapters off).
    """

    policy: TrainState
    critic: TrainState | None  # None under a critic-free estimator
    frozen: dict
    base: Any = None
    prm: TrainState | None = None  # the online implicit PRM (PPOConfig.online_prm), on the policy's graphdef
    prm_name: str = struct.field(pytree_node=False, default="")  # the token reward's name for it
    reward_graphdef: nnx.GraphDef = struct.field(pytree_node=False, default=None)
    # ((name, graphdef), ...) of frozen adapter models whose graphdef is not the policy's.
    frozen_graphdefs: tuple = struct.field(pytree_node=False, default=())

    def lm_params(self, params):
        """A language model's variables: `params` (whole, or adapters completed with the shared base)."""
        return params if self.base is None else nnx.merge_state(params, self.base)

    def scalar_params(self, params):
        """A scalar-head model's variables: `params` (whole, or adapters and head completed with the shared
        base's decoder: its backbone)."""
        return params if self.base is None else nnx.merge_state(params, nnx.State({"decoder": self.base["decoder"]}))

    def reward_lms(self) -> dict:
        """{name: params} of the language models the token reward reads, the online PRM among them."""
        models = dict(self.frozen["models"])
        if self.prm is not None:
            models[self.prm_name] = self.prm.params
        return models

    def policy_model(self, params) -> nnx.Module:
        return nnx.merge(self.policy.graphdef, self.lm_params(params))

    def critic_model(self, params) -> nnx.Module:
        return nnx.merge(self.critic.graphdef, self.scalar_params(params))


class Experience(NamedTuple):
    """One rollout batch, every array `[B, ...]`; token arrays `[B, R]`."""

    input_ids: jax.Array  # [B, P+R]
    attention_mask: jax.Array  # [B, P+R]
    positions: jax.Array  # [B, P+R]
    response_mask: jax.Array  # [B, R]
    logp_old: jax.Array  # [B, R]
    values: jax.Array | None  # [B, R]; None without a critic
    advantages: jax.Array  # [B, R]
    returns: jax.Array | None  # [B, R], the critic's target; None without a critic
    group_ids: jax.Array  # [B] int32: rows answering one prompt share it


def _has_eos(tokens, mask, eos_id):
    return jnp.any((tokens == eos_id) & (mask > 0), axis=1)


class Rollout(NamedTuple):
    """One sampled batch with every model's view of it, before token rewards; arrays `[B, ...]`."""

    input_ids: jax.Array  # [B, P+R]
    attention_mask: jax.Array  # [B, P+R]
    positions: jax.Array  # [B, P+R]
    response_mask: jax.Array  # [B, R]
    group_ids: jax.Array  # [B] int32
    logps: dict  # {key: [B, R]}: the token reward's `logps` (policy, frozen models, untempered(...), GOLD)
    values: jax.Array | None  # [B, R] the critic's; None without a critic
    score: jax.Array | None  # [B] the normalized reward-model score; None unless the reward reads it
    metrics: dict  # scalars of the rollout itself (entropy, length, EOS rate, score)

    @property
    def inputs(self):
        return self.input_ids, self.attention_mask, self.positions


def _check_state(state: PPOState, config: PPOConfig) -> None:
    reward_fn = config.token_reward
    held = set(state.reward_lms()) | ({"ref"} if state.base is not None else set())  # the base is pi_ref
    missing = [m for m in frozen_models(reward_fn) if m not in held]
    if missing or (needs_reward_model(reward_fn) and "reward" not in state.frozen):
        missing += ["reward"] if needs_reward_model(reward_fn) else []
        raise ValueError(f"token reward {reward_fn.name!r} uses {missing}, which the PPOState does not hold")
    if needs_gold(reward_fn) and config.gold_credit is None:
        raise ValueError(f"token reward {reward_fn.name!r} uses {GOLD!r}: PPOConfig.gold_credit is None")
    if (state.critic is None) == needs_critic(config.estimator):
        held_critic = "holds no critic" if state.critic is None else "holds a critic"
        raise ValueError(f"estimator {config.estimator!r}: the PPOState {held_critic} (create it with critic=None iff critic-free)")
    if config.online_prm and config.prm_update not in PRM_UPDATES:
        raise ValueError(f"PPOConfig.prm_update must be {' or '.join(map(repr, PRM_UPDATES))}, got {config.prm_update!r}")
    if state.prm_name != config.online_prm:
        raise ValueError(
            f"PPOConfig.online_prm={config.online_prm!r} but the PPOState trains {state.prm_name or 'no PRM'!r} "
            "(create it with online_prm=(name, tx))"
        )


def rollout(state: PPOState, prompts: dict, rng, config: PPOConfig) -> Rollout:
    """Sample with the jitted sampler, then every model's view of the samples (no token rewards yet).

    prompts: `prompt_ids`, `prompt_mask` `[B / n, P]` (left-padded), each answered n =
    `config.samples_per_prompt` times (rows i*n .. i*n + n - 1, group id i). Every model the token reward
    reads is scored at the rollout temperature and at temperature 1 (`token_reward_logprobs`; the policy's
    from the sampler unless `recompute_policy_logprobs`).
    """
    _check_state(state, config)
    reward_fn = config.token_reward
    policy_params = state.lm_params(state.policy.params)
    n = config.samples_per_prompt
    # One prefill per prompt, its KV cache repeated for its n answers (`generate`'s `repeats`).
    samples = generate(
        state.policy.graphdef, policy_params, prompts["prompt_ids"], prompts["prompt_mask"], rng, config.sampling, n
    )
    prompt_ids, prompt_mask = (jnp.repeat(prompts[k], n, axis=0) for k in ("prompt_ids", "prompt_mask"))
    group_ids = jnp.repeat(jnp.arange(prompt_ids.shape[0] // n, dtype=jnp.int32), n)
    input_ids, attention_mask, positions = response_inputs(prompt_ids, prompt_mask, samples)
    mask = samples.response_mask
    inputs = (input_ids, attention_mask, positions)
    logps = _frozen_logprobs(state, inputs, mask, config, with_ref="ref" in frozen_models(reward_fn))
    if not config.recompute_policy_logprobs:
        logps.update({"policy": samples.logprobs, untempered("policy"): samples.untempered_logprobs})
    if needs_gold(reward_fn):
        credit = config.gold_credit(prompt_ids, prompt_mask, samples.tokens, mask)
        logps[GOLD] = jnp.where(mask > 0, jnp.asarray(credit, jnp.float32), 0.0)
    values = None
    if state.critic is not None:
        critic = state.critic_model(state.critic.params)
        values = jnp.where(mask > 0, response_scalars(critic, *inputs, mask.shape[1]), 0.0)
    has_eos = _has_eos(samples.tokens, mask, config.sampling.eos_id)
    metrics = {
        "entropy": masked_mean(samples.entropy, mask),
        "response_length": jnp.mean(jnp.sum(mask, axis=1)),
        "eos_rate": jnp.mean(has_eos.astype(jnp.float32)),
    }
    score = None
    if needs_reward_model(reward_fn):
        reward_model = nnx.merge(state.reward_graphdef, state.scalar_params(state.frozen["reward"]))
        raw_score = sequence_scores(reward_model, *inputs, mask)
        score = normalized_score(
            raw_score,
            has_eos,
            mean=state.frozen["reward_mean"],
            std=state.frozen["reward_std"],
            clip=config.score_clip,
            missing_eos_penalty=config.missing_eos_penalty,
        )
        metrics.update(score=jnp.mean(raw_score), score_normalized=jnp.mean(score))
    return Rollout(input_ids, attention_mask, positions, mask, group_ids, logps, values, score, metrics)


def experience_of(rollout: Rollout, config: PPOConfig) -> tuple[Experience, dict]:
    """The token rewards and advantages of a rollout. Metrics: the rollout's, each part of the token
    reward as `reward/<part>` (per-sequence sums), the total, the mean |advantage|, the KL to pi_ref."""
    mask, logps = rollout.response_mask, rollout.logps
    rewards, parts = config.token_reward(logps, rollout.score, mask)
    advantages, returns = estimate(
        config.estimator, rewards, rollout.values, mask, rollout.group_ids,
        gamma=config.gamma, lam=config.lam, whiten=config.whiten_advantages,
    )  # fmt: skip
    per_sequence = lambda x: jnp.mean(jnp.sum(x, axis=1))
    metrics = dict(rollout.metrics)
    metrics.update({f"reward/{name}": per_sequence(part) for name, part in parts.items()})
    metrics["reward/total"] = per_sequence(rewards)
    metrics["advantage_abs"] = masked_mean(jnp.abs(advantages), mask)
    if rollout.values is not None:
        metrics["value_mean"] = masked_mean(rollout.values, mask)
    n = config.samples_per_prompt
    if n > 1:  # groups whose n responses all have one return give a zero group-baseline advantage
        whole = jnp.sum(rewards, axis=1).reshape(-1, n)
        metrics["group_reward_std"] = jnp.mean(jnp.std(whole, axis=1))
    logp_old = logps["policy"]
    if "ref" in logps:
        metrics["kl_to_ref"] = per_sequence(jnp.where(mask > 0, logp_old - logps["ref"], 0.0))
    experience = Experience(
        *rollout.inputs, mask, logp_old, rollout.values, advantages, returns, rollout.group_ids
    )  # fmt: skip
    return experience, metrics


def make_experience(state: PPOState, prompts: dict, rng, config: PPOConfig) -> tuple[Experience, dict]:
    """`rollout` then `experience_of`: samples, every model's view of them, token rewards, advantages.
    An online PRM scores as it is here (`online_prm_experience` trains it too)."""
    return experience_of(rollout(state, prompts, rng, config), config)


def prm_update(state: PPOState, rollout: Rollout, rng, config: PPOConfig) -> tuple[PPOState, dict]:
    """One pass of the online implicit PRM over the rollout in `num_minibatches` shuffled minibatches:
    PRIME's cross-entropy (`implicit_prm_loss`) of its implicit reward against the outcome labels of
    the rollout's normalized score. The reference's log-probs are the rollout's (pi_ref is frozen)."""
    labels = outcome_labels(rollout.score, config.prm_labels, rollout.group_ids)
    data = (rollout.inputs, rollout.response_mask, rollout.logps[untempered("ref")], labels)
    batch_size = rollout.input_ids.shape[0]
    size = batch_size // config.num_minibatches

    def loss_fn(params, batch):
        inputs, mask, logp_ref, batch_labels = batch
        model = nnx.merge(state.prm.graphdef, params)
        logp, _ = response_logprobs(model, *inputs, mask, 1.0, config.vocab_chunk)  # its own distribution
        return implicit_prm_loss(logp, logp_ref, mask, batch_labels, beta=config.prm_beta)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def minibatch_step(prm, indices):
        (_, metrics), grads = grad_fn(prm.params, jax.tree.map(lambda x: x[indices], data))
        return prm.apply_gradients(grads), {**metrics, "prm/grad_norm": optax.tree.norm(grads)}

    order = jax.random.permutation(rng, batch_size).reshape(config.num_minibatches, size)
    prm, metrics = jax.lax.scan(minibatch_step, state.prm, order)
    return state.replace(prm=prm), {k: jnp.mean(v) for k, v in metrics.items()}


def online_prm_experience(state: PPOState, prompts: dict, rng, config: PPOConfig):
    """-> (state, Experience, metrics): `rollout`, the online PRM trained on it (`prm_update`) and the
    experience whose token rewards read the PRM: after its update (`prm_update="before"`: the rollout is
    scored again by it) or before it ("after")."""
    if not config.online_prm or state.prm is None:
        raise ValueError("online_prm_experience needs PPOConfig.online_prm and a PPOState with a PRM")
    # The rollout samples with `rng` itself, as make_experience does: the same keys as a run whose
    # DPO policy stays frozen (common random numbers across methods).
    prm_rng = jax.random.fold_in(rng, 1)
    batch = rollout(state, prompts, rng, config)
    if config.prm_update == "after":
        experience, metrics = experience_of(batch, config)
        state, prm_metrics = prm_update(state, batch, prm_rng, config)
        return state, experience, {**metrics, **prm_metrics}
    state, prm_metrics = prm_update(state, batch, prm_rng, config)
    rescored = token_reward_logprobs(
        state.policy.graphdef, {state.prm_name: state.prm.params}, *batch.inputs, batch.response_mask,
        config.sampling.temperature, vocab_chunk=config.vocab_chunk,
    )  # fmt: skip
    experience, metrics = experience_of(batch._replace(logps={**batch.logps, **rescored}), config)
    return state, experience, {**metrics, **prm_metrics}


def _frozen_logprobs(state: PPOState, inputs, mask, config: PPOConfig, with_ref: bool) -> dict:
    """`token_reward_logprobs` of the frozen language models (and of the policy when
    `recompute_policy_logprobs`). On a shared base each model runs on the same base arrays (no copy):
    the reference is the policy with its adapters off, the others their adapters on the base."""
    score = lambda graphdef, params, **kw: token_reward_logprobs(
        graphdef, params, *inputs, mask, config.sampling.temperature, vocab_chunk=config.vocab_chunk, **kw
    )
    policy = {"policy": state.lm_params(state.policy.params)} if config.recompute_policy_logprobs else {}
    if state.base is None:
        return score(state.policy.graphdef, {**policy, **state.reward_lms()}, stacked=config.stack_frozen)
    logps = score(state.policy.graphdef, policy) if policy else {}
    if with_ref:
        with lora.disabled():
            logps.update(score(state.policy.graphdef, {"ref": state.lm_params(state.policy.params)}))
    graphdefs = dict(state.frozen_graphdefs)
    for name, adapters in state.frozen["models"].items():
        logps.update(score(graphdefs[name], {name: state.lm_params(adapters)}))
    return logps


def _minibatch_loss(params, batch: Experience, state: PPOState, config: PPOConfig):
    policy_params, critic_params = params
    inputs = (batch.input_ids, batch.attention_mask, batch.positions)
    policy = state.policy_model(policy_params)
    logp, entropy = response_logprobs(
        policy, *inputs, batch.response_mask, config.sampling.temperature, config.vocab_chunk
    )
    pg_loss, pg_metrics = policy_loss(
        logp, batch.logp_old, batch.advantages, batch.response_mask, config.clip_eps, config.loss_average
    )
    entropy = masked_mean(entropy, batch.response_mask)
    loss = pg_loss - config.entropy_coef * entropy
    metrics = {"policy_loss": pg_loss, "entropy_train": entropy, **pg_metrics}
    if critic_params is not None:
        critic = state.critic_model(critic_params)
        values = response_scalars(critic, *inputs, batch.response_mask.shape[1])
        vf_loss, vf_metrics = value_loss(
            values, batch.values, batch.returns, batch.response_mask, config.value_clip_eps, config.loss_average
        )
        loss = loss + config.vf_coef * vf_loss
        metrics.update(value_loss=vf_loss, **vf_metrics)
    return loss, {"loss": loss, **metrics}


def ppo_update(state: PPOState, experience: Experience, rng, config: PPOConfig) -> tuple[PPOState, dict]:
    """`ppo_epochs` passes over `num_minibatches` shuffled minibatches; policy and critic (if any) updated together.

    Minibatches are shuffled rows, not whole groups: every estimator computed its advantages over the
    whole rollout in `make_experience`, so no loss here reads a group.

    Metrics are means over all minibatch updates, plus `first/*` from the very first one, whose
    importance ratio must be 1 (rollout and training log-probs agree).
    """
    batch_size = experience.input_ids.shape[0]
    if batch_size % config.num_minibatches:
        raise ValueError(f"rollout batch {batch_size} is not divisible by num_minibatches={config.num_minibatches}")
    size = batch_size // config.num_minibatches
    grad_fn = jax.value_and_grad(_minibatch_loss, has_aux=True)

    def minibatch_step(carry, indices):
        policy, critic = carry
        batch = jax.tree.map(lambda x: x[indices], experience)
        critic_params = None if critic is None else critic.params
        (_, metrics), (policy_grads, critic_grads) = grad_fn(
            (policy.params, critic_params), batch, state.replace(policy=policy, critic=critic), config
        )
        # Gradient norms (before clipping): exactly 0 means training has collapsed (pipeline.loop warns).
        metrics = {**metrics, "policy_grad_norm": optax.tree.norm(policy_grads)}
        if critic is None:
            return (policy.apply_gradients(policy_grads), None), metrics
        metrics["critic_grad_norm"] = optax.tree.norm(critic_grads)
        return (policy.apply_gradients(policy_grads), critic.apply_gradients(critic_grads)), metrics

    def epoch(carry, epoch_rng):
        order = jax.random.permutation(epoch_rng, batch_size).reshape(config.num_minibatches, size)
        return jax.lax.scan(minibatch_step, carry, order)

    (policy, critic), metrics = jax.lax.scan(
        epoch, (state.policy, state.critic), jax.random.split(rng, config.ppo_epochs)
    )
    summary = {k: jnp.mean(v) for k, v in metrics.items()}
    summary.update({f"first/{k}": v[0, 0] for k, v in metrics.items() if k in ("ratio_mean", "clipfrac", "approx_kl")})
    return state.replace(policy=policy, critic=critic), summary


def make_ppo_fns(config: PPOConfig, shardings: StepShardings | None = None, *, jitted=None):
    """Jitted `make_experience`, `ppo_update` and `ppo_iteration` (state donated) for a fixed config,
    each `(state, batch, rng) -> (state or experience, metrics)`. With `config.online_prm` the
    iteration trains the PRM as well (`online_prm_experience`).

    The token reward's float coefficients and the gold credit's arrays (a synthetic task's tables) are
    arguments of the compiled programs, not constants in them: `jitted` (default `jitted_ppo_fns`; a
    cache of it, as `stages.ppo_fns` keeps) is called with the config without their values, so configs
    that differ only in those values (a sweep's coefficients, a study's seeds) share its programs.

    With `shardings` (`step_shardings(ppo_state, mesh)`) every function has explicit in/out shardings:
    prompts and the Experience split over data x fsdp, the sampler's KV cache split by batch and kv
    heads, the PPOState by its parameters' rules, rng, those arguments and metrics replicated.
    """
    reward = as_bound(config.token_reward)
    traced = {"token_reward": reward, "gold_credit": gold_credit_argument(config.gold_credit)}
    structure = dataclasses.replace(config, token_reward=reward.structure(), gold_credit=None)
    fns = (jitted or jitted_ppo_fns)(structure, shardings)

    def with_values(fn):
        @functools.wraps(fn)  # `__wrapped__` is the compiled function (its `_cache_size()` in tests)
        def step(state, batch, rng):
            return fn(state, batch, rng, traced)

        return step

    return tuple(with_values(fn) for fn in fns)


def jitted_ppo_fns(config: PPOConfig, shardings: StepShardings | None = None):
    """`make_ppo_fns`'s three functions as compiled, each `(state, batch, rng, traced)`: `traced` holds
    the config's `token_reward` (a BoundReward, its float coefficients traced) and `gold_credit` (None
    or a jax.tree_util.Partial, its arrays traced), which replace those of `config` (without values)."""

    def with_values(traced):
        return dataclasses.replace(config, **traced)

    def experience_fn(state, prompts, rng, traced):
        return make_experience(state, prompts, rng, with_values(traced))

    def update_fn(state, experience, rng, traced):
        return ppo_update(state, experience, rng, with_values(traced))

    def iteration_fn(state, prompts, rng, traced):
        step_config = with_values(traced)
        rollout_rng, update_rng = jax.random.split(rng)
        if step_config.online_prm:
            state, experience, rollout_metrics = online_prm_experience(state, prompts, rollout_rng, step_config)
        else:
            experience, rollout_metrics = make_experience(state, prompts, rollout_rng, step_config)
        state, update_metrics = ppo_update(state, experience, update_rng, step_config)
        return state, {**rollout_metrics, **update_metrics}

    return (
        jit_step(experience_fn, shardings, batch_out=True, donate=False, extra_args=1),
        jit_step(update_fn, shardings, extra_args=1),
        jit_step(iteration_fn, shardings, extra_args=1),
    )


def _copy(tree):
    """The update donates the whole state; copies keep the caller's frozen models (reward, DPO, reference) alive."""
    return jax.tree.map(jnp.copy, tree)


def create_ppo_state(
    policy: nnx.Module,
    critic: nnx.Module | None,
    policy_tx,
    critic_tx,
    *,
    frozen: dict[str, Any] | None = None,
    reward_model: nnx.Module | None = None,
    reward_mean: float = 0.0,
    reward_std: float = 1.0,
    online_prm: tuple[str, optax.GradientTransformation] | None = None,
) -> PPOState:
    """PPO state from the policy (usually pi_sft), the critic (usually the reward model; None for a
    critic-free estimator, and then `critic_tx` is unused) and the frozen models.

    frozen: {name: params with the policy's graphdef}, the language models the token reward reads
      (`frozen_models(token_reward)`, e.g. {'ref': pi_sft, 'dpo': pi_dpo}); default {'ref': a copy of
      the policy}. reward_model: the scorer, when the token reward uses one (`needs_reward_model`).
    online_prm: (name, optimizer): the model `frozen[name]` trains online as the implicit PRM
      (`PPOConfig.online_prm`): a copy of it becomes `PPOState.prm`, a TrainState on the policy's graphdef.
    The policy's and critic's arrays become the train states' (donated by the jitted update); the
    frozen models are copied.
    """
    policy_state = TrainState.create(policy, policy_tx)
    models = frozen if frozen is not None else {"ref": policy_state.params}
    tree = {"models": {name: _copy(params) for name, params in models.items()}}
    reward_graphdef = None
    if reward_model is not None:
        reward_graphdef, reward_params = nnx.split(reward_model)
        tree.update(
            reward=_copy(reward_params), reward_mean=jnp.float32(reward_mean), reward_std=jnp.float32(reward_std)
        )
    critic_state = None if critic is None else TrainState.create(critic, critic_tx)
    prm, prm_name = None, ""
    if online_prm is not None:
        prm_name, prm_tx = online_prm
        if prm_name not in tree["models"] or prm_name == "ref":
            raise ValueError(f"online PRM {prm_name!r}: not among the frozen models {sorted(tree['models'])} (or pi_ref)")
        params = tree["models"].pop(prm_name)
        prm = TrainState(
            step=jnp.zeros((), jnp.int32), params=params, opt_state=prm_tx.init(params),
            graphdef=policy_state.graphdef, tx=prm_tx,
        )  # fmt: skip
    return PPOState(
        policy=policy_state, critic=critic_state, frozen=tree, reward_graphdef=reward_graphdef, prm=prm, prm_name=prm_name
    )


def create_shared_base_ppo_state(
    base: nnx.Module,
    policy_lora: LoraConfig,
    critic: nnx.Module | None,
    policy_tx,
    critic_tx,
    *,
    frozen: dict[str, nnx.Module] | None = None,
    reward_model: nnx.Module | None = None,
    reward_mean: float = 0.0,
    reward_std: float = 1.0,
    rngs: nnx.Rngs | None = None,
    base_dtype=None,
) -> PPOState:
    """PPO state on one frozen base held once: the policy is `base` with fresh adapters (`policy_lora`),
    the reference is `base` itself (the policy with its adapters off), and `critic`, `reward_model`
    (scalar-head models with adapters) and `frozen` ({name: language model with adapters}, e.g. the
    DPO policy) must be adapter models on the same base weights: only their adapters and heads are
    kept. Only the policy's and critic's adapters (and the critic's head) have optimizer state. critic
    None: a critic-free estimator's state.

    base_dtype: the base's storage dtype (e.g. bfloat16 for a bfloat16 compute run: the forward casts
    the weights to it anyway); None keeps it. The base's arrays become the state's (the update donates
    them): copy them first to keep using `base` elsewhere.
    """
    policy = with_adapters(base, policy_lora, rngs if rngs is not None else nnx.Rngs(0))
    policy_state = TrainState.create(policy, policy_tx, trainable=lora.TRAINABLE, base_dtype=base_dtype)
    shared = policy_state.base
    backbone = nnx.State({"decoder": shared["decoder"]})

    shapes = lambda state: {key: tuple(var[...].shape) for key, var in nnx.to_flat_state(state)}

    def adapters_on_base(model, expected_rest):
        if model.config.lora is None:
            raise ValueError(f"{type(model).__name__} has no adapters: it cannot share the base")
        graphdef, trained, rest = nnx.split(model, lora.TRAINABLE, ...)
        if shapes(rest) != shapes(expected_rest):
            raise ValueError(f"{type(model).__name__}: its frozen weights are not shaped like the shared base")
        return graphdef, trained

    critic_state = None
    if critic is not None:
        adapters_on_base(critic, backbone)
        critic_state = TrainState.create(critic, critic_tx, trainable=lora.TRAINABLE).replace(base=None)
    tree = {"models": {}}
    graphdefs = []
    for name, model in (frozen or {}).items():
        graphdef, adapters = adapters_on_base(model, policy_state.base)
        tree["models"][name] = _copy(adapters)
        graphdefs.append((name, graphdef))
    reward_graphdef = None
    if reward_model is not None:
        reward_graphdef, reward_params = adapters_on_base(reward_model, backbone)
        tree.update(
            reward=_copy(reward_params), reward_mean=jnp.float32(reward_mean), reward_std=jnp.float32(reward_std)
        )
    return PPOState(
        policy=policy_state.replace(base=None),
        critic=critic_state,
        frozen=tree,
        base=shared,
        reward_graphdef=reward_graphdef,
        frozen_graphdefs=tuple(graphdefs),
    )
