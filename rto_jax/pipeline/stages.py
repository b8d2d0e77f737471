"""The stages as plain functions: `run_<stage>(config, workdir, task, log, <models it reads>) -> dict`.

Each returns its summary (the path of the model it made or took, final metrics), which the runner
stores in `<workdir>/<stage>/done.json`. A stage reads only the exported (HF-format) models of the
stages before it, so a stage given `init_from` and a stage trained here are the same to the next one.

Every trained stage builds its state and jitted step, then runs the one resumable loop
(rto_jax/pipeline/loop.py) and exports its model. SFT, reward model and DPO are `make_train_step`
given their loss; PPO's step is a whole iteration (rollout, token rewards, GAE, update).
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rto_jax.data import BatchIterator, pad_batch
from rto_jax.distributed import is_main_process, process_slice, to_host
from rto_jax.pipeline import common
from rto_jax.pipeline.loop import Checkpointed, Progress, run_loop
from rto_jax.objectives.token_rewards import bind, frozen_models, needs_reward_model
from rto_jax.pipeline.config import parse_policies
from rto_jax.pipeline.logging import RunLog, summary, table
from rto_jax.sampling import SamplingConfig, generate_jit
from rto_jax.train import (
    DPOLoss,
    PPOConfig,
    TrainState,
    create_ppo_state,
    make_ppo_fns,
    RewardModelLoss,
    SFTLoss,
    loss_metrics,
    make_train_step,
    precompute_reference_logps,
    response_logprobs,
    sequence_scores,
)
from rto_jax.train.sharding import create_sharded_train_state, mesh_from_config, shard_tree, step_shardings

log = logging.getLogger(__name__)

# The step factories return new jitted closures; caching them per (hashable, frozen) config lets a
# process that runs several pipelines (tests, notebooks, a resumed run) reuse the compiled steps.
train_step = functools.lru_cache(maxsize=None)(make_train_step)
ppo_fns = functools.lru_cache(maxsize=None)(make_ppo_fns)


def device_mesh(config):
    """The mesh of `config.mesh`, or None on a single device (the unsharded path, exactly as before)."""
    if jax.device_count() == 1:
        return None
    return mesh_from_config(config)


def shard_state(state, mesh):
    """(state placed on `mesh` by the sharding rules, its StepShardings); (state, None) without a mesh."""
    if mesh is None:
        return state, None
    state = shard_tree(state, mesh)
    return state, step_shardings(state, mesh)


# ----------------------------------------------------------------------------------------------
# Jitted evaluation helpers (graphdef static; arrays [B, ...]).


@functools.partial(jax.jit, static_argnums=0)
def _scores(graphdef, params, input_ids, attention_mask, positions, response_mask):
    """Scalar-head score at the last response token `[B]`."""
    return sequence_scores(nnx.merge(graphdef, params), input_ids, attention_mask, positions, response_mask)


@functools.partial(jax.jit, static_argnums=(0, 6))
def _logprobs(graphdef, params, input_ids, attention_mask, positions, response_mask, temperature):
    """Per-token response log-probs `[B, R]` at `temperature`."""
    model = nnx.merge(graphdef, params)
    return response_logprobs(model, input_ids, attention_mask, positions, response_mask, temperature)[0]


def _batches(arrays: dict, batch_size: int):
    """Fixed-size batches over all rows (the last one padded by repeating rows) and their valid counts."""
    n = len(next(iter(arrays.values())))
    for start in range(0, n, batch_size):
        chunk = {k: v[start : start + batch_size] for k, v in arrays.items()}
        yield pad_batch(chunk, batch_size)


def _weighted_mean(values: list[tuple[dict, int]]) -> dict[str, float]:
    values = [(to_host(m), n) for m, n in values]
    total = sum(n for _, n in values)
    keys = values[0][0].keys()
    return {k: float(sum(float(m[k]) * n for m, n in values) / total) for k in keys}


def _pair_side(batch: dict, side: str) -> tuple:
    return tuple(batch[f"{side}_{k}"] for k in ("input_ids", "attention_mask", "positions", "response_mask"))


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
    tx, mesh = common.optimizer(cfg, steps), device_mesh(config)
    if mesh is not None and not config.model.init_from:  # initialized shard by shard on the mesh
        state = create_sharded_train_state(lambda: common.random_base_model(config, task), tx, mesh)
        shardings = step_shardings(state, mesh)
    else:
        state, shardings = shard_state(TrainState.create(common.init_base_model(config, task, mesh), tx), mesh)
    step_fn = train_step(SFTLoss(), cfg.grad_accum_steps, shardings)

    def evaluate(state):
        losses = [
            ({"loss": loss_metrics(SFTLoss(), state, b)["loss"]}, n)
            for b, n in _batches(task.sft_eval, cfg.eval_batch_size)
        ]
        return _weighted_mean(losses)

    state, done = run_loop(
        "sft", config, workdir, run_log, state, batches, step_fn, steps,
        evaluate=evaluate, eval_every=cfg.eval_every, shardings=shardings,
    )  # fmt: skip
    path = common.export(state.model(), Path(workdir) / "sft" / "model", task)
    return {"model_path": path, "source": "trained", **_summary(done)}


# ----------------------------------------------------------------------------------------------
# Reward model.


def score_arrays(model, arrays: dict, batch_size: int, prefix: str = "") -> np.ndarray:
    """Scalar-head scores `[N]` of SFT-layout arrays (or of the `prefix`-ed keys of preference arrays)."""
    graphdef, params = nnx.split(model)
    keys = ("input_ids", "attention_mask", "positions", "response_mask")
    out = []
    for batch, n in _batches({k: arrays[prefix + k] for k in keys}, batch_size):
        out.append(to_host(_scores(graphdef, params, *(batch[k] for k in keys)))[:n])
    return np.concatenate(out)


def reward_accuracy(model, preference: dict, batch_size: int) -> dict:
    chosen = score_arrays(model, preference, batch_size, "chosen_")
    rejected = score_arrays(model, preference, batch_size, "rejected_")
    return {
        "accuracy": float(np.mean(chosen > rejected)),
        "margin": float(np.mean(chosen - rejected)),
        "score_chosen": float(np.mean(chosen)),
        "score_rejected": float(np.mean(rejected)),
    }


def sample_responses(graphdef, params, prompts: dict, batch_size: int, sampling: SamplingConfig, rng) -> dict:
    """Samples for every prompt row: SFT-layout arrays (input_ids, attention_mask, positions, response_mask)."""
    from rto_jax.sampling import response_inputs

    parts = []
    for i, (batch, n) in enumerate(_batches(prompts, batch_size)):
        ids, mask = jnp.asarray(batch["prompt_ids"]), jnp.asarray(batch["prompt_mask"])
        samples = generate_jit(graphdef, params, ids, mask, jax.random.fold_in(rng, i), sampling)
        input_ids, attention_mask, positions = response_inputs(ids, mask, samples)
        rows = dict(
            input_ids=input_ids, attention_mask=attention_mask, positions=positions, response_mask=samples.response_mask
        )
        parts.append({k: v[:n] for k, v in to_host(rows).items()})
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def reward_normalization(config, task, reward_model, sft_path: str | None) -> dict:
    """Mean/std of the reward model's scores on reference responses or on SFT samples (docs/DESIGN.md 1.2)."""
    cfg = config.reward_model
    n = cfg.normalize_rows
    if cfg.normalize_on == "sft_samples" and sft_path:
        policy = common.load_model(sft_path, "lm", config, device_mesh(config))
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
        mesh = device_mesh(config)
        model = common.load_model(sft_path, "scalar", config, mesh)
        batches, steps = _epochs(config, cfg, task.preference_train)
        state, shardings = shard_state(TrainState.create(model, common.optimizer(cfg, steps)), mesh)
        step_fn = train_step(RewardModelLoss(margin=cfg.margin), cfg.grad_accum_steps, shardings)
        evaluate = lambda state: reward_accuracy(state.model(), task.preference_eval, cfg.eval_batch_size)
        state, done = run_loop(
            "reward_model", config, workdir, run_log, state, batches, step_fn, steps,
            evaluate=evaluate, eval_every=cfg.eval_every, shardings=shardings,
        )  # fmt: skip
        model = state.model()
        out = {
            "model_path": common.export(model, Path(workdir) / "reward_model" / "model", task),
            "source": "trained",
            **_summary(done),
        }
    out.update(reward_normalization(config, task, model, sft_path))
    return out


