"""The evaluation stage, the judge and the best-of-n frontier: what reads the config and the workdir.

    run_evaluate(config, workdir, task, log, policies=..., reward_path=..., ref_path=...,
                 token_reward=..., models=..., reward=...) -> summary
        every policy on the task's held-out prompts, with the same sampling keys (common random
        numbers): reward-model score, KL to pi_ref, length, EOS rate; win rate against the data's
        reference responses (judge: a reward model); the gold reward, its standard error and the
        gold win rate against SFT when the task has a gold reward (synthetic tasks). Per policy it
        also writes `samples_<policy>.jsonl` (the first `evaluate.num_samples_logged` prompts:
        prompt, response, reference, judge scores, win, score, KL, length, EOS) and
        `tokens_<policy>.html` (those responses with every token coloured by its token reward,
        computed as PPO computes it; rto_jax/eval/token_page.py lays the page out)
    held_out_rows(config, task, graphdef, params, ...)   one sample per held-out prompt and its numbers
    make_judge(path, config)                              a win-rate judge
    run_best_of_n(config, workdir, task, log, sft_path=...)   pi_sft's best-of-n frontier (gold tasks)

The numbers are rto_jax.eval's (sampling and per-row scoring: `rollout_eval.score_rollouts`, one
jitted call per batch; scalar-head scores: `policy_eval.score_arrays`).
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable, Mapping
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from rto_jax.distributed import is_main_process, to_host
from rto_jax.eval import token_page
from rto_jax.eval.policy_eval import SEQUENCE_KEYS, score_arrays, sequences
from rto_jax.eval.rollout_eval import evaluate_policy, mean_and_se, token_reward_parts, win_rate
from rto_jax.objectives.token_rewards import (
    BoundReward,
    bind,
    frozen_models,
    is_untempered,
    needs_gold,
    needs_reward_model,
    ppo,
    reward_args,
    untempered,
)
from rto_jax.pipeline import common
from rto_jax.pipeline import logging as run_logging
from rto_jax.pipeline.config import parse_policies
from rto_jax.pipeline.logging import RunLog, table
from rto_jax.pipeline.workdir import relative_to
from rto_jax.sampling import SamplingConfig

log = logging.getLogger(__name__)


def make_judge(path: str, config) -> Callable[[dict], np.ndarray]:
    """A win-rate judge: SFT-layout arrays -> scores `[N]` (higher is better).

    Today a reward-model folder / hub id. Extension point: any callable with this signature, e.g. an
    LLM judge that decodes prompt and response with the task's tokenizer, asks a model which of two
    summaries is better and returns per-row preference scores.
    """
    model = common.load_model(path, "scalar", config, common.device_mesh(config))
    return lambda arrays: score_arrays(model, arrays, config.evaluate.batch_size)


def held_out_rows(
    config, task, graphdef, params, ref_params=None, reward_model=None, desc: str | None = None
) -> dict[str, np.ndarray]:
    """One sample per held-out prompt and its numbers `[N]`: KL to pi_ref, length, EOS, and the
    reward-model score / gold reward when there are a reward model / gold reward.

    Every caller (the evaluation stage, PPO's gold curve) samples with the same keys: common random
    numbers make policies comparable, and a curve's last point equals the final evaluation.
    desc: a progress bar over the prompt batches with this label (rto_jax.pipeline.logging.progress).
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
        progress=functools.partial(run_logging.progress, desc) if desc else None,
    )


