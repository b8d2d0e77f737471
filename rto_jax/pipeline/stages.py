"""The stages as plain functions: `run_<stage>(config, workdir, task, log, <models it reads>) -> dict`.

Each returns its summary (the path of the model it made or took, final metrics), which the runner
stores in `<workdir>/<stage>/done.json`. A stage reads only the exported (HF-format) models of the
stages before it, so a stage given `init_from` and a stage trained here are the same to the next one.

Every trained stage builds its state and jitted step, then runs the one resumable loop
(rto_jax/pipeline/loop.py) and exports its model. SFT, reward model and DPO are `make_train_step`
given their loss; PPO's step is a whole iteration (rollout, token rewards, GAE, update).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rto_jax.data import BatchIterator
from rto_jax.distributed import is_main_process, process_slice, sync
from rto_jax.errors import ConfigError
from rto_jax.eval.credit import credit_correlations
from rto_jax.eval.policy_eval import (
    SEQUENCE_KEYS,
    fixed_size_batches,
    reward_accuracy,
    sample_responses,
    score_arrays,
    sequences,
    weighted_mean,
)
from rto_jax.eval.rollout_eval import token_reward_parts
from rto_jax.models import ScalarHeadModel, peft_io
from rto_jax.objectives.advantages import needs_critic
from rto_jax.objectives.token_rewards import GOLD, bind, frozen_models, needs_gold, needs_reward_model
from rto_jax.pipeline import common
from rto_jax.pipeline.evaluate import held_out_rows, make_judge, run_best_of_n, run_evaluate  # the recipes' stages
from rto_jax.pipeline.logging import RunLog, summary
from rto_jax.pipeline.loop import Checkpointed, Progress, run_loop
from rto_jax.sampling import SamplingConfig
from rto_jax.train import (
    DPOLoss,
    PPOConfig,
    RewardModelLoss,
    SFTLoss,
    create_ppo_state,
    create_shared_base_ppo_state,
    jitted_ppo_fns,
    loss_metrics,
    make_ppo_fns,
    make_train_step,
    precompute_reference_logps,
)
from rto_jax.train.sharding import create_sharded_train_state, step_shardings

log = logging.getLogger(__name__)

# The step factories return new jitted closures; caching them per (hashable, frozen) config lets a
# process that runs several pipelines (tests, notebooks, a resumed run, a study) reuse the compiled
# steps. PPO's are cached per config without the values of its token reward's float coefficients
# and its gold credit's arrays (make_ppo_fns): runs that differ only in those (a study's KL or
# DPO-weight cells, each method's own values, the seeds of a synthetic task) run one compiled program
# (on one device: `ppo_fns`).
# Bounded: a compiled XLA executable holds memory maps until its closure is dropped (on CPU ~330 for
# a tiny model's train step, ~1,500 for a PPO iteration: a study's smoke run held 20,000 with 12 PPO
# and 3 train programs), and a process running a study's hundred PPO runs would reach the kernel's
# limit (vm.max_map_count, 65530 by default), where the next compile segfaults. Full, both caches hold
# ~25,000. PPO's holds one seed's cells of a study (which runs seed after seed; the smoke study has
# 12), so the next seed compiles no PPO program again.
STEP_CACHE_SIZE = 4
PPO_STEP_CACHE_SIZE = 16
train_step = functools.lru_cache(maxsize=STEP_CACHE_SIZE)(make_train_step)
_jitted_ppo_fns = functools.lru_cache(maxsize=PPO_STEP_CACHE_SIZE)(jitted_ppo_fns)


def ppo_fns(config: PPOConfig, shardings=None):
    """`make_ppo_fns(config, shardings)`, its compiled programs kept in the bounded cache above on one
    device. On a mesh they are not cached: each run's StepShardings holds its own state's layout and
    optimizer (a key no other run matches), so a cached entry would only hold programs no run reuses."""
    return make_ppo_fns(config, shardings, jitted=_jitted_ppo_fns if shardings is None else None)


def clear_step_caches() -> None:
    """Drops every cached step (and with it its compiled programs)."""
    train_step.cache_clear()
    _jitted_ppo_fns.cache_clear()


def _epochs(config, cfg, arrays: dict) -> tuple[BatchIterator, int]:
    """This process's shuffled batches of `arrays` and the stage's steps (epochs, capped by max_steps)."""
    batches = BatchIterator(arrays, cfg.batch_size, seed=config.seed, **process_slice())
    steps = len(batches) * cfg.num_epochs
    return batches, min(steps, cfg.max_steps) if cfg.max_steps else steps


def _summary(done: Progress) -> dict:
    return {**done.last_eval, "steps": done.steps, "resumed_from": done.resumed_from}


# ----------------------------------------------------------------------------------------------
# SFT.


def run_sft(config, workdir, task, run_log: RunLog) -> dict:
    """Supervised fine-tuning on (prompt, reference) pairs -> pi_sft (also the reference policy)."""
    cfg = config.sft
    if cfg.init_from:
        return {"model_path": cfg.init_from, "source": "init_from"}
    batches, steps = _epochs(config, cfg, task.sft_train)
    tx, mesh = common.optimizer(cfg, steps), common.device_mesh(config)
    full_random_init = not config.model.init_from and common.lora_config(cfg) is None
    if mesh is not None and full_random_init:  # initialized shard by shard on the mesh
        state = create_sharded_train_state(lambda: common.random_base_model(config, task), tx, mesh)
        shardings = step_shardings(state, mesh)
    else:
        state, shardings = common.train_state(config, "sft", common.init_base_model(config, task, mesh), tx, mesh)
    step_fn = train_step(SFTLoss(), cfg.grad_accum_steps, shardings)

    def evaluate(state):
        losses = [
            ({"loss": loss_metrics(SFTLoss(), state, b)["loss"]}, n)
            for b, n in fixed_size_batches(task.sft_eval, cfg.eval_batch_size)
        ]
        return weighted_mean(losses)

    state, done = run_loop(
        "sft", config, workdir, run_log, state, batches, step_fn, steps,
        evaluate=evaluate, eval_every=cfg.eval_every, shardings=shardings,
    )  # fmt: skip
    path = common.export_trained(state.model(), Path(workdir) / "sft", task, base_model=config.model.init_from)
    return {"model_path": path, "source": "trained", **_summary(done)}


# ----------------------------------------------------------------------------------------------
# Preferences (tasks that label pairs themselves: synthetic).


def run_preferences(config, workdir, task, run_log: RunLog, *, sft_path: str) -> dict:
    """Two pi_sft samples for each of `task.preference_prompts`, labelled by `task.label_pairs`
    (Bradley-Terry on the gold reward, with human-like noise); saved to `preferences/pairs.npz`.
    Attach them to the task with `tasks.with_preferences` before the reward model and DPO."""
    del run_log  # nothing is trained
    if task.label_pairs is None or task.preference_prompts is None:
        raise ValueError(f"task {task.name!r} does not label preference pairs (a synthetic task does)")
    graphdef, params = nnx.split(common.load_model(sft_path, "lm", config, common.device_mesh(config)))
    sampling = SamplingConfig(task.response_length, task.eos_id, task.pad_id, temperature=config.ppo.temperature)
    prompts, p = task.preference_prompts, task.prompt_length
    responses = []
    for side in ("a", "b"):
        rows = sample_responses(
            graphdef,
            params,
            prompts,
            config.evaluate.batch_size,
            sampling,
            common.stage_key(config.seed, f"pairs/{side}"),
        )
        responses.append({"response_ids": rows["input_ids"][:, p:], "response_mask": rows["response_mask"]})
    pairs, info = task.label_pairs(np.random.default_rng(config.seed), prompts, *responses)
    path = common.stage_dir(workdir, "preferences") / "pairs.npz"
    if is_main_process():
        np.savez(path, **pairs)
    sync("preference pairs written")
    return {
        "path": str(path),
        "pairs": len(pairs["prompt_ids"]),
        "label_temperature": info["temperature"],
        "label_agreement": info["agreement"],
    }


# ----------------------------------------------------------------------------------------------
# Reward model.


def reward_normalization(config, task, reward_model, sft_path: str | None) -> dict:
    """Mean/std of the reward model's scores on reference responses or on SFT samples
    (docs/algorithm.md#2-reward-model)."""
    cfg = config.reward_model
    n = cfg.normalize_rows
    if cfg.normalize_on == "sft_samples" and sft_path:
        policy = common.load_model(sft_path, "lm", config, common.device_mesh(config))
        graphdef, params = nnx.split(policy)
        sampling = SamplingConfig(task.response_length, task.eos_id, task.pad_id, temperature=config.ppo.temperature)
        prompts = {k: v[:n] for k, v in task.prompts_train.items()}
        rows = sample_responses(
            graphdef, params, prompts, cfg.eval_batch_size, sampling, common.stage_key(config.seed, "reward_model")
        )
    else:
        rows = {k: v[:n] for k, v in task.sft_train.items()}
    scores = score_arrays(reward_model, rows, cfg.eval_batch_size)
    return {
        "reward_mean": float(np.mean(scores)),
        "reward_std": float(max(np.std(scores), 1e-6)),
        "normalized_on": cfg.normalize_on,
    }


def run_reward_model(config, workdir, task, run_log: RunLog, sft_path: str | None) -> dict:
    """Bradley-Terry reward model from pi_sft's backbone (fresh head); then its score statistics."""
    cfg = config.reward_model
    if cfg.init_from:
        model, out = (
            common.load_model(cfg.init_from, "scalar", config),
            {"model_path": cfg.init_from, "source": "init_from"},
        )
        if task.preference_eval is not None:
            out.update(reward_accuracy(model, task.preference_eval, cfg.eval_batch_size))
    else:
        mesh = common.device_mesh(config)
        model = common.load_model(sft_path, "scalar", config, mesh)
        batches, steps = _epochs(config, cfg, task.preference_train)
        state, shardings = common.train_state(config, "reward_model", model, common.optimizer(cfg, steps), mesh)
        step_fn = train_step(RewardModelLoss(margin=cfg.margin), cfg.grad_accum_steps, shardings)
        evaluate = lambda state: reward_accuracy(state.model(), task.preference_eval, cfg.eval_batch_size)
        state, done = run_loop(
            "reward_model", config, workdir, run_log, state, batches, step_fn, steps,
            evaluate=evaluate, eval_every=cfg.eval_every, shardings=shardings,
        )  # fmt: skip
        model = state.model()
        out = {
            "model_path": common.export_trained(model, Path(workdir) / "reward_model", task, base_model=sft_path),
            "source": "trained",
            **_summary(done),
        }
    out.update(reward_normalization(config, task, model, sft_path))
    return out


# ----------------------------------------------------------------------------------------------
# DPO.


def run_dpo(config, workdir, task, run_log: RunLog, sft_path: str, stage: str = "dpo") -> dict:
    """DPO from pi_sft with pi_sft as the reference; reference log-probs computed per batch.

    stage: the stage's name (its folder, metrics and checkpoints), e.g. DPO on fewer pairs beside `dpo`.
    """
    cfg = config.dpo
    if cfg.init_from:
        return {"model_path": cfg.init_from, "source": "init_from"}
    mesh = common.device_mesh(config)
    policy = common.load_model(sft_path, "lm", config, mesh)
    batches, steps = _epochs(config, cfg, task.preference_train)
    state, shardings = common.train_state(config, "dpo", policy, common.optimizer(cfg, steps), mesh)
    loss = DPOLoss(beta=cfg.beta, loss_type=cfg.loss_type, label_smoothing=cfg.label_smoothing)
    step_fn = train_step(loss, cfg.grad_accum_steps, shardings)
    # On the mesh the reference log-probs of the (global) batch are split like the batch itself.
    place = (lambda x: x) if shardings is None else functools.partial(jax.device_put, device=shardings.batch)
    if state.base is not None:
        # An adapter policy's reference is its own base with the adapters off, computed inside the step
        # (DPOLoss): no second copy of the model.
        reference = lambda batch: {}
    else:
        # On the policy's layout (the eval step takes both).
        ref_graphdef, ref_params = nnx.split(common.load_model(sft_path, "lm", config, mesh))
        reference = functools.partial(precompute_reference_logps, ref_graphdef, ref_params)
    prepare = lambda batch: {**batch, **place(reference(batch))}

    def evaluate(state):
        parts = [
            (loss_metrics(loss, state, {**b, **reference(b)}), n)
            for b, n in fixed_size_batches(task.preference_eval, cfg.eval_batch_size)
        ]
        return weighted_mean(parts)

    state, done = run_loop(
        stage, config, workdir, run_log, state, batches, step_fn, steps,
        prepare=prepare, evaluate=evaluate, eval_every=cfg.eval_every, shardings=shardings,
    )  # fmt: skip
    path = common.export_trained(state.model(), common.stage_dir(workdir, stage), task, base_model=sft_path)
    return {"model_path": path, "source": "trained", **_summary(done)}


# ----------------------------------------------------------------------------------------------
# PPO / RTO.


def ppo_config(config, task, token_reward, reward_args: dict | None = None) -> PPOConfig:
    """PPOConfig of config.ppo with `token_reward` (a function of token_rewards' signature) bound to
    `reward_args` (default `config.ppo.reward_args`)."""
    cfg = config.ppo
    reward_args = cfg.reward_args.to_dict() if reward_args is None else reward_args
    sampling = SamplingConfig(
        max_new_tokens=task.response_length,
        eos_id=task.eos_id,
        pad_id=task.pad_id,
        temperature=cfg.temperature,
        top_k=cfg.top_k,
        top_p=cfg.top_p,
    )
    # config.ppo's PPO fields are PPOConfig's, by name (base_config derives them from it).
    same_name = {f.name: cfg[f.name] for f in dataclasses.fields(PPOConfig) if f.name in cfg}
    gold_credit = None
    if needs_gold(token_reward):
        if task.gold_credit is None:
            what = f"token reward {token_reward.__name__!r} reads {GOLD!r}; task {task.name!r} has no gold reward"
            raise ConfigError("recipe", what)
        gold_credit = task.gold_credit
    return PPOConfig(
        sampling=sampling, token_reward=bind(token_reward, **reward_args), gold_credit=gold_credit, **same_name
    )


def _gold_of_policy(state, config, task, ppo: PPOConfig) -> dict:
    """Mean gold reward and KL to pi_ref of the PPO policy on the held-out prompts and, with the
    task's gold credit, how each part of the run's token reward matches it on those samples."""
    ref = state.frozen["models"].get("ref")
    if state.base is not None:  # on a shared base pi_ref is the base: the policy with zero adapters, exactly
        ref = state.lm_params(jax.tree.map(jnp.zeros_like, state.policy.params))
    params = state.lm_params(state.policy.params)
    rows = held_out_rows(config, task, state.policy.graphdef, params, ref)
    numbers = _gold_numbers(rows)
    if task.gold_credit is not None and state.base is None:
        numbers.update(_credit_of_samples(state, config, task, ppo, rows))
    return numbers


def _credit_of_samples(state, config, task, ppo: PPOConfig, rows: dict) -> dict:
    """`credit/<part>_token` and `credit/<part>_response` (rto_jax.eval.credit.credit_correlations):
    each part of the run's token reward, computed as the experience maker does on the held-out
    samples `rows`, against the task's gold credit; along training, how good the dense credit the
    policy is trained on is where the policy now samples."""
    arrays = sequences(task.eval_prompts, rows["tokens"], rows["response_mask"])
    reward = "reward" in state.frozen
    reward_graphdef = state.reward_graphdef if reward else None
    parts = []
    for batch, n in fixed_size_batches({k: arrays[k] for k in SEQUENCE_KEYS}, config.evaluate.batch_size):
        batch = {k: jnp.asarray(v) for k, v in batch.items()}
        out = token_reward_parts(
            state.policy.graphdef,
            state.policy.params,
            state.reward_lms(),
            reward_graphdef,
            state.frozen.get("reward"),
            *(batch[k] for k in SEQUENCE_KEYS),
            token_reward=ppo.token_reward,
            temperature=float(ppo.sampling.temperature),
            eos_id=int(task.eos_id),
            reward_mean=state.frozen.get("reward_mean", 0.0),
            reward_std=state.frozen.get("reward_std", 1.0),
            score_clip=ppo.score_clip,
            missing_eos_penalty=ppo.missing_eos_penalty,
            gold_credit=ppo.gold_credit,
        )
        parts.append({k: np.asarray(v)[:n] for k, v in out["parts"].items()})
    parts = {k: np.concatenate([b[k] for b in parts]) for k in parts[0]}
    prompts = task.eval_prompts
    credit = task.gold_credit(prompts["prompt_ids"], prompts["prompt_mask"], rows["tokens"], rows["response_mask"])
    correlations = credit_correlations(parts, np.asarray(credit), arrays["response_mask"])
    return {f"credit/{k}": v for k, v in correlations.items()}


def _gold_numbers(rows: dict) -> dict:
    return {"gold_reward": float(np.mean(rows["gold"])), "kl_to_ref": float(np.mean(rows["kl"]))}


def run_gold_eval(config, workdir, task, run_log: RunLog, *, policies: dict[str, str], ref_path: str) -> dict:
    """{policy: {gold_reward, kl_to_ref}} on the held-out prompts, with the same samples' keys as
    PPO's gold curve (so pi_sft here is that curve's point at 0 episodes); for gold-reward tasks."""
    del workdir, run_log
    if task.gold_reward is None:
        raise ValueError(f"task {task.name!r} has no gold reward")
    mesh = common.device_mesh(config)
    _, ref_params = nnx.split(common.load_model(ref_path, "lm", config, mesh))
    out = {}
    for name, path in policies.items():
        graphdef, params = nnx.split(common.load_model(path, "lm", config, mesh))
        out[name] = _gold_numbers(held_out_rows(config, task, graphdef, params, ref_params))
    return out


def run_ppo(
    config,
    workdir,
    task,
    run_log: RunLog,
    *,
    token_reward,
    models: dict[str, str | None],
    reward: dict,
    reward_args: dict | None = None,
    stage: str = "ppo",
    ppo_overrides: dict | None = None,
) -> dict:
    """PPO with a token reward: the policy starts from `models['ref']` (pi_sft), the critic from the
    reward model (none under a critic-free `ppo.estimator`); the frozen models loaded are exactly those
    the token reward reads. Each rollout answers rollout_batch_size / samples_per_prompt prompts
    samples_per_prompt times.

    token_reward: `fn(logps, score, mask, **coefficients)` (rto_jax.objectives.token_rewards).
    models: {name: model path} of the frozen language models a recipe offers ('ref' required).
    reward: the reward-model stage's summary (model_path, reward_mean, reward_std).
    reward_args: the reward's coefficients (default `config.ppo.reward_args`).
    stage: the stage's name (its folder, metrics and checkpoints).
    ppo_overrides: config.ppo values of this run only (a method's own lr in a comparison).
    With a gold reward (synthetic tasks) and `ppo.eval_every > 0`, the policy's mean gold reward on the
    held-out prompts is logged every `eval_every` iterations and at the end (split 'eval').
    """
    if ppo_overrides:
        config = config.copy_and_resolve_references()
        with config.unlocked():
            config.ppo.update(ppo_overrides)
    cfg = config.ppo
    name = token_reward.__name__
    if cfg.init_from:
        return {"model_path": cfg.init_from, "source": "init_from", "token_reward": name}
    ppo = ppo_config(config, task, token_reward, reward_args)
    total = cfg.total_episodes // cfg.rollout_batch_size
    total = min(total, cfg.max_steps) if cfg.max_steps else total
    mesh = common.device_mesh(config)
    missing = [m for m in frozen_models(token_reward) if not models.get(m)]
    if missing:
        raise ValueError(f"token reward {name!r} reads the models {missing}, which the recipe does not give")
    txs = (common.optimizer(cfg, total), common.optimizer(cfg, total, learning_rate=cfg.critic_lr))
    with_critic = needs_critic(ppo.estimator)
    online_prm = None  # PRIME: one of the reward's models trains during PPO (checked by config.validate)
    if ppo.online_prm:
        online_prm = (ppo.online_prm, common.optimizer(cfg, total, learning_rate=cfg.prm_lr))
    if common.lora_config(cfg) is not None:
        state = _shared_base_state(config, stage, token_reward, models, reward, txs, mesh)
    else:
        policy = common.load_model(models["ref"], "lm", config, mesh)
        frozen = {
            m: nnx.split(common.load_model(models[m], "lm", config, mesh))[1] for m in frozen_models(token_reward)
        }
        # The critic starts as the reward model with its head rescaled to the normalized score
        # (r - mean) / std, the scale of the rewards it learns to predict (not the raw score's).
        critic = None
        if with_critic:
            critic = _critic(common.load_model(reward["model_path"], "scalar", config, mesh), reward)
        reward_model = None
        if needs_reward_model(token_reward):
            reward_model = common.load_model(reward["model_path"], "scalar", config, mesh)
        state = create_ppo_state(
            policy,
            critic,
            *txs,
            frozen=frozen,
            reward_model=reward_model,
            reward_mean=reward["reward_mean"],
            reward_std=reward["reward_std"],
            online_prm=online_prm,
        )
    state, shardings = common.shard_state(state, mesh)
    _, _, iteration_fn = ppo_fns(ppo, shardings=shardings)
    per_step = cfg.rollout_batch_size // ppo.samples_per_prompt  # prompts; each answered samples_per_prompt times
    prompts = BatchIterator(task.prompts_train, per_step, seed=config.seed, **process_slice())
    trained = ("policy",) + (("critic",) if with_critic else ()) + (("prm",) if online_prm else ())
    policy_and_critic = Checkpointed(
        tree=lambda state: {name: getattr(state, name) for name in trained},
        restore=lambda state, tree: state.replace(**{name: tree[name] for name in trained}),
        trained=lambda state: tuple(getattr(state, name).params for name in trained),
    )
    evaluate = None
    if task.gold_reward is not None and cfg.eval_every > 0:
        evaluate = functools.partial(_gold_of_policy, config=config, task=task, ppo=ppo)
    state, done = run_loop(
        stage, config, workdir, run_log, state, prompts, iteration_fn, total,
        prepare=lambda batch: {k: batch[k] for k in ("prompt_ids", "prompt_mask")},
        evaluate=evaluate, eval_every=cfg.eval_every,
        checkpointed=policy_and_critic,
        rng_name="ppo",  # every PPO run of a seed samples with the same keys: common random numbers
        postfix=lambda v: {"reward": f"{v['reward/total']:.3g}", "kl": f"{v.get('kl_to_ref', 0.0):.3g}"},
        shardings=shardings,
    )  # fmt: skip
    values = done.last_metrics
    folder = common.stage_dir(workdir, stage)
    path = common.export_trained(state.policy_model(state.policy.params), folder, task, base_model=models["ref"])
    if with_critic:
        critic_base = models["ref"] if state.base is not None else reward["model_path"]
        critic = state.critic_model(state.critic.params)
        common.export_trained(critic, folder, task, base_model=critic_base, name="critic")
    prm_path = {}
    if online_prm:  # the implicit PRM as it ended: a language model like the DPO policy it started from
        prm_model = nnx.merge(state.policy.graphdef, state.prm.params)
        prm_path["prm_path"] = common.export_trained(prm_model, folder, task, base_model=models["ref"], name="prm")
    keys = ("score", "kl_to_ref", "response_length", "eos_rate", "loss")
    return {
        "model_path": path,
        "source": "trained",
        "token_reward": name,
        "steps": total,
        "resumed_from": done.resumed_from,
        **prm_path,
        **{k: values[k] for k in keys if k in values},
        # The final policy on the held-out prompts (gold tasks with ppo.eval_every > 0).
        **({"held_out": dict(done.last_eval)} if done.last_eval else {}),
    }


def _critic(reward_model, reward: dict):
    """The reward model with its head rescaled to emit normalized scores (r - mean) / std: the critic's start."""
    return reward_model.with_affine_output(1.0 / reward["reward_std"], -reward["reward_mean"] / reward["reward_std"])


def _adapter_on_sft(path: str, sft_path: str, what: str, key: str) -> Path:
    """The PEFT adapter folder of the model at `path`, checked to be trained on the SFT model."""
    folder = common.adapter_folder(path)
    fix = f"train it with {key} > 0 (or give a PEFT adapter folder of the SFT model), or set ppo.lora.rank=0"
    if folder is None:
        raise ConfigError(
            "ppo.lora.rank",
            f"PPO on one shared base needs the {what} as adapters on the SFT model; {path} has none: {fix}",
        )
    trained_on = peft_io.read_peft_json(folder).get("base_model_name_or_path") or ""
    same = lambda a, b: (
        a == b or (common.looks_local(a) and Path(a).expanduser().resolve() == Path(b).expanduser().resolve())
    )
    if not same(trained_on, sft_path):
        raise ConfigError(
            "ppo.lora.rank",
            f"PPO on one shared base needs the {what} as adapters on the SFT model {sft_path}; {folder} was trained "
            f"on {trained_on or 'an unnamed base'}: {fix}",
        )
    return folder


def _shared_base_state(config, stage: str, token_reward, models: dict, reward: dict, txs, mesh):
    """PPOState on the SFT model held once (config.ppo.lora.rank > 0): policy = fresh adapters on it,
    pi_ref = it, critic = the reward model's adapters and head (rescaled), the reward model and the DPO
    policy = their adapters; all of them trained on this SFT model (checked)."""
    sft, policy_lora = models["ref"], common.lora_config(config.ppo)
    base = common.load_model(sft, "lm", config, mesh)
    common.check_lora_targets("ppo", policy_lora, base)
    reward_folder = _adapter_on_sft(reward["model_path"], sft, "reward model", "reward_model.lora.rank")
    if "score" not in (peft_io.read_peft_json(reward_folder).get("modules_to_save") or []):
        raise ConfigError(
            "ppo.lora.rank",
            f"{reward_folder} has no scalar head ('score' in modules_to_save): it is not a reward model",
        )
    reward_model = peft_io.load_peft_adapter(
        ScalarHeadModel(base.config, nnx.Rngs(0), decoder=base.decoder), reward_folder
    )
    frozen = {
        m: peft_io.load_peft_adapter(base, _adapter_on_sft(models[m], sft, f"{m!r} model", f"{m}.lora.rank"))
        for m in frozen_models(token_reward)
        if m != "ref"  # the base itself
    }
    return create_shared_base_ppo_state(
        base,
        policy_lora,
        _critic(reward_model, reward) if needs_critic(config.ppo.estimator) else None,
        *txs,
        frozen=frozen,
        reward_model=reward_model if needs_reward_model(token_reward) else None,
        reward_mean=reward["reward_mean"],
        reward_std=reward["reward_std"],
        rngs=nnx.Rngs(params=common.stage_key(config.seed, f"{stage}/lora")),
        base_dtype=common.base_dtype(config),
    )


__all__ = [
    "make_judge",
    "ppo_config",
    "run_best_of_n",
    "run_dpo",
    "run_preferences",
    "run_evaluate",
    "run_gold_eval",
    "run_ppo",
    "run_reward_model",
    "run_sft",
    "summary",
]