# ----------------------------------------------------------------------------------------------
# DPO.


def run_dpo(config, workdir, task, run_log: RunLog, sft_path: str) -> dict:
    """DPO from pi_sft with pi_sft as the reference; reference log-probs computed per batch."""
    cfg = config.dpo
    if cfg.init_from:
        return {"model_path": cfg.init_from, "source": "init_from"}
    mesh = device_mesh(config)
    policy = common.load_model(sft_path, "lm", config, mesh)
    # On the policy's layout (the eval step takes both).
    ref_graphdef, ref_params = nnx.split(common.load_model(sft_path, "lm", config, mesh))
    batches, steps = _epochs(config, cfg, task.preference_train)
    state, shardings = shard_state(TrainState.create(policy, common.optimizer(cfg, steps)), mesh)
    loss = DPOLoss(beta=cfg.beta, loss_type=cfg.loss_type, label_smoothing=cfg.label_smoothing)
    step_fn = train_step(loss, cfg.grad_accum_steps, shardings)
    # On the mesh the reference log-probs of the (global) batch are split like the batch itself.
    place = (lambda x: x) if shardings is None else functools.partial(jax.device_put, device=shardings.batch)
    prepare = lambda batch: {**batch, **place(precompute_reference_logps(ref_graphdef, ref_params, batch))}

    def evaluate(state):
        parts = [
            (loss_metrics(loss, state, {**b, **precompute_reference_logps(ref_graphdef, ref_params, b)}), n)
            for b, n in _batches(task.preference_eval, cfg.eval_batch_size)
        ]
        return _weighted_mean(parts)

    state, done = run_loop(
        "dpo", config, workdir, run_log, state, batches, step_fn, steps,
        prepare=prepare, evaluate=evaluate, eval_every=cfg.eval_every, shardings=shardings,
    )  # fmt: skip
    path = common.export(state.model(), Path(workdir) / "dpo" / "model", task)
    return {"model_path": path, "source": "trained", **_summary(done)}


