"""The offline synthetic comparison: SFT, DPO, PPO, RTO and RTO's ablations judged by a hidden gold reward.

Recipe experiments/synthetic_compare.py on `data.source = 'synthetic'` (rto_jax/data/synthetic.py).
Presets (`--config=configs/rto_synthetic.py:PRESET`):
  demo (default)  every stage and method, one seed; the default of `make demo` (minutes on 2 CPU cores)
  full            the same hyperparameters on seeds 0, 1, 2 with twice the PPO episodes; mean ± s.e. over seeds
  smoke           seconds: tiny budgets, checks that every output file is produced
  tune            seed 1000, reserved for choosing the shared hyperparameters (never reported)
  tune_methods    seed 1000: the same number of PPO-stage runs for PPO and for RTO over each one's own
                  knobs (experiments/synthetic_tune.py); prints the per_method values to freeze
  tuned           the frozen per-method values of tune_methods on seeds 1, 2, 3 (never used for tuning)
  study           when does RTO help: PPO, RTO and two gold-reward positive controls with the tuned
                  values over horizons 8 / 32 / 96, DPO trained on 1024 / 4096 / 16384 pairs, three
                  KL coefficients, RTO's beta_dpo 0.2 / 0.5 unclipped and RLOO / RTO-RLOO at horizon 8,
                  seeds 1-5, resumable across sessions (experiments/synthetic_study.py;
                  docs/results/synthetic_study.md)
  study_smoke     the study's every cell and output in about a minute (tiny budgets, 2 seeds)
Seeds: `--config.seeds=3,4,5`.

Every value below is a deviation from rto_jax/pipeline/config.py:base_config (the N+ TL;DR recipe)
and says why. The shared PPO hyperparameters were chosen on the tuning seed (1000) for the PPO
baseline, then frozen for every method and seed; see docs/results/synthetic.md#how-the-hyperparameters-were-chosen.
"""

from ml_collections import config_dict

from rto_jax.pipeline.config import base_config
from rto_jax.pipeline.recipes import set_recipe


PRESETS = ("demo", "full", "smoke", "tune", "tune_methods", "tuned", "study", "study_smoke")  # the first: default

# Each method's best point of `tune_methods` (seed 1000), frozen for the `tuned` preset.
TUNED = "ppo:beta_kl=0.05,lr=0.0003;rto:beta_dpo=0.05,dpo_clip=0.2,beta_kl=0.05"
# The critic-free rows' best points of tune_methods (seed 1000, 2026-12-06), the same 8-run budget;
# rto_online_prm's 8 runs over beta_dpo x prm_lr at rto_rloo's dpo_clip and beta_kl, "group" labels.
TUNED_RLOO = "rloo:beta_kl=0.05,lr=0.0003;rto_rloo:beta_dpo=0.05,dpo_clip=0.05,beta_kl=0.05"
TUNED_CRITIC_FREE = TUNED_RLOO + ";rto_online_prm:beta_dpo=0.2,prm_lr=3e-05,dpo_clip=0.05,beta_kl=0.05"


def _toy_sizes(c) -> None:
    """Seconds of work (mostly compilation) for the smoke presets: tiny data, model and budgets."""
    c.synthetic.sft_examples, c.synthetic.sft_eval_examples = 512, 32  # a few SFT batches
    c.sft.batch_size, c.sft.max_steps = 16, 5  # 5 steps
    c.data.eval_size = 16  # held-out preference pairs
    for stage in ("reward_model", "dpo"):
        c[stage].batch_size, c[stage].max_steps = 16, 3  # 3 steps
    c.dpo.lr, c.dpo.warmup_steps = 3e-3, 0  # a few steps must move pi_dpo off pi_sft (a visible DPO reward)
    c.ppo.rollout_batch_size, c.ppo.eval_every = 16, 1  # a gold-reward point every iteration
    c.evaluate.num_prompts, c.evaluate.batch_size = 32, 32  # one batch
    c.synthetic.best_of_n, c.synthetic.best_of_n_prompts = 4, 8  # a short frontier
    c.model.hidden_size, c.model.intermediate_size, c.model.num_heads, c.model.num_kv_heads = 32, 64, 2, 2  # d = 32
    c.checkpoint.every_steps = 2  # checkpoints written (and restored on restart)


