"""PPO baseline on TL;DR: recipe experiments/ppo.py (PPO's sparse reward; no DPO stage) with the N+ KL of 0.05.

Presets as in rto_tldr.py: 1b (default), 2.8b, 6.9b, tiny, smollm2.
"""

from configs import rto_tldr
from rto_jax.pipeline.recipes import set_recipe

PRESETS = rto_tldr.PRESETS


def get_config(preset: str = "1b"):
    c = rto_tldr.get_config(preset)
    set_recipe(c, "experiments/ppo.py")  # renames the run rto_tldr_<preset> -> ppo_tldr_<preset>
    with c.unlocked():
        c.stages = "sft,reward_model,ppo,evaluate"  # no DPO model: PPO's reward does not read one
    c.ppo.reward_args.beta_kl = 0.05  # N+ TL;DR KL coefficient
    return c
