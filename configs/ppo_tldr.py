"""PPO baseline on TL;DR: recipe experiments/ppo.py (PPO's sparse reward; no DPO stage) with the N+ KL of 0.05.

Presets as in rto_tldr.py: 1b (default), 2.8b, 6.9b, tiny.
"""

import importlib.util
import os

from rto_jax.pipeline.recipes import set_recipe


def _rto_tldr():
    # config_flags loads configs by path; load the sibling file the same way (no package needed).
    spec = importlib.util.spec_from_file_location(
        "rto_tldr_config", os.path.join(os.path.dirname(__file__), "rto_tldr.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def get_config(preset: str = "1b"):
    c = _rto_tldr().get_config(preset)
    with c.unlocked():
        c.name = f"ppo_tldr_{preset}"
        c.stages = "sft,reward_model,ppo,evaluate"  # no DPO model: PPO's reward does not read one
    set_recipe(c, "experiments/ppo.py")
    c.ppo.reward_args.beta_kl = 0.05  # N+ TL;DR KL coefficient
    return c
