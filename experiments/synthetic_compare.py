"""The synthetic comparison (`make demo`): SFT, DPO, PPO, RTO, RTO's two ablations, the critic-free
RLOO with PPO's and with RTO's reward, and RTO-RLOO with an online implicit PRM (the DPO policy
trained during PPO, experiments/rto_online_prm.py), all from one SFT policy, reward model and DPO
policy, judged by the synthetic task's hidden gold reward.

Every PPO-family method is the same PPO stage given another token reward, with the same prompts,
episodes and shared hyperparameters; `config.ppo.reward_args` are shared and each reward takes the
coefficients it has; `config.ppo.per_method` gives a method its own lr and coefficients (the values
each method's tuning chose, experiments/synthetic_tune.py). Writes results.json (`methods`, `curves`, `best_of_n`,
`episodes_to_ppo_final`, ...), results.md, gold_vs_episodes.png and gold_vs_kl.png; with several
seeds (`--config.seeds=0,1,2`) `aggregate` writes the same across seeds (mean ± standard error).
"""

from pathlib import Path

from experiments.rto_online_prm import TOKEN_REWARD as rto_online_prm
from rto_jax.distributed import is_main_process
from rto_jax.eval import plots, report
from rto_jax.objectives.token_rewards import bind, ppo, rto, rto_no_rm, rto_sequence_end
from rto_jax.pipeline import Pipeline, model_path, stages
from rto_jax.pipeline.config import parse_per_method
from rto_jax.pipeline.evaluate import run_best_of_n
from rto_jax.pipeline.logging import read_metrics, write_json_atomic
from rto_jax.pipeline.recipes import method
from rto_jax.pipeline.tasks import with_preferences

# PPO's and RTO's rewards without a critic: RLOO over 4 responses per prompt (the same episodes).
rloo = method(ppo, "rloo", estimator="rloo", samples_per_prompt=4)
rto_rloo = method(rto, "rto_rloo", estimator="rloo", samples_per_prompt=4)
# RTO-RLOO whose DPO policy keeps training during PPO (PRIME's online implicit PRM): against rto_rloo,
# what following the policy's distribution does to the dense reward.
METHODS = (ppo, rto, rto_sequence_end, rto_no_rm, rloo, rto_rloo, rto_online_prm)
TOKEN_REWARD = rto  # the coefficients `config.ppo.reward_args` may hold (RTO takes all of them)


def shared_models(pipeline: Pipeline) -> tuple[dict, dict, dict, dict]:
    """The stages every PPO-family method starts from: SFT, its labelled pairs, the reward model and
    DPO (summaries, in that order); the pairs are attached to `pipeline.task`."""
    config = pipeline.config
    sft = pipeline.stage("sft", stages.run_sft)
    pairs = pipeline.stage("preferences", stages.run_preferences, sft_path=model_path(sft))
    pipeline.task = with_preferences(pipeline.task, pairs["path"], config.data.eval_size, config.seed)
    reward_model = pipeline.stage("reward_model", stages.run_reward_model, sft_path=model_path(sft))
    dpo = pipeline.stage("dpo", stages.run_dpo, sft_path=model_path(sft))
    return sft, pairs, reward_model, dpo


def run(pipeline: Pipeline) -> dict:
    config = pipeline.config
    sft, pairs, reward_model, dpo = shared_models(pipeline)

    per_method = parse_per_method(config.ppo.per_method)
    models = {"ref": model_path(sft), "dpo": model_path(dpo)}
    policies, stage_of, rewards = {"sft": model_path(sft), "dpo": model_path(dpo)}, {}, {}
    for fn in METHODS:
        name = stage_of[fn.__name__] = f"ppo_{fn.__name__}"
        result, args = pipeline.ppo(
            name, fn, models=models, reward=reward_model, values=per_method.get(fn.__name__, {})
        )
        policies[fn.__name__] = model_path(result)
        rewards[fn.__name__] = bind(fn, **args)

    evaluation = pipeline.stage(
        "evaluate",
        stages.run_evaluate,
        policies=policies,
        reward_path=model_path(reward_model),
        ref_path=model_path(sft),
        # The token pages (evaluate/tokens_<policy>.html): each method's policy with the reward it was
        # trained with, SFT and DPO with RTO's.
        token_reward=TOKEN_REWARD,
        policy_rewards=rewards,
        models=models,
        reward=reward_model,
    )
    if evaluation is None:  # evaluation not among config.stages
        return pipeline.results()
    frontier = pipeline.stage("best_of_n", run_best_of_n, section="evaluate", sft_path=model_path(sft))
    methods = report.methods(evaluation["policies"])
    records = read_metrics(pipeline.workdir / "metrics.jsonl")
    curves = report.gold_curves(records, stage_of, config.ppo.rollout_batch_size, methods["sft"]["gold_reward"])
    results = pipeline.results(
        evaluation,
        methods=methods,
        curves=curves,
        best_of_n=frontier["best_of_n"],
        episodes_to_ppo_final=report.episodes_to_final(curves),
        labels={"temperature": pairs["label_temperature"], "agreement": pairs["label_agreement"]},
    )
    _write_report(results, pipeline.workdir, f"Synthetic task, seed {config.seed}")  # results.json: pipeline.results
    return results


def aggregate(per_seed: list[dict], workdir: Path) -> dict:
    """Means over the seeds' results with standard errors across seeds; the same files as one seed."""
    results = report.aggregate(per_seed)
    if is_main_process():
        write_json_atomic(workdir / "results.json", results)
    _write_report(results, workdir, f"Synthetic task, seeds {results['seeds']}")
    return results


def _write_report(results: dict, workdir: Path, title: str) -> None:
    """results.md and the two plots."""
    if not is_main_process():
        return
    table = report.results_table(results)
    (workdir / "results.md").write_text(table + "\n")
    plots.plot_gold_vs_episodes(results["curves"], workdir / "gold_vs_episodes.png", title)
    plots.plot_gold_vs_kl(results["methods"], results["best_of_n"], workdir / "gold_vs_kl.png", title)
    print(f"\n{title}\n{table}")