def run_evaluate(
    config,
    workdir,
    task,
    run_log: RunLog,
    *,
    policies: dict[str, str],
    reward_path: str | None,
    ref_path: str | None,
    token_reward=None,
    models: Mapping[str, str | None] | None = None,
    reward: Mapping | None = None,
    policy_rewards: Mapping | None = None,
) -> dict:
    """Every policy on the held-out prompts (see the module docstring); `policies` {name: model path},
    plus those of `config.evaluate.policies`. The gold win rate is against the policy named `sft`.

    For the token pages (`tokens_<policy>.html`), what the recipe gives `run_ppo`:
    token_reward: the recipe's token reward (a function of rto_jax.objectives.token_rewards' signature,
        bound to `config.ppo.reward_args`, or a BoundReward), shown for every policy;
    models: {name: path} of the frozen language models it may read ('ref', 'dpo'; default {'ref': ref_path});
    reward: the reward-model stage's summary (reward_mean, reward_std normalize the score as in PPO);
    policy_rewards: {policy name: token reward} for policies trained with another reward than
        `token_reward` (e.g. the synthetic comparison's methods).
    Without them a page still shows what it can (PPO's reward: the KL penalty and the score).

    Per-policy results are cached in `<workdir>/evaluate/<policy>.json` and per-row numbers in
    `<policy>.rows.npz` (a restart skips evaluated policies). Model paths inside the workdir are
    written relative to it (`model_path`, `judge`), as in done.json: a moved workdir stays readable.
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
    pages = _TokenPages(config, task, token_reward, models, reward, policy_rewards, ref_path, ref_params, reward_model)
    gold_baseline = None
    for name, path in policies.items():
        if name in cached:
            results[name], rows = cached[name]
        else:
            graphdef, params = nnx.split(common.load_model(path, "lm", config, mesh))
            rows = held_out_rows(config, task, graphdef, params, ref_params, reward_model, desc=f"evaluate {name}")
            arrays = sequences(task.eval_prompts, rows["tokens"], rows["response_mask"])
            metrics = {
                "rm_score": float(np.mean(rows["score"])),
                "length": float(np.mean(rows["length"])),
                "eos_rate": float(np.mean(rows["eos"])),
            }
            if ref_params is not None:  # KL(pi || pi_ref) on the samples, both at the sampling temperature
                metrics["kl_to_ref"] = float(np.mean(rows["kl"]))
            count = min(cfg.num_samples_logged, len(rows["tokens"]))
            if references is not None:
                judge_scores = judge(arrays)
                metrics["win_rate"] = win_rate(judge_scores, references)
            else:  # only the logged rows need a judge score
                judge_scores = judge({k: v[:count] for k, v in arrays.items()}) if count else np.zeros(0)
            if "gold" in rows:
                metrics["gold_reward"], metrics["gold_reward_se"] = mean_and_se(rows["gold"])
                if gold_baseline is not None:
                    metrics["gold_win_rate_vs_sft"] = win_rate(rows["gold"], gold_baseline)
            metrics["model_path"] = _in_workdir(path, workdir)
            results[name] = metrics
            run_log.log("evaluate", 0, {k: v for k, v in metrics.items() if isinstance(v, float)}, split=name)
            samples = sample_rows(task, arrays, rows, judge_scores, references, count, kl=ref_params is not None)
            page = pages.render(name, path, graphdef, params, arrays, samples)  # every process: jitted
            if is_main_process():
                np.savez(folder / f"{name}.rows.npz", **{k: v for k, v in rows.items() if k != "tokens"})
                write_jsonl(folder / f"samples_{name}.jsonl", samples)
                if page is not None:
                    (folder / f"tokens_{name}.html").write_text(page, encoding="utf-8")
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
    judge_shown = _in_workdir(judge_path, workdir)
    return {"policies": results, "judge": judge_shown, "num_prompts": len(task.eval_prompts["prompt_ids"])}


def _in_workdir(path: str, workdir) -> str:
    """`path` relative to `workdir` when it lies inside it (hub ids and outside paths as they are)."""
    return relative_to({"model_path": path}, Path(workdir))["model_path"]


def _valid(ids, mask) -> np.ndarray:
    return np.asarray(ids)[np.asarray(mask) > 0]


def sample_rows(task, arrays: dict, rows: dict, judge_scores, references, count: int, kl: bool = True) -> list[dict]:
    """The first `count` evaluated rows as dicts: prompt, response (special tokens kept: EOS shows),
    reference (the data's reference response, None without one), judge_score, reference_judge_score,
    win (1, 0.5 or 0, as `win_rate` counts it), rm_score, kl (the sampled sequence's log-ratio
    log pi/pi_ref; None without a reference policy), length, eos, and gold_reward on gold tasks."""
    p = task.prompt_length
    out = []
    for i in range(count):
        row = {
            "prompt": task.decode(_valid(arrays["input_ids"][i, :p], arrays["attention_mask"][i, :p])),
            "response": task.decode(_valid(arrays["input_ids"][i, p:], arrays["response_mask"][i])),
            "reference": None,
            "judge_score": float(judge_scores[i]),
            "reference_judge_score": None,
            "win": None,
            "rm_score": float(rows["score"][i]) if "score" in rows else None,
            "kl": float(rows["kl"][i]) if kl else None,
            "length": int(rows["length"][i]),
            "eos": bool(rows["eos"][i]),
        }
        if references is not None:
            ref = task.eval_references
            row["reference"] = task.decode(_valid(ref["input_ids"][i, p:], ref["response_mask"][i]))
            row["reference_judge_score"] = float(references[i])
            row["win"] = win_rate(judge_scores[i : i + 1], references[i : i + 1])
        if "gold" in rows:
            row["gold_reward"] = float(rows["gold"][i])
        out.append(row)
    return out


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def _bound(fn, config) -> BoundReward | None:
    """`fn` bound to the coefficients of `config.ppo.reward_args` it takes (a BoundReward as it is)."""
    if fn is None or isinstance(fn, BoundReward):
        return fn
    args = config.ppo.reward_args.to_dict()
    return bind(fn, **{k: v for k, v in args.items() if k in reward_args(fn)})


class _TokenPages:
    """The token pages of one evaluation: which reward each policy gets, and the frozen models it
    reads (loaded once, when first needed)."""

    def __init__(self, config, task, token_reward, models, reward, policy_rewards, ref_path, ref_params, reward_model):
        self.config, self.task = config, task
        self.token_reward = _bound(token_reward, config)
        self.policy_rewards = {k: _bound(v, config) for k, v in (policy_rewards or {}).items()}
        self.paths = {k: v for k, v in {"ref": ref_path, **(models or {})}.items() if v}
        self.params = {}
        if ref_path and ref_params is not None:
            self.params[ref_path] = ref_params
        self.reward = reward
        self.reward_model = reward_model

    def _frozen(self, name: str):
        path = self.paths[name]
        if path not in self.params:
            model = common.load_model(path, "lm", self.config, common.device_mesh(self.config))
            self.params[path] = nnx.split(model)[1]
        return self.params[path]

    def _reward_for(self, policy: str) -> tuple[BoundReward | None, list[str]]:
        """The token reward shown for `policy` and notes on what stands in for what is missing."""
        notes = []
        fn = self.policy_rewards.get(policy) or self.token_reward
        if fn is None:
            notes.append("No token reward was given to the evaluation: PPO's reward (KL penalty, score) is shown.")
        else:
            missing = [m for m in frozen_models(fn) if m not in self.paths]
            if missing:
                notes.append(
                    f"The token reward {fn.name!r} reads the models {missing}, which were not given to the "
                    "evaluation: PPO's reward (KL penalty, score) is shown instead."
                )
                fn = None
        if fn is None:
            fn = _bound(ppo, self.config)
        if "ref" not in self.paths:
            return None, notes
        return fn, notes

    def render(self, policy: str, path: str, graphdef, params, arrays: dict, samples: list[dict]) -> str | None:
        """The page of `policy`'s first len(samples) rows of `arrays`, or None (logged) without a
        reference policy to compute the token reward against."""
        count = len(samples)
        fn, notes = self._reward_for(policy)
        if fn is None:
            log.info("evaluate: no tokens_%s.html (it needs a reference policy: ref_path or models['ref'])", policy)
            return None
        if count == 0:
            return None
        cfg, ppo_cfg = self.config.evaluate, self.config.ppo
        names = sorted(set(frozen_models(fn)) | {"ref"})
        stats = self.reward or {}
        if "reward_mean" not in stats:
            notes.append("No reward-model statistics were given: the score is not normalized (mean 0, std 1).")
        reward_mean, reward_std = float(stats.get("reward_mean", 0.0)), float(stats.get("reward_std", 1.0))
        score_clip = float(ppo_cfg.get("score_clip", 10.0))
        eos_penalty = float(ppo_cfg.get("missing_eos_penalty", 1.0))
        reward_graphdef, reward_params = nnx.split(self.reward_model)
        batch = {k: jnp.asarray(arrays[k][:count]) for k in SEQUENCE_KEYS}
        out = to_host(
            token_reward_parts(
                graphdef,
                params,
                {name: self._frozen(name) for name in names},
                reward_graphdef,
                reward_params,
                *(batch[k] for k in SEQUENCE_KEYS),
                token_reward=fn,
                temperature=float(cfg.temperature),
                eos_id=int(self.task.eos_id),
                reward_mean=reward_mean,
                reward_std=reward_std,
                score_clip=score_clip,
                missing_eos_penalty=eos_penalty,
                gold_credit=self.task.gold_credit if needs_gold(fn) else None,
            )
        )
        p = self.task.prompt_length
        views = []
        for i, row in enumerate(samples):
            valid = np.asarray(arrays["response_mask"][i]) > 0
            ids = np.asarray(arrays["input_ids"][i, p:])[valid]
            logps = {k: np.asarray(v[i], np.float64)[valid] for k, v in out["logps"].items()}
            # As the rewards read them: the policy's ratio at the rollout temperature (the KL term),
            # every other model's at temperature 1 (its own distribution, e.g. DPO's implicit reward).
            ratios = {"policy": (logps["policy"] - logps["ref"]).tolist()}
            ref = logps[untempered("ref")]
            models = [k for k in out["logps"] if k not in ("policy", "ref") and not is_untempered(k)]
            ratios.update({k: (logps[untempered(k)] - ref).tolist() for k in models})
            info = {"judge": row["judge_score"]}
            if row["win"] is not None:
                info.update(reference_judge=row["reference_judge_score"], win=row["win"])
            if "gold_reward" in row:
                info["gold"] = row["gold_reward"]
            views.append(
                token_page.SampleView(
                    prompt=row["prompt"],
                    tokens=token_page.token_strings(ids, self.task.decode),
                    token_ids=ids.tolist(),
                    parts={k: np.asarray(v[i], np.float64)[valid].tolist() for k, v in out["parts"].items()},
                    log_ratios={k: ratios[k] for k in sorted(ratios, key=lambda k: k == "policy")},
                    raw_score=float(out["raw_score"][i]),
                    score=float(out["score"][i]),
                    eos=bool(row["eos"]),
                    info=info,
                )
            )
        parts = list(out["parts"])
        args = dict(fn.args)
        if "dpo" in parts:
            color_by = ["dpo"]
            scale = token_page.default_scale(views, color_by)
            if float(args.get("dpo_clip", 0.0)) > 0:  # saturate at the clip when the values reach it
                scale = min(scale, float(args["dpo_clip"]))
        else:
            color_by = [k for k in parts if k != "score"]
            scale = None
            notes.insert(
                0,
                f"This run's token reward ({fn.name}) has no DPO part (no DPO model): tokens are coloured by the "
                f"sum of its non-score parts ({' + '.join(color_by) or 'none'}); the reward model's score is "
                "shown at the end of each response.",
            )
        meta = {
            "policy": f"{policy}  ({path})",
            "token reward": f"{fn.name}({', '.join(f'{k}={v}' for k, v in sorted(args.items()))})",
            "frozen models": ", ".join(f"{k}: {self.paths[k]}" for k in names),
            "log-probs": f"of the sampled tokens at temperature {cfg.temperature:g} (evaluate.temperature), "
            "as PPO computes them",
            "score": f"reward model {stats.get('model_path', '(the evaluation reward model)')}; for PPO "
            f"(raw - {reward_mean:.4g}) / {reward_std:.4g}, clipped to +-{score_clip:g}, "
            f"minus {eos_penalty:g} without EOS" + ("" if needs_reward_model(fn) else f"; {fn.name} does not read it"),
            "samples": f"the first {count} held-out prompts (evaluate.num_samples_logged)",
        }
        return token_page.render(
            views,
            title=f"Token rewards of {policy}'s samples ({fn.name})",
            color_by=color_by,
            scale=scale,
            meta=meta,
            notes=notes,
            eos_id=int(self.task.eos_id),
            score_unused=not needs_reward_model(fn),
        )


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
