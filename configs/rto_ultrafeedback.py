"""RTO on UltraFeedback (chat): SFT checkpoint given, reward model, DPO and RTO trained on
HuggingFaceH4/ultrafeedback_binarized.

Presets:
  llama3_8b (default)  the RTO paper's chat setting as we understand it (OpenRLHF recipe, best knowledge,
                       not verified against the paper's code): SFT = OpenRLHF/Llama-3-8b-sft-mixture,
                       P = 1024, R = 1024, RM lr 9e-6 batch 256, DPO beta 0.1 lr 5e-7 batch 256,
                       PPO rollout 1024, lr 5e-7 (actor) / 9e-6 (critic), fixed KL 0.01.
  smollm2              the same on SmolLM2-135M-Instruct with short lengths (a cheap real-model run).
  tiny                 random-init model and the offline HH-RLHF dialogue sample (no UltraFeedback sample
                       is stored offline); SFT on the chosen responses. A local UltraFeedback file plugs in
                       with --config.data.preference.path=FILE --config.data.preference.format=ultrafeedback
                       (the tiny BPE carries a chat template).
"""

from rto_jax.pipeline.config import apply_tiny, base_config, shared_data_dir

PRESETS = ("llama3_8b", "smollm2", "tiny")  # the first: default


def ultrafeedback_data(c):
    c.data.sft.path = ""  # SFT on the chosen responses of the preference data (used only if sft is trained)
    c.data.preference.path = "HuggingFaceH4/ultrafeedback_binarized"  # chat message lists
    c.data.preference.format = "ultrafeedback"
    c.data.preference.split = "train_prefs"
    c.data.preference.eval_path = "HuggingFaceH4/ultrafeedback_binarized"
    c.data.preference.eval_split = "test_prefs"
    c.data.prompt_truncation = "left"  # keep the end of the chat (the generation prompt)
    return c


def get_config(preset: str = "llama3_8b"):
    c = base_config()
    c.name = f"rto_ultrafeedback_{preset}"
    if preset == "tiny":
        apply_tiny(c)
        c.data.sft.path = ""  # SFT on the chosen responses
        c.data.preference.path = str(shared_data_dir() / "hh_rlhf_harmless_test.jsonl.gz")
        c.data.preference.format = "hh_rlhf"
        c.data.preference.max_rows = 1200
        c.data.prompt_truncation = "left"
    elif preset in ("llama3_8b", "smollm2"):
        ultrafeedback_data(c)
        c.stages = "reward_model,dpo,ppo,evaluate"  # the SFT model is given
        c.model.dtype = "bfloat16"
        if preset == "llama3_8b":
            c.sft.init_from = "OpenRLHF/Llama-3-8b-sft-mixture"
            c.data.max_prompt_len, c.data.max_response_len = 1024, 1024
            c.reward_model.batch_size, c.reward_model.lr = 256, 9e-6
            c.dpo.batch_size, c.dpo.lr = 256, 5e-7
            c.ppo.rollout_batch_size, c.ppo.num_minibatches = 1024, 8
            c.ppo.lr, c.ppo.critic_lr = 5e-7, 9e-6
            c.ppo.total_episodes = 100_000
            c.ppo.ppo_epochs = 1
        else:
            c.sft.init_from = "HuggingFaceTB/SmolLM2-135M-Instruct"
            c.data.max_prompt_len, c.data.max_response_len = 256, 128
            c.reward_model.batch_size = c.dpo.batch_size = 32
            c.ppo.rollout_batch_size, c.ppo.num_minibatches, c.ppo.total_episodes = 64, 4, 6400
        c.ppo.temperature = 1.0
        c.ppo.missing_eos_penalty = 0.0
        c.checkpoint.every_steps = 50
    else:
        raise ValueError(f"rto_ultrafeedback.py: unknown preset {preset!r}; presets: {', '.join(PRESETS)}")
    c.lock()
    return c
