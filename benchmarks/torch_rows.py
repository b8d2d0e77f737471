"""Peer rows: transformers' PyTorch Llama on the same shapes and objectives, HF `generate`, TRL's DPO trainer.

Every peer runs the same workload as our row: full-length random rows, the LM head only on the response
positions (`logits_to_keep`), AdamW after global-norm clipping at 1.0, float32, torch threads = cores; on a
GPU (the device suite) on the GPU, and a bfloat16 row under `torch.autocast` (float32 weights, bf16 compute:
what ModelConfig.dtype="bfloat16" does in ours).
The peers' models and TRL's trainer are built by third_party/torch_peers; this file defines the
workloads and times them.
"""

from __future__ import annotations

import os
import shutil
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.timing import measure
from benchmarks.workloads import FIRST_TOKEN, SHAPES
from third_party import torch_peers

PAD = 0
torch.set_num_threads(os.cpu_count() or 1)
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _sync(result):
    """Waits for the GPU's queued work (CUDA runs asynchronously); nothing to wait for on a CPU."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
    return result


def _measure(fn, row: dict) -> dict:
    return measure(fn, row["warmup"], row["reps"], _sync)


def _autocast(row: dict):
    """A fresh context for the row's compute dtype: bf16 autocast on the row's device, or nothing (float32)."""
    return torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=row.get("dtype") == "bfloat16")


def _tensor(array) -> torch.Tensor:
    return torch.from_numpy(array).float().to(DEVICE)


def device_kind() -> str:
    """Where the rows run, in JAX's words ("gpu" for CUDA, else "cpu"): ratios pair rows of one kind only."""
    return "gpu" if DEVICE.type == "cuda" else "cpu"


def device_peak_mb() -> float | None:
    """Peak bytes allocated on the GPU so far (MB); None on a CPU."""
    return torch.cuda.max_memory_allocated() / 2**20 if DEVICE.type == "cuda" else None


def _causal_lm(shape_name: str):
    """transformers' LlamaForCausalLM of the shape, float32, seed 0."""
    return torch_peers.causal_lm(SHAPES[shape_name], pad_token_id=PAD, seed=0).to(DEVICE)


def _value_model(shape_name: str):
    """LlamaModel + a bias-free scalar head on every position: our ScalarHeadModel (critic, reward model)."""
    return torch_peers.ValueModel(SHAPES[shape_name], pad_token_id=PAD).to(DEVICE)


def ceiling(row: dict) -> dict:
    out = {"by_size": {}}
    dtype = getattr(torch, row.get("dtype", "float32"))
    for n in row["sizes"]:
        a, b = (torch.randn(n, n, device=DEVICE, dtype=dtype) for _ in range(2))
        timing = _measure(lambda a=a, b=b: torch.matmul(a, b), row)
        out["by_size"][str(n)] = 2 * n**3 / timing["median_s"] / 1e9
        out["median_s"] = timing["median_s"]  # of the largest size, the last one
    out["gflops"] = max(out["by_size"].values())
    return out


def _ids(rng, seqs, length, vocab):
    return torch.from_numpy(rng.integers(FIRST_TOKEN, vocab, (seqs, length))).long().to(DEVICE)


def _response_logps(model, input_ids, response: int):
    """Per-token log-probs `[B, R]` of the last R tokens, the LM head on the R positions that predict them."""
    logits = model(input_ids=input_ids, logits_to_keep=response + 1).logits[:, :-1]
    return torch.gather(F.log_softmax(logits, -1), 2, input_ids[:, -response:, None])[..., 0], logits


def _ppo_loss(policy, critic, ids, response: int, logp_old, old_values, advantages, returns, vf_coef: float):
    """Our update's loss on full-length rows `[B, T]`: PPO's clipped surrogate (ratio clip 0.2) plus
    vf_coef x the clipped value loss (clip 0.2), token means; the policy's entropy is computed as our
    update logs it."""
    logp, logits = _response_logps(policy, ids, response)
    ratio = torch.exp(logp - logp_old)
    pg = torch.maximum(-advantages * ratio, -advantages * ratio.clamp(0.8, 1.2)).mean()
    values = critic(ids)[:, ids.shape[1] - response - 1 : -1]
    clipped = old_values + (values - old_values).clamp(-0.2, 0.2)
    vf = 0.5 * torch.maximum((values - returns) ** 2, (clipped - returns) ** 2).mean()
    with torch.no_grad():  # entropy is a logged metric in our update too
        probs = F.softmax(logits, -1)
        (-(probs * F.log_softmax(logits, -1)).sum(-1)).mean()
    return pg + vf_coef * vf