# ----------------------------------------------------------------------------------------------
# PPO / RTO.


def ppo_config(config, task, token_reward) -> PPOConfig:
    """PPOConfig of config.ppo with `token_reward` (a function of token_rewards' signature) bound to
    `config.ppo.reward_args`."""
    cfg = config.ppo
    sampling = SamplingConfig(
        max_new_tokens=task.response_length,
        eos_id=task.eos_id,
        pad_id=task.pad_id,
        temperature=cfg.temperature,
        top_k=cfg.top_k,
        top_p=cfg.top_p,
    )
    return PPOConfig(
        sampling=sampling,
        token_reward=bind(token_reward, **cfg.reward_args.to_dict()),
        gamma=cfg.gamma,
        lam=cfg.lam,
        ppo_epochs=cfg.ppo_epochs,
        num_minibatches=cfg.num_minibatches,
        clip_eps=cfg.clip_eps,
        value_clip_eps=cfg.value_clip_eps,
        vf_coef=cfg.vf_coef,
        entropy_coef=cfg.entropy_coef,
        score_clip=cfg.score_clip,
        missing_eos_penalty=cfg.missing_eos_penalty,
        whiten_advantages=cfg.whiten_advantages,
    )


def run_ppo(
    config, workdir, task, run_log: RunLog, *, token_reward, models: dict[str, str | None], reward: dict, stage="ppo"
) -> dict:
    """PPO with a token reward: the policy starts from `models['ref']` (pi_sft), the critic from the
    reward model; the frozen models loaded are exactly those the token reward reads.

    token_reward: `fn(logps, score, mask, **coefficients)` (rto_jax.objectives.token_rewards).
    models: {name: model path} of the frozen language models a recipe offers ('ref' required).
    reward: the reward-model stage's summary (model_path, reward_mean, reward_std).
    stage: the stage's name (its folder, metrics and checkpoints).
    """
    cfg = config.ppo
    name = token_reward.__name__
    if cfg.init_from:
        return {"model_path": cfg.init_from, "source": "init_from", "token_reward": name}
    ppo = ppo_config(config, task, token_reward)
    total = cfg.total_episodes // cfg.rollout_batch_size
    total = min(total, cfg.max_steps) if cfg.max_steps else total
    mesh = device_mesh(config)
    missing = [m for m in frozen_models(token_reward) if not models.get(m)]
    if missing:
        raise ValueError(f"token reward {name!r} reads the models {missing}, which the recipe does not give")
    policy = common.load_model(models["ref"], "lm", config, mesh)
    frozen = {m: nnx.split(common.load_model(models[m], "lm", config, mesh))[1] for m in frozen_models(token_reward)}
    critic = common.load_model(reward["model_path"], "scalar", config, mesh)
    reward_model = None
    if needs_reward_model(token_reward):
        reward_model = common.load_model(reward["model_path"], "scalar", config, mesh)
    state = create_ppo_state(
        policy,
        critic,
        common.optimizer(cfg, total),
        common.optimizer(cfg, total, learning_rate=cfg.critic_lr),
        frozen=frozen,
        reward_model=reward_model,
        reward_mean=reward["reward_mean"],
        reward_std=reward["reward_std"],
    )
    state, shardings = shard_state(state, mesh)
    _, _, iteration_fn = ppo_fns(ppo, shardings=shardings)
    prompts = BatchIterator(task.prompts_train, cfg.rollout_batch_size, seed=config.seed, **process_slice())
    policy_and_critic = Checkpointed(
        tree=lambda state: {"policy": state.policy, "critic": state.critic},
        restore=lambda state, tree: state.replace(policy=tree["policy"], critic=tree["critic"]),
        trained=lambda state: (state.policy.params, state.critic.params),
    )
    state, done = run_loop(
        stage, config, workdir, run_log, state, prompts, iteration_fn, total,
        prepare=lambda batch: {k: batch[k] for k in ("prompt_ids", "prompt_mask")},
        checkpointed=policy_and_critic,
        postfix=lambda v: {"reward": f"{v['reward/total']:.3g}", "kl": f"{v.get('kl_to_ref', 0.0):.3g}"},
        shardings=shardings,
    )  # fmt: skip
    values = done.last_metrics
    folder = common.stage_dir(workdir, stage)
    path = common.export(state.policy.model(), folder / "model", task)
    common.export(state.critic.model(), folder / "critic", task)
    keys = ("score", "kl_to_ref", "response_length", "eos_rate", "loss")
    return {
        "model_path": path,
        "source": "trained",
        "token_reward": name,
        "steps": total,
        "resumed_from": done.resumed_from,
        **{k: values[k] for k in keys if k in values},
    }


