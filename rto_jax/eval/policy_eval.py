"""The evaluation stage and the scoring it shares with the reward-model stage.

    run_evaluate(config, workdir, task, log, policies=..., reward_path=..., ref_path=...) -> summary
        every policy on the task's held-out prompts, with the same sampling keys (common random
        numbers): reward-model score, KL to pi_ref, length, EOS rate; win rate against the data's
        reference responses (judge: a reward model); the gold reward, its standard error and the
        gold win rate against SFT when the task has a gold reward (synthetic tasks)
    score_arrays(model, arrays, batch_size) -> [N]   a scalar-head model's scores of SFT-layout rows
    reward_accuracy(model, preference, batch_size)    a reward model's held-out preference accuracy
    sample_responses(...)                             one sample per prompt, SFT-layout arrays

Sampling and per-row scoring are `rollout_eval.score_rollouts` (one jitted call per batch).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rto_jax.data import pad_batch
from rto_jax.distributed import is_main_process, to_host
from rto_jax.eval.rollout_eval import evaluate_policy, mean_and_se, win_rate
from rto_jax.pipeline import common
from rto_jax.pipeline.config import parse_policies
from rto_jax.pipeline.logging import RunLog, table
from rto_jax.sampling import SamplingConfig, generate_jit, response_inputs
from rto_jax.scoring import sequence_scores

SEQUENCE_KEYS = ("input_ids", "attention_mask", "positions", "response_mask")


def fixed_size_batches(arrays: dict, batch_size: int):
    """Batches of `batch_size` rows over all of `arrays` (the last one padded by repeating a row), with
    their valid row counts: one compiled shape."""
    n = len(next(iter(arrays.values())))
    for start in range(0, n, batch_size):
        yield pad_batch({k: v[start : start + batch_size] for k, v in arrays.items()}, batch_size)


def weighted_mean(values: list[tuple[dict, int]]) -> dict[str, float]:
    """Row-weighted mean of per-batch metric dicts `[(metrics, rows), ...]`."""
    values = [(to_host(m), n) for m, n in values]
    total = sum(n for _, n in values)
    return {k: float(sum(float(m[k]) * n for m, n in values) / total) for k in values[0][0]}


@functools.partial(jax.jit, static_argnums=0)
def _scores(graphdef, params, input_ids, attention_mask, positions, response_mask):
    return sequence_scores(nnx.merge(graphdef, params), input_ids, attention_mask, positions, response_mask)


def score_arrays(model, arrays: dict, batch_size: int, prefix: str = "") -> np.ndarray:
    """Scalar-head scores `[N]` of SFT-layout arrays (or of the `prefix`-ed keys of preference arrays)."""
    graphdef, params = nnx.split(model)
    out = []
    for batch, n in fixed_size_batches({k: arrays[prefix + k] for k in SEQUENCE_KEYS}, batch_size):
        out.append(to_host(_scores(graphdef, params, *(batch[k] for k in SEQUENCE_KEYS)))[:n])
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
    """One sample per prompt row: SFT-layout arrays (input_ids, attention_mask, positions, response_mask)."""
    parts = []
    for i, (batch, n) in enumerate(fixed_size_batches(prompts, batch_size)):
        ids, mask = jnp.asarray(batch["prompt_ids"]), jnp.asarray(batch["prompt_mask"])
        samples = generate_jit(graphdef, params, ids, mask, jax.random.fold_in(rng, i), sampling)
        input_ids, attention_mask, positions = response_inputs(ids, mask, samples)
        rows = dict(
            input_ids=input_ids, attention_mask=attention_mask, positions=positions, response_mask=samples.response_mask
        )
        parts.append({k: v[:n] for k, v in to_host(rows).items()})
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def sequences(prompts: dict, response_ids, response_mask) -> dict:
    """SFT-layout arrays of prompts `[N, P]` and responses `[N, R]` (host numpy)."""
    attention_mask = np.concatenate([prompts["prompt_mask"], response_mask], axis=1).astype(np.int32)
    return {
        "input_ids": np.concatenate([prompts["prompt_ids"], response_ids], axis=1).astype(np.int32),
        "attention_mask": attention_mask,
        "positions": np.maximum(np.cumsum(attention_mask, axis=1) - 1, 0).astype(np.int32),
        "response_mask": np.asarray(response_mask, np.float32),
    }


def make_judge(path: str, config) -> Callable[[dict], np.ndarray]:
    """A win-rate judge: SFT-layout arrays -> scores `[N]` (higher is better).

    Today a reward-model folder / hub id. Extension point: any callable with this signature, e.g. an
    LLM judge that decodes prompt and response with the task's tokenizer, asks a model which of two
    summaries is better and returns per-row preference scores.
    """
    model = common.load_model(path, "scalar", config, common.device_mesh(config))
    return lambda arrays: score_arrays(model, arrays, config.evaluate.batch_size)


def held_out_rows(config, task, graphdef, params, ref_params=None, reward_model=None) -> dict[str, np.ndarray]:
    """One sample per held-out prompt and its numbers `[N]`: KL to pi_ref, length, EOS, and the
    reward-model score / gold reward when there are a reward model / gold reward.

    Every caller (the evaluation stage, PPO's gold curve) samples with the same keys: common random
    numbers make policies comparable, and a curve's last point equals the final evaluation.
    """
    cfg = config.evaluate
    reward_graphdef, reward_params = nnx.split(reward_model) if reward_model is not None else (None, None)
    sampling = SamplingConfig(
        task.response_length, task.eos_id, task.pad_id, temperature=cfg.temperature, greedy=cfg.greedy
    )
    return evaluate_policy(
        graphdef,
        params,
        ref_params if ref_params is not None else params,
        task.eval_prompts,
        common.stage_key(config.seed, "evaluate"),
        sampling,
        reward_graphdef=reward_graphdef,
        reward_params=reward_params,
        gold_fn=task.gold_reward,
        batch_size=cfg.batch_size,
    )


def run_evaluate(
    config, workdir, task, run_log: RunLog, *, policies: dict[str, str], reward_path: str | None, ref_path: str | None
) -> dict:
    """Every policy on the held-out prompts (see the module docstring); `policies` {name: model path},
    plus those of `config.evaluate.policies`. The gold win rate is against the policy named `sft`.

    Per-policy results are cached in `<workdir>/evaluate/<policy>.json` and per-row numbers in
    `<policy>.rows.npz` (a restart skips evaluated policies).
    """
    cfg = config.evaluate
    policies = {**policies, **parse_policies(cfg.policies)}
    policies = dict(sorted(policies.items(), key=lambda kv: kv[0] != "sft"))  # SFT first: the gold baseline
    folder = common.stage_dir(workdir, "evaluate")
    judge_path = cfg.judge or reward_path
    mesh = common.device_mesh(config)
    reward_model = common.load_model(reward_path or judge_path, "scalar", config, mesh)
    judge = make_judge(judge_path, config)
    ref_params = nnx.split(common.load_model(ref_path, "lm", config, mesh))[1] if ref_path else None
    results: dict[str, dict] = {}
    # Read before evaluating anything (a lagging process must not see caches written meanwhile).
    cached = {
        name: (json.loads((folder / f"{name}.json").read_text()), dict(np.load(folder / f"{name}.rows.npz")))
        for name in policies
        if (folder / f"{name}.json").exists() and (folder / f"{name}.rows.npz").exists()
    }
    references = None
    if task.eval_references is not None:
        references = judge(task.eval_references)
        mask = task.eval_references["response_mask"]
        tokens = task.eval_references["input_ids"][:, -task.response_length :]
        results["reference"] = {
            "rm_score": float(np.mean(score_arrays(reward_model, task.eval_references, cfg.batch_size))),
            "length": float(np.mean(mask.sum(1))),
            "eos_rate": float(np.mean(np.any((tokens == task.eos_id) & (mask > 0), axis=1))),
            "win_rate": 0.5,
        }
    gold_baseline = None
    for name, path in policies.items():
        if name in cached:
            results[name], rows = cached[name]
        else:
            graphdef, params = nnx.split(common.load_model(path, "lm", config, mesh))
            rows = held_out_rows(config, task, graphdef, params, ref_params, reward_model)
            arrays = sequences(task.eval_prompts, rows["tokens"], rows["response_mask"])
            metrics = {
                "rm_score": float(np.mean(rows["score"])),
                "length": float(np.mean(rows["length"])),
                "eos_rate": float(np.mean(rows["eos"])),
            }
            if ref_params is not None:  # KL(pi || pi_ref) on the samples, both at the sampling temperature
                metrics["kl_to_ref"] = float(np.mean(rows["kl"]))
            if references is not None:
                metrics["win_rate"] = win_rate(judge(arrays), references)
            if "gold" in rows:
                metrics["gold_reward"], metrics["gold_reward_se"] = mean_and_se(rows["gold"])
                if gold_baseline is not None:
                    metrics["gold_win_rate_vs_sft"] = win_rate(rows["gold"], gold_baseline)
            metrics["model_path"] = path
            results[name] = metrics
            run_log.log("evaluate", 0, {k: v for k, v in metrics.items() if isinstance(v, float)}, split=name)
            if is_main_process():
                np.savez(folder / f"{name}.rows.npz", **{k: v for k, v in rows.items() if k != "tokens"})
                _write_samples(folder / f"samples_{name}.jsonl", task, arrays, cfg.num_samples_logged)
            common.write_json(folder / f"{name}.json", metrics)
        if name == "sft" and "gold" in rows:
            gold_baseline = rows["gold"]
            results[name]["gold_win_rate_vs_sft"] = 0.5
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


def run_best_of_n(config, workdir, task, run_log: RunLog, *, sft_path: str) -> dict:
    """The best-of-n frontier of pi_sft under the gold reward: n samples for each of the first
    `synthetic.best_of_n_prompts` held-out prompts; {"best_of_n": [{n, kl, gold_reward, gold_reward_se}]}
    with the analytic KL of best-of-n, log n - (n-1)/n."""
    from rto_jax.data.synthetic import best_of_n_frontier

    del workdir, run_log
    if task.gold_reward is None:
        raise ValueError(f"task {task.name!r} has no gold reward: no best-of-n frontier")
    n_max, count = config.synthetic.best_of_n, config.synthetic.best_of_n_prompts
    prompts = {k: np.repeat(v[:count], n_max, axis=0) for k, v in task.eval_prompts.items()}
    graphdef, params = nnx.split(common.load_model(sft_path, "lm", config, common.device_mesh(config)))
    sampling = SamplingConfig(task.response_length, task.eos_id, task.pad_id, temperature=config.evaluate.temperature)
    rows = evaluate_policy(
        graphdef,
        params,
        params,
        prompts,
        common.stage_key(config.seed, "best_of_n"),
        sampling,
        gold_fn=task.gold_reward,
        batch_size=max(config.evaluate.batch_size, 256),
    )
    frontier = best_of_n_frontier(rows["gold"].reshape(-1, n_max))
    return {
        "best_of_n": [
            {"n": int(n), "kl": float(k), "gold_reward": float(m), "gold_reward_se": float(s)}
            for n, k, m, s in zip(frontier["n"], frontier["kl"], frontier["mean"], frontier["stderr"])
        ]
    }