def _optimizer(params):
    return torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)


def _train_step(loss_fn, params, optimizer, row: dict):
    def step():
        optimizer.zero_grad(set_to_none=True)
        with _autocast(row):
            loss = loss_fn()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        return loss

    return step


def train(row: dict) -> dict:
    """Median step time (forward + backward + clip + AdamW) of the same objective as our row."""
    if row["task"] == "trl_dpo":
        return trl_dpo(row)
    rng = np.random.default_rng(0)
    seqs, length = row["batch"], row["seq"]
    response = length - row["prompt"]
    vocab = SHAPES[row["shape"]]["vocab_size"]
    ids = _ids(rng, seqs, length, vocab)
    task = row["task"]
    if task == "sft":
        model = _causal_lm(row["shape"]).train()

        def loss_fn():
            logits = model(input_ids=ids, logits_to_keep=response + 1).logits[:, :-1]
            return F.cross_entropy(logits.reshape(-1, vocab), ids[:, -response:].reshape(-1))

        params = list(model.parameters())
    elif task == "rm":
        model = _value_model(row["shape"]).train()

        def loss_fn():
            chosen, rejected = model(ids)[:, -1].chunk(2)
            return -F.logsigmoid(chosen - rejected).mean()

        params = list(model.parameters())
    elif task == "dpo":
        model = _causal_lm(row["shape"]).train()
        reference = _causal_lm(row["shape"]).eval().requires_grad_(False)

        def loss_fn():
            logp, _ = _response_logps(model, ids, response)
            with torch.no_grad():
                ref, _ = _response_logps(reference, ids, response)
            chosen, rejected = (logp.sum(1) - ref.sum(1)).chunk(2)
            return -F.logsigmoid(0.1 * (chosen - rejected)).mean()

        params = list(model.parameters())
    elif task == "ppo":
        model, critic = _causal_lm(row["shape"]).train(), _value_model(row["shape"]).train()
        logp_old = _tensor(-rng.exponential(1.0, (seqs, response)))
        old_values = _tensor(rng.normal(size=(seqs, response)))
        advantages = _tensor(rng.normal(size=(seqs, response)))
        returns = _tensor(rng.normal(size=(seqs, response)))

        def loss_fn():
            return _ppo_loss(model, critic, ids, response, logp_old, old_values, advantages, returns, vf_coef=0.5)

        params = list(model.parameters()) + list(critic.parameters())
    else:
        raise ValueError(f"{row['id']}: unknown task {task!r}")
    # One AdamW over policy and critic: the same update as our two optimizers with equal settings.
    return _measure(_train_step(loss_fn, params, _optimizer(params), row), row)


