"""The offline synthetic benchmark: SFT, DPO, PPO, RTO and RTO's ablations judged by a hidden gold reward.

Presets (`--config=configs/rto_synthetic.py:PRESET`):
  demo (default)  every stage and method, one seed; the default of `make demo` (minutes on 2 CPU cores)
  full            the same hyperparameters on seeds 0, 1, 2 with twice the PPO episodes; mean ± s.e. over seeds
  smoke           seconds: tiny budgets, checks that every output file is produced
  tune            seed 1000, reserved for choosing the shared hyperparameters (never reported)

The shared PPO hyperparameters below were chosen on the tuning seed (1000) for the PPO baseline, then
frozen for every method and seed; see README "Synthetic benchmark".
"""

import ml_collections


def get_config(preset: str = "demo"):
    c = ml_collections.ConfigDict()
    c.benchmark = "synthetic"  # experiments/run.py dispatches on this field
    c.seeds = "0"  # comma-separated seeds ('--config.seeds=3,4,5'); each derives the task, data, init, sampling
    c.temperature = 1.0  # sampling temperature of rollouts, preference samples and evaluation
    c.methods = ["sft", "dpo", "ppo", "rto", "rto_sequence_end", "rto_no_rm"]  # what to train and compare
    # Overrides of rto_jax.data.synthetic.SyntheticTaskConfig (empty: the documented defaults).
    c.task = ml_collections.ConfigDict()

    c.model = ml_collections.ConfigDict()
    c.model.hidden_size = 64  # d_model of the random-init Llama-style decoder
    c.model.intermediate_size = 128  # SwiGLU width
    c.model.num_layers = 2  # decoder blocks
    c.model.num_heads = 4  # attention heads (head_dim = hidden_size / num_heads)

    c.sft = ml_collections.ConfigDict()
    c.sft.num_examples = 20_000  # (prompt, reference response) pairs drawn from the reference source
    c.sft.steps = 600  # optimizer steps
    c.sft.batch_size = 64  # sequences per step
    c.sft.lr = 3e-3  # peak AdamW learning rate
    c.sft.schedule = "cosine"  # after warmup: cosine | linear | constant
    c.sft.warmup_steps = 30  # linear warmup steps

    c.preferences = ml_collections.ConfigDict()
    c.preferences.num_pairs = 4096  # prompts with two pi_sft samples each, labelled by Bradley-Terry on gold

    c.reward_model = ml_collections.ConfigDict()
    c.reward_model.steps = 300  # optimizer steps (backbone initialised from pi_sft)
    c.reward_model.batch_size = 64  # preference pairs per step
    c.reward_model.lr = 1e-3  # peak learning rate
    c.reward_model.schedule = "cosine"  # after warmup
    c.reward_model.warmup_steps = 20  # linear warmup steps

    c.dpo = ml_collections.ConfigDict()
    c.dpo.steps = 300  # optimizer steps on the same preferences
    c.dpo.batch_size = 64  # preference pairs per step
    c.dpo.lr = 1e-4  # peak learning rate (tuned on seed 1000 for DPO: 3e-5, 1e-4, 3e-4)
    c.dpo.schedule = "cosine"  # after warmup
    c.dpo.warmup_steps = 20  # linear warmup steps
    c.dpo.beta = 0.1  # DPO beta (docs/DESIGN.md default)

    c.ppo = ml_collections.ConfigDict()  # shared by ppo, rto and the ablations; only reward shaping differs
    c.ppo.episodes = 6400  # prompts rolled out per method (the budget)
    c.ppo.rollout_batch_size = 64  # prompts per PPO iteration
    c.ppo.lr = 3e-4  # policy learning rate (tuned on seed 1000 for PPO: 3e-5, 1e-4, 3e-4)
    c.ppo.schedule = "constant"  # policy schedule after warmup
    c.ppo.warmup_steps = 0  # policy warmup iterations
    c.ppo.beta_kl = 0.2  # KL penalty per token (tuned on seed 1000 for PPO: 0.01, 0.05, 0.2)
    c.ppo.beta_dpo = 0.05  # RTO's DPO token-reward scale (authors' default; 0 in the ppo method)
    c.ppo.dpo_clip = 0.05  # clip of the scaled DPO token reward (authors' default)
    c.ppo.ppo_epochs = 2  # passes over each rollout batch
    c.ppo.num_minibatches = 2  # minibatches per pass
    c.ppo.missing_eos_penalty = 1.0  # subtracted from the normalized score of responses without EOS
    c.ppo.eval_every = 25  # iterations between gold evaluations (the sample-efficiency curve)
    c.ppo.critic = ml_collections.ConfigDict()
    c.ppo.critic.lr = 1e-3  # critic learning rate (critic initialised from the reward model)
    c.ppo.critic.schedule = "constant"  # critic schedule
    c.ppo.critic.warmup_steps = 0  # critic warmup iterations

    c.eval = ml_collections.ConfigDict()
    c.eval.num_prompts = 512  # held-out prompts (one sample each per method)
    c.eval.best_of_n = 64  # largest n of the best-of-n frontier
    c.eval.best_of_n_prompts = 128  # prompts used for the frontier (n samples each from pi_sft)

    if preset == "demo":
        pass
    elif preset == "full":
        c.seeds = "0,1,2"
        c.ppo.episodes = 12_800
    elif preset == "tune":
        c.seeds = "1000"
    elif preset == "smoke":
        c.sft.num_examples, c.sft.steps, c.sft.batch_size = 512, 5, 16
        c.preferences.num_pairs = 64
        c.reward_model.steps = c.dpo.steps = 3
        c.reward_model.batch_size = c.dpo.batch_size = 16
        c.ppo.episodes, c.ppo.rollout_batch_size, c.ppo.eval_every = 32, 16, 1
        c.eval.num_prompts, c.eval.best_of_n, c.eval.best_of_n_prompts = 32, 4, 8
        c.model.hidden_size, c.model.intermediate_size, c.model.num_heads = 32, 64, 2
    else:
        raise ValueError(f"rto_synthetic.py: unknown preset {preset!r}; presets: demo, full, smoke, tune")
    c.lock()
    return c
