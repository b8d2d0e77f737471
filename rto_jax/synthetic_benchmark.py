"""The offline synthetic alignment benchmark: SFT -> reward model -> DPO -> PPO variants, judged by a gold reward.

Every method starts from the same SFT policy and gets the same episode budget and the same shared
hyperparameters; only the reward shaping switches of `PPOConfig` differ between PPO, RTO and the
ablations. Everything is determined by `config.seed` (task, data, initialisation, sampling).

    run(config, workdir) -> results dict (also results.json, results.md, plots in workdir)
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from rto_jax.data.loader import BatchIterator
from rto_jax.data.synthetic import SyntheticTask, SyntheticTaskConfig, best_of_n_frontier
from rto_jax.objectives.token_rewards import TOKEN_REWARDS, bind, frozen_models, needs_reward_model, reward_args
from rto_jax.pipeline.logging import RunLog, progress, write_json_atomic
from rto_jax.eval.plots import plot_gold_vs_episodes, plot_gold_vs_kl
from rto_jax.eval.rollout_eval import episodes_to_reach, evaluate_policy, over_prompt_batches, summarize
from rto_jax.models import CausalLM, ModelConfig, ScalarHeadModel, default_positions, load_pretrained, save_pretrained
from rto_jax.sampling import SamplingConfig, generate_jit
from rto_jax.train import (
    DPOLoss,
    OptimizerConfig,
    PPOConfig,
    TrainState,
    create_ppo_state,
    make_optimizer,
    make_ppo_fns,
    RewardModelLoss,
    SFTLoss,
    make_train_step,
    precompute_reference_logps,
    sequence_scores,
)

log = logging.getLogger(__name__)

# The methods compared: token rewards of one code path (docs/DESIGN.md: the ablations are rewards).
VARIANTS = {name: TOKEN_REWARDS[name] for name in ("ppo", "rto", "rto_sequence_end", "rto_no_rm")}


def _model_config(config, task: SyntheticTask) -> ModelConfig:
    m = config.model
    return ModelConfig(
        vocab_size=task.vocab_size,
        hidden_size=m.hidden_size,
        intermediate_size=m.intermediate_size,
        num_layers=m.num_layers,
        num_heads=m.num_heads,
        num_kv_heads=m.num_heads,
        head_dim=m.hidden_size // m.num_heads,
        max_position_embeddings=64,
        eos_token_id=task.eos_id,
        pad_token_id=task.pad_id,
        tie_word_embeddings=True,
    )


def _optimizer(stage_config, steps: int):
    return make_optimizer(
        OptimizerConfig(
            learning_rate=stage_config.lr,
            schedule=stage_config.schedule,
            warmup_steps=stage_config.warmup_steps,
            total_steps=steps,
            max_grad_norm=1.0,
            b2=0.999,
        )
    )


def _train(step_fn, state, arrays: dict, batch_size: int, steps: int, seed: int, name: str, run_log: RunLog):
    """`steps` calls of a jitted step on shuffled batches; every step's metrics go to metrics.jsonl."""
    iterator = BatchIterator(arrays, batch_size, seed)
    run_log.truncate(name, 0)  # a stage restarted from scratch logs its steps again
    start = time.perf_counter()
    metrics = {}
    with progress(name, steps) as bar:
        for step in range(steps):
            state, metrics = step_fn(state, {k: jnp.asarray(v) for k, v in next(iterator).items()}, None)
            run_log.log(name, step + 1, metrics)
            bar.update(1)
    metrics = {k: float(v) for k, v in metrics.items()}
    log.info(
        "%s: %d steps in %.1fs, last metrics %s",
        name,
        steps,
        time.perf_counter() - start,
        {k: round(v, 4) for k, v in metrics.items()},
    )
    return state, metrics


def _trained(workdir: Path, name: str, train_fn):
    """The model saved under workdir/models/name (HF format), or `train_fn()`'s model, saved there first.

    A finished stage is thus skipped on restart, and every trained model is exported for outside tools.
    """
    folder = workdir / "models" / name
    if (folder / "config.json").exists():
        log.info("%s: reusing %s", name, folder)
        return load_pretrained(folder)
    model = train_fn()
    save_pretrained(model, folder)
    return model


def _sample(graphdef, params, prompts, rng, sampling: SamplingConfig, batch_size=512):
    """One sample per prompt: `response_ids`, `response_mask` `[N, R]` (numpy)."""

    def sample_batch(prompt_ids, prompt_mask, batch_rng):
        out = generate_jit(graphdef, params, prompt_ids, prompt_mask, batch_rng, sampling)
        return {"response_ids": out.tokens, "response_mask": out.response_mask}

    return over_prompt_batches(sample_batch, prompts, rng, batch_size)


