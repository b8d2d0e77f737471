"""DPO baseline on TL;DR: SFT, then DPO from it; a reward model is trained too, as the evaluation judge.

Presets as in rto_tldr.py: 1b (default), 2.8b, 6.9b, tiny, smollm2.
"""

from configs import rto_tldr

PRESETS = rto_tldr.PRESETS


def get_config(preset: str = "1b"):
    c = rto_tldr.get_config(preset)
    with c.unlocked():
        c.name = f"dpo_tldr_{preset}"
        c.stages = "sft,reward_model,dpo,evaluate"  # the reward model only judges the evaluation
        c.dpo.beta = 0.05 if preset != "tiny" else 0.1  # N+ DPO on TL;DR uses beta 0.05
    return c