def get_config(preset: str = "demo"):
    c = base_config()
    set_recipe(c, "experiments/synthetic_compare.py")
    c.name = f"rto_synthetic_{preset}"
    c.stages = "sft,preferences,reward_model,dpo,ppo,evaluate"  # preferences: pi_sft pairs labelled by gold
    c.data.source = "synthetic"  # token ids and a gold reward; no tokenizer, no files
    c.data.max_prompt_len = c.synthetic.task.prompt_length  # fixed by the task (6)
    c.data.max_response_len = c.synthetic.task.max_response_length  # fixed by the task (24)
    c.data.eval_size = 256  # held-out preference pairs (reward-model accuracy, DPO metrics)

    # A model sized for a 38-token language on 2 CPU cores (random init, Llama-style).
    c.model.hidden_size, c.model.intermediate_size, c.model.num_layers = 64, 128, 2  # small task, fast CPU steps
    c.model.num_heads, c.model.num_kv_heads, c.model.head_dim = 4, 4, 16  # d = 64 = 4 x 16
    c.model.max_position_embeddings = 64  # P + R = 30
    c.model.tie_word_embeddings = True  # a 38-token vocabulary: one embedding table is plenty

    # A random-init model learns fast: larger learning rates and more epochs than a pretrained 1B.
    c.sft.batch_size, c.sft.num_epochs, c.sft.max_steps = 64, 2, 600  # 600 steps over 20k pairs
    c.sft.lr, c.sft.warmup_steps = 3e-3, 30  # from scratch
    c.reward_model.batch_size, c.reward_model.num_epochs, c.reward_model.max_steps = 64, 5, 300  # ~3.8k pairs
    c.reward_model.lr, c.reward_model.warmup_steps = 1e-3, 20  # tuned on seed 1000
    c.reward_model.normalize_on = "sft_samples"  # the score is normalized where PPO starts: pi_sft's samples
    c.dpo.batch_size, c.dpo.num_epochs, c.dpo.max_steps = 64, 5, 300  # the same pairs as the reward model
    c.dpo.lr, c.dpo.warmup_steps = 1e-4, 20  # tuned on seed 1000 for DPO: 3e-5, 1e-4, 3e-4

    # PPO: the budget and the shared hyperparameters of every PPO-family method.
    c.ppo.rollout_batch_size, c.ppo.total_episodes = 64, 6400  # the budget: 100 iterations of 64 prompts
    c.ppo.lr, c.ppo.schedule = 3e-4, "constant"  # tuned on seed 1000 for PPO: 3e-5, 1e-4, 3e-4
    c.ppo.critic_lr = 1e-3  # the critic (from the reward model) adapts faster than the policy
    c.ppo.ppo_epochs, c.ppo.num_minibatches = 2, 2  # 4 updates per batch: enough for a 2-layer policy
    c.ppo.temperature = 1.0  # the source's own distribution: rollouts, pairs and evaluation at T = 1
    c.ppo.reward_args.beta_kl = 0.2  # tuned on seed 1000 for PPO: 0.01, 0.05, 0.2
    c.ppo.prm_beta = c.dpo.beta  # an online implicit PRM (rto_online_prm) learns on the scale DPO trained it at
    c.ppo.eval_every = 25  # the gold-reward curve (sample efficiency): 4 points per method
    c.evaluate.num_prompts, c.evaluate.batch_size = 512, 256  # one sample per held-out prompt
    c.evaluate.temperature = 1.0  # as the rollouts

    if preset == "demo":
        pass
    elif preset == "full":
        c.seeds = "0,1,2"  # mean ± standard error across seeds
        c.ppo.total_episodes = 12_800  # twice the demo's budget
    elif preset == "tune":
        c.seeds = "1000"  # the tuning seed, never reported
    elif preset == "tune_methods":
        c.seeds = "1000"  # the tuning seed, never reported as a result
        set_recipe(c, "experiments/synthetic_tune.py")
        c.ppo.reward_args.beta_kl = 0.2  # the shared value stays where the grid does not set it
        c.tune = config_dict.ConfigDict()
        # 8 runs each: PPO over its KL coefficient and learning rate; RTO over its three coefficients;
        # the critic-free RLOO rows over the same points as the reward they use (PPO's, RTO's); the
        # online PRM over beta_dpo x its learning rate at rto_rloo's chosen dpo_clip and beta_kl.
        c.tune.grid = (
            "ppo: beta_kl=0.02|0.05|0.1|0.2, lr=1e-4|3e-4; rto: beta_dpo=0.05|0.2, dpo_clip=0.05|0.2, beta_kl=0.05|0.2; "
            "rloo: beta_kl=0.02|0.05|0.1|0.2, lr=1e-4|3e-4; rto_rloo: beta_dpo=0.05|0.2, dpo_clip=0.05|0.2, beta_kl=0.05|0.2; "
            "rto_online_prm: beta_dpo=0.05|0.2, prm_lr=3e-5|1e-4|3e-4|1e-3, dpo_clip=0.05, beta_kl=0.05"
        )
    elif preset == "tuned":
        c.seeds = "1,2,3"  # never used for tuning
        c.ppo.per_method = TUNED + ";" + TUNED_CRITIC_FREE  # frozen from tune_methods (docs/results/synthetic.md#fair-tuning)
    elif preset in ("study", "study_smoke"):
        set_recipe(c, "experiments/synthetic_study.py")
        c.seeds = "1,2,3,4,5"  # >= 5 evaluation seeds per cell; never the tuning seed
        c.ppo.per_method = TUNED + ";" + TUNED_RLOO  # each method's values from tune_methods, frozen before the study
        c.study = config_dict.ConfigDict()
        c.study.tuning_seed = 1000  # refused among the seeds
        # 8 = the center task's target_length; R = 3 H. Horizon 96 is ~40 min of base stages per seed on
        # 2 cores: the study runs across sessions, each finished (seed, cell) committed as a summary.
        c.study.horizons = "8,32,96"
        c.study.reward_pairs = 4096  # the reward model's pairs (and the center DPO's): as in every preset
        c.study.dpo_pairs = "1024,4096,16384"  # a quarter and four times the reward model's
        c.study.beta_kl = "0.01,0.2"  # every method; the tuned value (0.05) is the center's
        # RTO's DPO term is ~5% of the reward at the tuned beta_dpo 0.05 (clip 0.2): cells where it is not.
        c.study.beta_dpo, c.study.beta_dpo_horizons, c.study.wide_clip = "0.2,0.5", "8,32,96", 0.0  # 0: no clip
        # PPO's and RTO's rewards without a critic (RLOO, 4 responses per prompt), beside the horizon's PPO / RTO.
        c.study.critic_free_horizons = "8"
        # Each finished (seed, cell), committed: the next session resumes from them (and `make study-report`).
        c.study.summaries = "docs/results/synthetic_study/summaries"
        c.synthetic.preference_pairs = 16384 + 256  # the most DPO pairs + the held-out pairs
        c.dpo.max_steps = 0  # 5 epochs whatever the pairs: more pairs are more data, not fewer epochs
        c.ppo.eval_every = 10  # 10 points per gold-reward curve (episodes to reach PPO's final)
    elif preset == "smoke":  # seconds of work (mostly compilation): every file is produced
        _toy_sizes(c)
        c.synthetic.preference_pairs = 64  # 48 training + 16 held-out pairs
        c.dpo.max_steps = 3  # as the reward model's
        c.ppo.total_episodes = 32  # 2 iterations
    elif preset not in ("study", "study_smoke"):
        raise ValueError(f"rto_synthetic.py: unknown preset {preset!r}; presets: {', '.join(PRESETS)}")
    if preset == "study_smoke":  # the whole design at toy sizes: every cell, stage and output file
        _toy_sizes(c)
        c.seeds = "1,2"  # two seeds: an interval and a paired difference
        c.study.horizons, c.study.reward_pairs, c.study.dpo_pairs = "8,12", 48, "24,48,96"  # every kind of cell
        c.study.beta_kl = "0.2"  # one KL cell
        c.study.beta_dpo, c.study.beta_dpo_horizons = "0.5", "12"  # one DPO-weight cell (no clip)
        c.study.critic_free_horizons = "8"  # the critic-free cell where the horizon's runs are made too
        # rloo's own KL coefficient (not PPO's 0.05): a test sees per_method's rloo entry reach its runs.
        c.ppo.per_method = TUNED + ";" + TUNED_RLOO.replace("rloo:beta_kl=0.05", "rloo:beta_kl=0.1")
        c.study.summaries = ""  # in the workdir, never the committed folder
        c.synthetic.preference_pairs = 96 + 16  # the most DPO pairs + the held-out pairs
        c.dpo.num_epochs, c.dpo.max_steps = 1, 0  # one epoch: 24, 48 and 96 pairs are 1, 3 and 6 steps
        c.ppo.total_episodes = 48  # 3 iterations
    c.lock()
    return c