def trl_dpo(row: dict) -> dict:
    """TRL's `DPOTrainer` (reference model in the step, sigmoid loss): time between on_step_begin and on_step_end.

    Text rows over a word-level tokenizer ("t17 t5 ...") map one word to one token id, so TRL tokenizes
    exactly the lengths of our row: prompt P words, chosen/rejected R - 1 words and EOS.
    """
    import trl  # noqa: F401 - an absent optional peer is reported (ModuleNotFoundError) before any model is built
    from transformers import TrainerCallback

    shape = SHAPES[row["shape"]]
    vocab = shape["vocab_size"]
    tokenizer = torch_peers.word_level_tokenizer(vocab, first_token=FIRST_TOKEN, pad_id=PAD, eos_id=1)

    pairs = row["batch"] // 2
    steps = max(row["warmup"], 1) + row["reps"]
    rng = np.random.default_rng(0)
    response = row["seq"] - row["prompt"]
    text = lambda n: " ".join(f"t{i}" for i in rng.integers(FIRST_TOKEN, vocab, n))
    examples = [
        {
            "prompt": text(row["prompt"]) + " ",
            "chosen": text(response - 1) + " <eos>",
            "rejected": text(response - 1) + " <eos>",
        }
        for _ in range(pairs * steps)
    ]
    # Completions already end in EOS, so TRL adds none; the space after the prompt keeps the word boundary.
    model, reference = _causal_lm(row["shape"]), _causal_lm(row["shape"])

    times, starts = [], []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            starts.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - starts[-1])

    out_dir = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"trl-dpo-bench-{os.getpid()}")
    trainer = torch_peers.trl_dpo_trainer(
        model, reference, tokenizer, examples, pairs=pairs, steps=steps, out_dir=out_dir, callbacks=[StepTimer()]
    )
    sample = trainer.data_collator([trainer.train_dataset[i] for i in range(pairs)])
    got = tuple(sample["input_ids"].shape)
    if got != (2 * pairs, row["seq"]):
        raise RuntimeError(f"{row['id']}: TRL collated {got}, expected {(2 * pairs, row['seq'])}")
    try:
        trainer.train()
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    warm = max(row["warmup"], 1)
    return {"first_s": times[0], "times_s": times[warm:], "median_s": statistics.median(times[warm:])}


def rollout(row: dict) -> dict:
    """HF `generate` (greedy, KV cache, no EOS): max_new_tokens=R and =1 as for our sampler.

    Here a call with R new tokens runs the prefill plus R - 1 one-token forwards and a call with 1 runs
    the prefill alone, so a decode step takes (t_R - t_1) / (R - 1) and the prefill t_1.
    """
    model = _causal_lm(row["shape"]).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = PAD
    rng = np.random.default_rng(0)
    batch, prompt, new = row["batch"], row["prompt"], row["new_tokens"]
    ids = _ids(rng, batch, prompt, SHAPES[row["shape"]]["vocab_size"])
    mask = torch.ones_like(ids)

    def call(max_new):
        def run():
            with torch.inference_mode(), _autocast(row):
                return model.generate(
                    input_ids=ids, attention_mask=mask, max_new_tokens=max_new, do_sample=False, use_cache=True
                )

        return run

    full = _measure(call(new), row)
    out = call(new)()
    if tuple(out.shape) != (batch, prompt + new):
        raise RuntimeError(f"{row['id']}: generate returned {tuple(out.shape)}, expected {(batch, prompt + new)}")
    one = _measure(call(1), row)
    step_s = max(full["median_s"] - one["median_s"], 0.0) / max(new - 1, 1)
    return {
        "median_s": full["median_s"],
        "times_s": full["times_s"],
        "first_s": full["first_s"],
        "one_token_median_s": one["median_s"],
        "decode_step_s": step_s,
        "prefill_s": one["median_s"],
        "weights": "random init",
    }


def _gae(rewards, values, gamma: float = 1.0, lam: float = 0.95):
    """GAE over full-length rows `[B, R]` (every token valid), as a reverse loop over time."""
    advantages = torch.zeros_like(rewards)
    next_adv = torch.zeros(rewards.shape[0], device=rewards.device)
    next_value = torch.zeros(rewards.shape[0], device=rewards.device)
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_adv = delta + gamma * lam * next_adv
        next_value = values[:, t]
        advantages[:, t] = next_adv
    return advantages, advantages + values


