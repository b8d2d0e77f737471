"""RTO on a text task (TL;DR, HH-RLHF, UltraFeedback): SFT -> reward model -> DPO -> PPO with RTO's
dense token reward -> evaluation of every policy.

To try another token reward, copy this file, write the reward below (a pure function of the
per-token log-probs of named models, the reward model's score and the mask; see
rto_jax/objectives/token_rewards.py), set TOKEN_REWARD to it and point a config at the copy:
`recipes.set_recipe(config, "experiments/my_reward.py")`. Nothing under rto_jax/ changes.
"""

from rto_jax.objectives.token_rewards import rto
from rto_jax.pipeline import Pipeline, model_path, stages

# r_h = clip(beta_dpo * log pi_dpo/pi_ref) - beta_kl * log pi/pi_ref + beta_rm * [h = H] * score
TOKEN_REWARD = rto


def run(pipeline: Pipeline, token_reward=TOKEN_REWARD) -> dict:
    sft = pipeline.stage("sft", stages.run_sft)
    reward_model = pipeline.stage("reward_model", stages.run_reward_model, sft_path=model_path(sft))
    dpo = pipeline.stage("dpo", stages.run_dpo, sft_path=model_path(sft))
    # The frozen models offered to the reward; the PPO stage loads only those it reads (token_reward.uses).
    models = {"ref": model_path(sft), "dpo": model_path(dpo)}
    # A method's own PPO settings (recipes.method: an estimator, an online PRM) apply to this run.
    policy, _ = pipeline.ppo("ppo", token_reward, models=models, reward=reward_model)
    policies = {"sft": sft, "dpo": dpo, token_reward.__name__: policy}
    evaluation = pipeline.stage(
        "evaluate",
        stages.run_evaluate,
        policies={name: model_path(r) for name, r in policies.items() if r is not None},
        reward_path=model_path(reward_model),
        ref_path=model_path(sft),
        # What PPO was given: the token pages (evaluate/tokens_<policy>.html) show its reward per token.
        token_reward=token_reward,
        models=models,
        reward=reward_model,
    )
    return pipeline.results(evaluation)