def run(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict:
    if jax.process_count() > 1:
        # Its models are small and its loops unsharded: several processes would each run it whole
        # and write the same files.
        raise ValueError(
            "the synthetic benchmark runs in one process (on one device); start it without "
            "config.distributed / RTO_JAX_COORDINATOR_ADDRESS"
        )
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    run_log = RunLog(workdir)
    seed = config.seed
    task = SyntheticTask.create(SyntheticTaskConfig(**config.task.to_dict()), seed=seed)
    data_rng = np.random.default_rng(seed)
    key = jax.random.key(seed)
    model_cfg = _model_config(config, task)
    sampling = SamplingConfig(
        max_new_tokens=task.max_response_length, eos_id=task.eos_id, pad_id=task.pad_id, temperature=config.temperature
    )
    eval_prompts = task.sample_prompts(data_rng, config.eval.num_prompts)
    timings = {}

    # 1. SFT on the reference source.
    start = time.perf_counter()
    sft_data = task.make_sft_data(data_rng, config.sft.num_examples)

    def train_sft():
        state = TrainState.create(CausalLM(model_cfg, nnx.Rngs(seed)), _optimizer(config.sft, config.sft.steps))
        return _train(
            make_train_step(SFTLoss()), state, sft_data, config.sft.batch_size, config.sft.steps, seed, "sft", run_log
        )[0].model()

    graphdef, sft_params = nnx.split(_trained(workdir, "sft", train_sft))
    timings["sft"] = time.perf_counter() - start

    # 2. Preferences: two pi_sft samples per prompt, labelled by Bradley-Terry on the gold reward.
    start = time.perf_counter()
    pref_prompts = task.sample_prompts(data_rng, config.preferences.num_pairs)
    key, ka, kb = jax.random.split(key, 3)
    responses_a = _sample(graphdef, sft_params, pref_prompts, ka, sampling)
    responses_b = _sample(graphdef, sft_params, pref_prompts, kb, sampling)
    prefs, label_info = task.make_preference_data(data_rng, pref_prompts, responses_a, responses_b)
    log.info(
        "preferences: %d pairs, label temperature %.3f, agreement with gold %.3f",
        len(pref_prompts["prompt_ids"]),
        label_info["temperature"],
        label_info["agreement"],
    )

    # 3. Reward model from the SFT backbone; its score is normalized by its stats on SFT samples.
    def train_reward_model():
        model = ScalarHeadModel.from_causal_lm(nnx.merge(graphdef, sft_params), nnx.Rngs(seed + 1))
        state = TrainState.create(model, _optimizer(config.reward_model, config.reward_model.steps))
        return _train(
            make_train_step(RewardModelLoss()),
            state,
            prefs,
            config.reward_model.batch_size,
            config.reward_model.steps,
            seed,
            "reward_model",
            run_log,
        )[0].model()

    reward_model = _trained(workdir, "reward_model", train_reward_model)
    scores = np.asarray(
        sequence_scores(
            reward_model,
            *[jnp.asarray(prefs[f"chosen_{k}"]) for k in ("input_ids", "attention_mask", "positions", "response_mask")],
        )
    )
    reward_mean, reward_std = float(scores.mean()), float(scores.std() + 1e-6)
    timings["reward_model"] = time.perf_counter() - start

    # 4. DPO from SFT on the same preferences (reference log-probs precomputed once).
    start = time.perf_counter()
    prefs_ref = {
        **prefs,
        **{
            k: np.asarray(v)
            for k, v in precompute_reference_logps(
                graphdef, sft_params, {k: jnp.asarray(v) for k, v in prefs.items()}
            ).items()
        },
    }

    def train_dpo():
        state = TrainState.create(
            nnx.merge(graphdef, jax.tree.map(jnp.copy, sft_params)), _optimizer(config.dpo, config.dpo.steps)
        )
        return _train(
            make_train_step(DPOLoss(beta=config.dpo.beta)),
            state,
            prefs_ref,
            config.dpo.batch_size,
            config.dpo.steps,
            seed,
            "dpo",
            run_log,
        )[0].model()

    dpo_params = nnx.split(_trained(workdir, "dpo", train_dpo))[1]
    timings["dpo"] = time.perf_counter() - start

    # 5. PPO variants, same budget and hyperparameters; gold reward tracked against episodes.
    reward_graphdef, reward_params = nnx.split(reward_model)
    evaluate = lambda params, rng: evaluate_policy(
        graphdef,
        params,
        sft_params,
        eval_prompts,
        rng,
        sampling,
        reward_graphdef=reward_graphdef,
        reward_params=reward_params,
        gold_fn=task.gold_reward_jax,
    )
    eval_key = jax.random.key(seed + 12345)
    rows = {"sft": evaluate(sft_params, eval_key), "dpo": evaluate(dpo_params, eval_key)}
    start_point = PPOStart(
        graphdef=graphdef,
        sft_params=sft_params,
        dpo_params=dpo_params,
        reward_model=reward_model,
        reward_mean=reward_mean,
        reward_std=reward_std,
        sampling=sampling,
        eval_prompts=eval_prompts,
        eval_key=eval_key,
        sft_gold=float(rows["sft"]["gold"].mean()),
    )
    curves = {}
    for name in config.methods:
        if name in ("sft", "dpo"):
            continue
        start = time.perf_counter()
        curve_file = workdir / "curves" / f"{name}.json"
        if curve_file.exists() and (workdir / "models" / name / "config.json").exists():
            log.info("%s: reusing %s", name, workdir / "models" / name)
            params = nnx.split(load_pretrained(workdir / "models" / name))[1]
            curves[name] = json.loads(curve_file.read_text())
        else:
            params, curves[name] = _train_ppo(name, config, task, start_point, run_log)
            save_pretrained(nnx.merge(graphdef, params), workdir / "models" / name)
            write_json_atomic(curve_file, curves[name])
        rows[name] = evaluate(params, eval_key)
        timings[name] = time.perf_counter() - start

    # 6. Best-of-n frontier from pi_sft with the gold reward.
    n_max = config.eval.best_of_n
    bon_prompts = {k: np.repeat(v[: config.eval.best_of_n_prompts], n_max, axis=0) for k, v in eval_prompts.items()}
    bon = _sample(graphdef, sft_params, bon_prompts, jax.random.key(seed + 777), sampling)
    bon_gold = task.gold_reward(
        bon_prompts["prompt_ids"], bon_prompts["prompt_mask"], bon["response_ids"], bon["response_mask"]
    ).reshape(-1, n_max)
    frontier = best_of_n_frontier(bon_gold)

    methods = {name: summarize(r, baseline=rows["sft"]) for name, r in rows.items()}
    results = {
        "seed": seed,
        "methods": methods,
        "curves": curves,
        "timings_s": timings,
        "best_of_n": [
            {"n": int(n), "kl": float(k), "gold_reward": float(m), "gold_reward_se": float(s)}
            for n, k, m, s in zip(frontier["n"], frontier["kl"], frontier["mean"], frontier["stderr"])
        ],
        "labels": {"temperature": label_info["temperature"], "agreement": label_info["agreement"]},
        "reward_model": {
            "score_mean": reward_mean,
            "score_std": reward_std,
            **_reward_model_accuracy(task, reward_model, graphdef, sft_params, sampling, seed),
        },
    }
    ppo_final = methods["ppo"]["gold_reward"] if "ppo" in methods else None
    results["episodes_to_ppo_final"] = (
        {name: episodes_to_reach(curve, ppo_final) for name, curve in curves.items()} if (ppo_final is not None) else {}
    )
    write_json_atomic(workdir / "results.json", results)
    table = results_table(results)
    (workdir / "results.md").write_text(table + "\n")
    plot_gold_vs_episodes(curves, workdir / "gold_vs_episodes.png", f"Synthetic task, seed {seed}")
    plot_gold_vs_kl(methods, results["best_of_n"], workdir / "gold_vs_kl.png", f"Synthetic task, seed {seed}")
    run_log.close()
    print(table)
    return results


def results_table(results: dict) -> str:
    """Markdown table of one run's methods (gold reward with standard error, win rate, KL, ...)."""
    lines = [
        "| method | gold reward | win rate vs SFT | RM score | KL to SFT | length | EOS rate | episodes to PPO's final |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, m in results["methods"].items():
        reach = results.get("episodes_to_ppo_final", {}).get(name)
        reach = (
            "-"
            if name not in results.get("episodes_to_ppo_final", {})
            else ("never" if reach is None else f"{reach:.0f}")
        )
        lines.append(
            f"| {name} | {m['gold_reward']:.3f} ± {m['gold_reward_se']:.3f} | "
            f"{m.get('gold_win_rate_vs_sft', 0.5):.3f} | {m.get('score', float('nan')):.2f} | {m['kl']:.2f} | "
            f"{m['length']:.1f} | {m['eos_rate']:.2f} | {reach} |"
        )
    bon = {p["n"]: p for p in results["best_of_n"]}
    lines.append("")
    lines.append(
        "Best-of-n from pi_sft (gold): "
        + ", ".join(f"n={n}: {bon[n]['gold_reward']:.3f} (KL {bon[n]['kl']:.2f})" for n in (1, 4, 16, 64) if n in bon)
    )
    return "\n".join(lines)


def _reward_model_accuracy(task, reward_model, graphdef, sft_params, sampling, seed, num_pairs=1024) -> dict:
    """Held-out agreement of the reward model with the gold ordering of two fresh pi_sft samples per prompt."""
    rng = np.random.default_rng(seed + 4242)
    prompts = task.sample_prompts(rng, num_pairs)
    pair = [_sample(graphdef, sft_params, prompts, jax.random.key(seed + 4242 + i), sampling) for i in range(2)]
    gold = [
        task.gold_reward(prompts["prompt_ids"], prompts["prompt_mask"], p["response_ids"], p["response_mask"])
        for p in pair
    ]
    scores = []
    for p in pair:
        ids = jnp.asarray(np.concatenate([prompts["prompt_ids"], p["response_ids"]], 1))
        mask = jnp.asarray(np.concatenate([prompts["prompt_mask"], p["response_mask"]], 1).astype(np.int32))
        scores.append(
            np.asarray(
                sequence_scores(reward_model, ids, mask, default_positions(mask), jnp.asarray(p["response_mask"]))
            )
        )
    untied = np.abs(gold[0] - gold[1]) > 1e-6
    agree = (scores[0] > scores[1]) == (gold[0] > gold[1])
    return {"heldout_gold_agreement": float(agree[untied].mean())}


@dataclasses.dataclass(frozen=True)
class PPOStart:
    """What every PPO-family method starts from: the earlier stages' models and the evaluation setup."""

    graphdef: Any  # the policy's nnx graph (pi_sft's architecture)
    sft_params: Any  # pi_sft: initial policy and reference
    dpo_params: Any  # pi_dpo: the token reward of the RTO variants
    reward_model: Any  # ScalarHeadModel: reward and the critic's initialization
    reward_mean: float  # score statistics for the normalized reward
    reward_std: float
    sampling: SamplingConfig
    eval_prompts: dict  # held-out prompts `[N, P]`
    eval_key: jax.Array  # the same sampling key for every method's evaluations
    sft_gold: float  # pi_sft's mean gold reward: the curves' first point


def _train_ppo(name, config, task, start: PPOStart, run_log):
    """One PPO-family method from pi_sft; returns its final params and its (episodes, gold reward) curve."""
    graphdef, sft_params, eval_prompts, sampling = start.graphdef, start.sft_params, start.eval_prompts, start.sampling
    ppo = config.ppo
    iterations = ppo.episodes // ppo.rollout_batch_size
    fn = VARIANTS[name]
    shared = dict(beta_kl=ppo.beta_kl, beta_dpo=ppo.beta_dpo, dpo_clip=ppo.dpo_clip)
    ppo_config = PPOConfig(
        sampling=sampling,
        token_reward=bind(fn, **{k: v for k, v in shared.items() if k in reward_args(fn)}),
        ppo_epochs=ppo.ppo_epochs,
        num_minibatches=ppo.num_minibatches,
        missing_eos_penalty=ppo.missing_eos_penalty,
    )
    reward_graphdef, reward_params = nnx.split(start.reward_model)
    policy = nnx.merge(graphdef, jax.tree.map(jnp.copy, sft_params))
    critic = nnx.merge(reward_graphdef, jax.tree.map(jnp.copy, reward_params))
    available = {"ref": sft_params, "dpo": start.dpo_params}
    state = create_ppo_state(
        policy,
        critic,
        _optimizer(ppo, iterations),
        _optimizer(ppo.critic, iterations),
        frozen={m: available[m] for m in frozen_models(fn)},
        reward_model=start.reward_model if needs_reward_model(fn) else None,
        reward_mean=start.reward_mean,
        reward_std=start.reward_std,
    )
    _, _, iteration = make_ppo_fns(ppo_config)
    prompt_rng = np.random.default_rng(config.seed + 7)  # the same prompt stream for every method
    method_key = jax.random.key(config.seed + 99)
    curve = [(0, start.sft_gold)]
    run_log.truncate(name, 0)
    bar = progress(name, iterations)
    for it in range(iterations):
        prompts = task.sample_prompts(prompt_rng, ppo.rollout_batch_size)
        state, metrics = iteration(
            state,
            {k: jnp.asarray(prompts[k]) for k in ("prompt_ids", "prompt_mask")},
            jax.random.fold_in(method_key, it),
        )
        run_log.log(name, it + 1, metrics)
        bar.update(1)
        if (it + 1) % ppo.eval_every == 0 or it + 1 == iterations:
            gold = evaluate_policy(
                graphdef,
                state.policy.params,
                sft_params,
                eval_prompts,
                start.eval_key,
                sampling,
                gold_fn=task.gold_reward_jax,
            )["gold"]
            curve.append(((it + 1) * ppo.rollout_batch_size, float(gold.mean())))
            run_log.log(name, it + 1, {"gold_reward": gold.mean(), "episodes": curve[-1][0]}, split="eval")
            log.info(
                "%s it %d: gold %.4f reward %.3f kl %.3f len %.1f eos %.2f",
                name,
                it + 1,
                gold.mean(),
                float(metrics["reward/total"]),
                float(metrics["kl_to_ref"]),
                float(metrics["response_length"]),
                float(metrics["eos_rate"]),
            )
    bar.close()
    return state.policy.params, curve


def run_benchmark(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict:
    """`run` for each of `config.seeds` (in workdir/seed_N when there are several), then mean ± s.e. over seeds."""
    workdir = Path(workdir)
    seeds = parse_seeds(config.seeds)

    def single(seed):
        one = config.copy_and_resolve_references()
        with one.unlocked():
            one.seed = seed
        return one

    if len(seeds) == 1:
        return run(single(seeds[0]), workdir)
    per_seed = [run(single(seed), workdir / f"seed_{seed}") for seed in seeds]
    results = aggregate(per_seed)
    write_json_atomic(workdir / "results.json", results)
    table = results_table(results)
    (workdir / "results.md").write_text(table + "\n")
    plot_gold_vs_episodes(results["curves"], workdir / "gold_vs_episodes.png", f"Synthetic task, seeds {seeds}")
    plot_gold_vs_kl(
        results["methods"], results["best_of_n"], workdir / "gold_vs_kl.png", f"Synthetic task, seeds {seeds}"
    )
    print(f"\nMean ± standard error over seeds {seeds}:\n{table}")
    return results


def parse_seeds(value) -> list[int]:
    """'3,4,5' (or one int) -> [3, 4, 5]; a bad value raises ValueError naming `config.seeds`."""
    try:
        seeds = [int(s) for s in str(value).split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"config.seeds: expected comma-separated integers like '3,4,5', got {value!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"config.seeds: expected distinct integers like '3,4,5', got {value!r}")
    return seeds


def aggregate(per_seed: list[dict]) -> dict:
    """Across-seed means, with standard errors across seeds (the honest error bar for a method's mean)."""
    se = lambda xs: float(np.std(xs, ddof=1) / np.sqrt(len(xs))) if len(xs) > 1 else 0.0  # noqa: E731
    methods = {}
    for name in per_seed[0]["methods"]:
        rows = [r["methods"][name] for r in per_seed]
        methods[name] = {key: float(np.mean([row[key] for row in rows])) for key in rows[0]}
        for key in ("gold_reward", "kl", "score"):
            if key in rows[0]:
                methods[name][f"{key}_se"] = se([row[key] for row in rows])
        methods[name]["gold_reward_per_seed"] = [row["gold_reward"] for row in rows]
    curves = {}
    for name in per_seed[0]["curves"]:
        points = np.array([r["curves"][name] for r in per_seed], np.float64)  # [seeds, evals, 2]
        curves[name] = [
            (float(points[0, i, 0]), float(points[:, i, 1].mean()), se(points[:, i, 1])) for i in range(points.shape[1])
        ]
    best_of_n = [
        {
            "n": p["n"],
            "kl": p["kl"],
            "gold_reward": float(np.mean([r["best_of_n"][i]["gold_reward"] for r in per_seed])),
            "gold_reward_se": se([r["best_of_n"][i]["gold_reward"] for r in per_seed]),
        }
        for i, p in enumerate(per_seed[0]["best_of_n"])
    ]
    reach = {}
    for name in per_seed[0].get("episodes_to_ppo_final", {}):
        values = [r["episodes_to_ppo_final"][name] for r in per_seed]
        reach[name] = None if any(v is None for v in values) else float(np.mean(values))
    return {
        "seeds": [r["seed"] for r in per_seed],
        "methods": methods,
        "curves": curves,
        "best_of_n": best_of_n,
        "episodes_to_ppo_final": reach,
        "episodes_to_ppo_final_per_seed": {n: [r["episodes_to_ppo_final"][n] for r in per_seed] for n in reach},
        "per_seed": per_seed,
    }