def ppo_iteration(row: dict) -> dict:
    """One RTO PPO iteration in PyTorch, the work of our `ppo_split` row (benchmarks/jax_rows.py):

    rollout  HF `generate` (sampling at temperature 1, KV cache, EOS never emitted), the policy's
             per-token log-probs and entropy from the logits `generate` returns (as ours reuses the sampler's)
    scoring  reference and DPO policy log-probs (LM head on the R response positions), critic values,
             reward-model score; RTO's token reward (clipped DPO term, KL, score), GAE, whitened advantages
    update   one PPO epoch, one minibatch: policy + critic forward/backward, clipping, AdamW

    With impl "torch-compile" the scoring and update forwards run through `torch.compile` (inductor);
    `generate` stays eager. Times are medians of `reps` after `warmup` iterations.
    """
    shape = SHAPES[row["shape"]]
    batch, prompt, new = row["batch"], row["prompt"], row["new_tokens"]
    length = prompt + new
    policy = _causal_lm(row["shape"])
    policy.generation_config.eos_token_id = None
    policy.generation_config.pad_token_id = PAD
    reference = _causal_lm(row["shape"]).eval().requires_grad_(False)  # seed 0: a copy of the policy
    dpo = torch_peers.causal_lm(shape, pad_token_id=PAD, seed=3).to(DEVICE).eval().requires_grad_(False)
    torch.manual_seed(1)
    critic = _value_model(row["shape"])
    reward = _value_model(row["shape"]).eval().requires_grad_(False)
    params = list(policy.parameters()) + list(critic.parameters())
    optimizer = _optimizer(params)
    train_step = policy
    if row["impl"] == "torch-compile":
        reference, dpo, reward = torch.compile(reference), torch.compile(dpo), torch.compile(reward)
        train_step, critic = torch.compile(policy), torch.compile(critic)
    rng = np.random.default_rng(0)
    ids = _ids(rng, batch, prompt, shape["vocab_size"])
    mask = torch.ones_like(ids)

    def rollout():
        with torch.inference_mode(), _autocast(row):
            out = policy.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=new,
                do_sample=True,
                temperature=1.0,
                top_k=0,
                top_p=1.0,
                use_cache=True,
                output_logits=True,
                return_dict_in_generate=True,
            )
            logp_all = F.log_softmax(torch.stack(out.logits, 1).float(), -1)  # [B, R, V]
            tokens = out.sequences[:, prompt:]
            logp = torch.gather(logp_all, 2, tokens[..., None])[..., 0]
            entropy = -(logp_all.exp() * logp_all).sum(-1)
        return out.sequences, logp, entropy

    def scoring(sequences, logp_old, beta_dpo=0.05, dpo_clip=0.05, beta_kl=0.01):
        with torch.inference_mode(), _autocast(row):
            ref, _ = _response_logps(reference, sequences, new)
            dpo_logp, _ = _response_logps(dpo, sequences, new)
            values = critic(sequences)[:, length - new - 1 : -1].float()  # float32 returns, as ours
            score = reward(sequences)[:, -1].float()
            rewards = (beta_dpo * (dpo_logp - ref)).clamp(-dpo_clip, dpo_clip) - beta_kl * (logp_old - ref)
            rewards[:, -1] += score
            advantages, returns = _gae(rewards, values)
            advantages = (advantages - advantages.mean()) / (advantages.var(unbiased=False) + 1e-8).sqrt()
        return values.clone(), advantages.clone(), returns.clone()

    def update(sequences, logp_old, old_values, advantages, returns):
        optimizer.zero_grad(set_to_none=True)
        with _autocast(row):
            loss = _ppo_loss(train_step, critic, sequences, new, logp_old, old_values, advantages, returns, vf_coef=0.1)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        return loss

    sequences, logp_old, _ = rollout()
    if tuple(sequences.shape) != (batch, length):
        raise RuntimeError(f"{row['id']}: generate returned {tuple(sequences.shape)}, expected {(batch, length)}")
    logp_old = logp_old.clone()
    sequences = sequences.clone()
    rollout_t = _measure(rollout, row)
    scoring_t = _measure(lambda: scoring(sequences, logp_old), row)
    experience = scoring(sequences, logp_old)
    update_t = _measure(lambda: update(sequences, logp_old, *experience), row)
    split = {"rollout": rollout_t["median_s"], "scoring": scoring_t["median_s"], "update": update_t["median_s"]}
    total = sum(split.values())
    return {
        "median_s": total,
        "times_s": [],
        "first_s": rollout_t["first_s"] + scoring_t["first_s"] + update_t["first_s"],
        "split_s": split,
        "split_share": {k: v / total for k, v in split.items()},
    }


RUNNERS = {"ceiling": ceiling, "train": train, "rollout": rollout, "ppo_split": ppo_iteration}
