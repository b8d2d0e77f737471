"""RTO (experiments/rto.py) on Reddit TL;DR with GRPO's critic-free advantages in place of GAE's.

Each prompt is answered 4 times in a rollout; a response's return-to-go is compared with its group's
mean whole return, in units of the group's standard deviation (Shao et al. 2024, DeepSeekMath;
rto_jax/objectives/advantages.py), so PPO trains no critic: none is loaded, checkpointed or exported.
RTO's dense token reward is unchanged: its KL penalty stays in the reward (GRPO's paper puts the KL in
the loss instead). Presets: those of configs/rto_tldr.py, with only the deviations below.
"""

from configs import rto_tldr

PRESETS = rto_tldr.PRESETS


def get_config(preset: str = "1b"):
    c = rto_tldr.get_config(preset)
    c.name = f"rto_grpo_tldr_{preset}"  # the same recipe (rto.py) as rto_tldr: set_recipe would not rename it
    c.ppo.estimator = "grpo"  # the group-normalized baseline instead of the critic
    # A group of 4 responses per prompt: as configs/rto_rloo_tldr.py, so the two compare on equal rollouts.
    # rollout_batch_size counts responses and is kept: each iteration samples and trains on as many
    # tokens as rto_tldr's, from a quarter of the prompts.
    c.ppo.samples_per_prompt = 4
    return c
