"""RTO (PPO with DPO token rewards) on Reddit TL;DR summarization.

Presets (`--config=configs/rto_tldr.py:PRESET`):
  1b (default), 2.8b, 6.9b  Pythia-deduped with the N+ TL;DR recipe ("The N+ Implementation Details of
                            RLHF with PPO", Huang et al. 2024, github.com/vwxyzjn/summarize_from_feedback_details):
                            P = 512 prompt tokens, R = 53 response tokens, SFT batch 128, RM/DPO batch 64,
                            PPO 1M episodes in batches of 512, 4 PPO epochs, lr 3e-6, temperature 0.7,
                            EOS penalty 1. RTO's reward shaping follows the authors' code (docs/algorithm.md#sources-of-the-defaults):
                            beta_dpo 0.05 (clip 0.05), fixed beta_kl 0.01.
  tiny                      random-init 2-layer model, 2k BPE, the offline sample data in ../shared/data.
  smollm2                   SmolLM2-135M-Instruct (the GGUF `make smollm2` caches; its own tokenizer, pad
                            chosen automatically) on the offline TL;DR samples in ../shared/data, with
                            budgets that finish in about half an hour on 2 CPU cores (docs/getting_started.md#a-real-model-offline-smollm2-135m-instruct-on-tldr).

To start from the released N+ checkpoints instead of training SFT:
  --config.sft.init_from=cleanrl/EleutherAI_pythia-1b-deduped__sft__tldr@<revision>
(hub repos with safetensors weights; pin the revision you mean).
"""

from rto_jax.pipeline.config import apply_tiny, base_config, shared_data_dir

PRESETS = ("1b", "2.8b", "6.9b", "tiny", "smollm2")  # the first: default

PYTHIA = {
    "1b": "EleutherAI/pythia-1b-deduped",
    "2.8b": "EleutherAI/pythia-2.8b-deduped",
    "6.9b": "EleutherAI/pythia-6.9b-deduped",
}


def tldr_data(c):
    """Hub TL;DR data: SFT pairs (vwxyzjn filtered TL;DR) and human comparisons (prompt/chosen/rejected)."""
    c.data.max_prompt_len = 512  # N+: queries are 512 tokens, the post shortened at a word boundary
    c.data.max_response_len = 53  # N+: SFT responses <= 53 tokens (longer comparison summaries are truncated)
    c.data.sft.path = "vwxyzjn/summarize_from_feedback_tldr_3_filtered"  # columns query / reference_response
    c.data.sft.format = "tldr_sft"
    c.data.sft.eval_path = "vwxyzjn/summarize_from_feedback_tldr_3_filtered"  # its validation split
    c.data.sft.eval_split = "validation"
    c.data.preference.path = "trl-lib/tldr-preference"  # openai/summarize_from_feedback comparisons, flattened
    c.data.preference.format = "tldr_preference"
    c.data.preference.eval_path = "trl-lib/tldr-preference"
    c.data.preference.eval_split = "validation"
    return c


def tiny_data(c):
    """The offline samples: 1,945 TL;DR SFT rows (reference summaries) and 10k comparisons."""
    data = shared_data_dir()
    c.data.sft.path = str(data / "tldr_sft_oai1b.csv")  # query -> reference_responses
    c.data.sft.format = "tldr_sft"
    c.data.sft.max_rows = 600  # enough for the tiny model; keeps tokenization fast
    c.data.preference.path = str(data / "tldr_comparisons_10k.parquet")  # prompt / chosen / rejected
    c.data.preference.format = "tldr_preference"
    c.data.preference.max_rows = 1200
    return c


def smollm2(c):
    """SmolLM2-135M-Instruct on the offline TL;DR samples within ~30 minutes of 2 CPU cores: every
    deviation from base_config, and why. On such a machine a 135M model trains ~70 tokens/s
    (docs/results/benchmarks.md#previous-full-run-2026-12-03), so each budget below is a few dozen sequences: enough to run every stage
    on a real model and real data, not to show RTO's gains (docs/results/smollm2.md)."""
    from rto_jax.models.smollm2 import smollm2_gguf_path

    tiny_data(c)
    c.model.init_from = str(smollm2_gguf_path())  # `make smollm2`; its tokenizer (49k BPE) comes with it
    c.model.scan_layers = True  # 30 layers: one compiled block instead of 30 (CPU compile time)
    c.data.max_prompt_len = 96  # N+: 512; the POST is shortened at a word boundary (tldr_post) to fit
    c.data.max_response_len = 40  # N+: 53; 85% of the reference TL;DRs fit with their EOS
    c.data.sft.max_rows = None  # all 1,945 offline SFT rows (64 held out; PPO's prompts come from the rest)
    c.data.preference.max_rows = 2000  # of the 10k comparisons (more would only cost tokenizing time)
    c.data.eval_size = 64  # held-out rows per source
    c.sft.batch_size, c.sft.max_steps, c.sft.lr = 8, 8, 2e-5  # pretrained 135M: 1e-5 .. 3e-5, not :tiny's 1e-3
    c.reward_model.batch_size, c.reward_model.max_steps, c.reward_model.lr = 8, 8, 3e-5
    c.reward_model.normalize_rows = 32  # reference responses behind PPO's score mean / std
    c.dpo.batch_size, c.dpo.max_steps, c.dpo.lr, c.dpo.beta = 8, 6, 1e-5, 0.1
    c.ppo.rollout_batch_size, c.ppo.total_episodes = 16, 16 * 4  # 4 PPO iterations of 16 rollouts
    c.ppo.ppo_epochs, c.ppo.num_minibatches = 1, 2  # N+: 4 epochs; one pass quarters the update's cost
    c.ppo.lr = 1e-5  # N+: 3e-6 over 1,900 iterations; 8 updates need a larger step to move at all
    for stage in ("sft", "reward_model", "dpo"):
        c[stage].warmup_steps = 1
        c[stage].eval_batch_size = 16  # held-out metrics once, at the end (eval_every = 0)
    c.evaluate.num_prompts, c.evaluate.batch_size = 24, 8  # sft, dpo and rto on 24 held-out posts
    c.checkpoint.every_steps = 8  # a 135M checkpoint with its Adam moments is ~1.6 GB per trained model
    return c


def get_config(preset: str = "1b"):
    c = base_config()
    c.name = f"rto_tldr_{preset}"
    if preset == "tiny":
        apply_tiny(tiny_data(c))
    elif preset == "smollm2":
        smollm2(c)
    elif preset in PYTHIA:
        tldr_data(c)
        c.model.init_from = PYTHIA[preset]
        c.data.pad_id = 1  # GPT-NeoX '<|padding|>' (Pythia has no pad token; pad must differ from EOS 0)
        c.data.eos_id = 0  # '<|endoftext|>'
        c.model.dtype = "bfloat16"  # bf16 compute, float32 master weights
        c.sft.batch_size, c.sft.lr = 128, 3e-6  # N+ SFT
        c.reward_model.batch_size, c.reward_model.lr = 64, 3e-6  # N+ reward model
        c.dpo.batch_size, c.dpo.lr, c.dpo.beta = 64, 3e-6, 0.1  # RTO paper's DPO stage
        c.ppo.rollout_batch_size, c.ppo.total_episodes, c.ppo.lr = 512, 1_000_000, 3e-6  # N+ PPO
        c.ppo.num_minibatches = 8 if preset != "1b" else 4  # memory: minibatches of 64 / 128 rollouts
        c.checkpoint.every_steps = 50
    else:
        raise ValueError(f"rto_tldr.py: unknown preset {preset!r}; presets: {', '.join(PRESETS)}")
    c.lock()
    return c