# ----------------------------------------------------------------------------------------------
# Evaluation.


def make_judge(path: str, config) -> Callable[[dict], np.ndarray]:
    """A win-rate judge: SFT-layout arrays -> scores `[N]` (higher is better).

    Today a reward-model folder / hub id. Extension point: any callable with this signature, e.g. an
    LLM judge that decodes prompt and response with the task's tokenizer, asks a model which of two
    summaries is better and returns per-row preference scores.
    """
    model = common.load_model(path, "scalar", config, device_mesh(config))
    return lambda arrays: score_arrays(model, arrays, config.evaluate.batch_size)


def evaluate_policy(
    config, task, policy_path: str, reward_model, judge, ref, references: dict | None
) -> tuple[dict, dict]:
    """Samples on the held-out prompts and scores them -> (metrics, the samples' arrays)."""
    cfg = config.evaluate
    policy = common.load_model(policy_path, "lm", config, device_mesh(config))
    graphdef, params = nnx.split(policy)
    sampling = SamplingConfig(
        task.response_length, task.eos_id, task.pad_id, temperature=cfg.temperature, greedy=cfg.greedy
    )
    # The same key for every policy: common random numbers make policies comparable.
    rows = sample_responses(
        graphdef, params, task.eval_prompts, cfg.batch_size, sampling, common.stage_key(config.seed, "evaluate")
    )
    mask = rows["response_mask"]
    r = task.response_length
    has_eos = np.any((rows["input_ids"][:, -r:] == task.eos_id) & (mask > 0), axis=1)
    out = {
        "rm_score": float(np.mean(score_arrays(reward_model, rows, cfg.batch_size))),
        "length": float(np.mean(mask.sum(1))),
        "eos_rate": float(np.mean(has_eos)),
    }
    if ref is not None:  # KL(pi || pi_ref) estimated on the samples, both at the sampling temperature
        kl = []
        for batch, n in _batches(rows, cfg.batch_size):
            args = (
                batch["input_ids"],
                batch["attention_mask"],
                batch["positions"],
                batch["response_mask"],
                cfg.temperature,
            )
            diff = _logprobs(graphdef, params, *args) - _logprobs(ref[0], ref[1], *args)
            kl.append(to_host(jnp.sum(diff, axis=1))[:n])
        out["kl_to_ref"] = float(np.mean(np.concatenate(kl)))
    if references is not None:
        mine, theirs = judge(rows), references["judge_scores"]
        out["win_rate"] = float(np.mean((mine > theirs) + 0.5 * (mine == theirs)))
    if task.gold_reward is not None:
        p = task.prompt_length
        gold = task.gold_reward(rows["input_ids"][:, :p], rows["attention_mask"][:, :p], rows["input_ids"][:, p:], mask)
        out["gold_reward"] = float(np.mean(gold))
    return out, rows


