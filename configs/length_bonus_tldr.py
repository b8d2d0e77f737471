# configs/length_bonus_tldr.py
"""A per-token length bonus on top of PPO's reward (experiments/length_bonus.py) on TL;DR."""

from configs import rto_tldr
from rto_jax.pipeline.recipes import set_recipe

PRESETS = rto_tldr.PRESETS


def get_config(preset: str = "1b"):
    c = rto_tldr.get_config(preset)
    set_recipe(c, "experiments/length_bonus.py")  # reward_args {bonus: 0.5, beta_kl: 0.01}; name length_bonus_tldr_*
    c.ppo.reward_args.bonus = 0.25
    c.stages = "sft,reward_model,ppo,evaluate"  # the reward reads no DPO policy: no DPO stage
    return c
