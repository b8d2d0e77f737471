"""PPO baseline on TL;DR: recipe experiments/ppo.py (PPO's sparse reward; no DPO stage) with the N+ KL of 0.05.

Presets as in rto_tldr.py: 1b (default), 2.8b, 6.9b, tiny, smollm2.
"""

from pathlib import Path

from rto_jax.pipeline.config import config_from_file
from rto_jax.pipeline.recipes import set_recipe


def get_config(preset: str = "1b"):
    c = config_from_file(Path(__file__).with_name("rto_tldr.py"), preset)
    with c.unlocked():
        c.name = f"ppo_tldr_{preset}"
        c.stages = "sft,reward_model,ppo,evaluate"  # no DPO model: PPO's reward does not read one
    set_recipe(c, "experiments/ppo.py")
    c.ppo.reward_args.beta_kl = 0.05  # N+ TL;DR KL coefficient
    return c