def run_evaluate(
    config, workdir, task, run_log: RunLog, *, policies: dict[str, str], reward_path: str | None, ref_path: str | None
) -> dict:
    """Every policy on the held-out prompts: reward-model score, KL to pi_ref, length, EOS rate, win rate
    against the dataset's reference responses (judge: evaluate.judge or the run's reward model).

    policies: {name: model path}, plus those of `config.evaluate.policies`.
    Per-policy results are cached in `<workdir>/evaluate/<policy>.json` (a restart skips them).
    """
    cfg = config.evaluate
    policies = {**policies, **parse_policies(cfg.policies)}
    folder = common.stage_dir(workdir, "evaluate")
    judge_path = cfg.judge or reward_path
    mesh = device_mesh(config)
    reward_model = common.load_model(reward_path or judge_path, "scalar", config, mesh)
    judge = make_judge(judge_path, config)
    ref = nnx.split(common.load_model(ref_path, "lm", config, mesh)) if ref_path else None
    results: dict[str, dict] = {}
    # Read before evaluating anything (see runner.run: a lagging process must not see new caches).
    cached = {
        name: json.loads((folder / f"{name}.json").read_text())
        for name in policies
        if (folder / f"{name}.json").exists()
    }
    references = None
    if task.eval_references is not None:
        references = {"judge_scores": judge(task.eval_references)}
        mask = task.eval_references["response_mask"]
        tokens = task.eval_references["input_ids"][:, -task.response_length :]
        results["reference"] = {
            "rm_score": float(np.mean(score_arrays(reward_model, task.eval_references, cfg.batch_size))),
            "length": float(np.mean(mask.sum(1))),
            "eos_rate": float(np.mean(np.any((tokens == task.eos_id) & (mask > 0), axis=1))),
            "win_rate": 0.5,
        }
    for name, path in policies.items():
        if name in cached:
            results[name] = cached[name]
            continue
        metrics, rows = evaluate_policy(config, task, path, reward_model, judge, ref, references)
        metrics["model_path"] = path
        results[name] = metrics
        run_log.log("evaluate", 0, {k: v for k, v in metrics.items() if isinstance(v, float)}, split=name)
        if is_main_process():
            _write_samples(folder / f"samples_{name}.jsonl", task, rows, cfg.num_samples_logged)
        common.write_json(folder / f"{name}.json", metrics)
    if is_main_process():
        print(
            table(
                f"evaluation ({len(task.eval_prompts['prompt_ids'])} held-out prompts)",
                {k: {m: v for m, v in r.items() if m != "model_path"} for k, r in results.items()},
            )
        )
    return {"policies": results, "judge": judge_path, "num_prompts": len(task.eval_prompts["prompt_ids"])}


def _write_samples(path: Path, task, rows: dict, count: int) -> None:
    p = task.prompt_length
    lines = []
    for i in range(min(count, len(rows["input_ids"]))):
        prompt = rows["input_ids"][i, :p][rows["attention_mask"][i, :p] > 0]
        response = rows["input_ids"][i, p:][rows["response_mask"][i] > 0]
        lines.append(json.dumps({"prompt": task.decode(prompt), "response": task.decode(response)}))
    path.write_text("\n".join(lines) + ("\n" if lines else ""))


__all__ = [
    "make_judge",
    "ppo_config",
    "run_dpo",
    "run_evaluate",
    "run_ppo",
    "run_reward_model",
    "run_sft",
    "summary",
]
