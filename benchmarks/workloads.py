"""Model shapes, FLOP counts and the list of benchmark rows. Imports neither JAX nor torch.

A row is a plain dict (it travels as JSON to a worker process):
    id        unique name, e.g. "train/sft/smollm2-135m/4x256/jax-loop"
    group     "ceiling" | "train" | "rollout" | "ppo" | "scaling" | "attention" | "device"
    backend   "jax" | "torch" | "tunix" (which worker runs it; no other framework is imported there;
              tunix rows run in tunix's own environment, .venv-tunix)
    kind      "ceiling" | "train" | "rollout" | "ppo_split"
    task      train: "sft" | "rm" | "dpo" | "ppo" | "trl_dpo"; otherwise the kind
    impl      "jax-loop" | "jax-scan" | "jax-lora" | "jax-rloo" | "torch" | "torch-compile" | "hf-generate" | "trl"
              | "tunix"
    shape     key of SHAPES; batch, seq (prompt + response), prompt (P); rollout: new_tokens (R)
    warmup, reps
    ppo_config  ppo_split rows of ours only, when set: PPOConfig fields (the critic-free "jax-rloo" row's estimator
              and samples_per_prompt)
    dtype     "float32" (absent) or "bfloat16": the compute dtype (ours: ModelConfig.dtype, float32 params;
              the PyTorch peers: float32 weights under torch.autocast), and for a ceiling the matmul's dtype
A training row's batch counts sequences: a preference row of batch 4 is 2 chosen/rejected pairs,
so every training row at "4x256" pushes the same 1024 tokens through the policy.
"""

from __future__ import annotations

SHAPES = {
    # SmolLM2-135M: the real model's architecture (tied embeddings, GQA 9/3).
    "smollm2-135m": {
        "vocab_size": 49152,
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_layers": 30,
        "num_heads": 9,
        "num_kv_heads": 3,
        "head_dim": 64,
        "rope_theta": 100000.0,
        "norm_eps": 1e-5,
        "tie_word_embeddings": True,
    },
    # A small model whose steps are dominated by per-op overhead rather than matmuls.
    "tiny": {
        "vocab_size": 2048,
        "hidden_size": 128,
        "intermediate_size": 384,
        "num_layers": 4,
        "num_heads": 4,
        "num_kv_heads": 2,
        "head_dim": 32,
        "rope_theta": 10000.0,
        "norm_eps": 1e-5,
        "tie_word_embeddings": True,
    },
    # Llama-3.2-1B's architecture (random init; its llama3 RoPE frequency scaling is left out: the
    # same FLOPs and bytes): the device suite's larger model (GQA 32/8, vocab 128256, tied).
    "llama-3.2-1b": {
        "vocab_size": 128256,
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_layers": 16,
        "num_heads": 32,
        "num_kv_heads": 8,
        "head_dim": 64,
        "rope_theta": 500000.0,
        "norm_eps": 1e-5,
        "tie_word_embeddings": True,
    },
    # Only for --smoke: compiles and runs in well under a second per row.
    "smoke": {
        "vocab_size": 256,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_layers": 2,
        "num_heads": 4,
        "num_kv_heads": 2,
        "head_dim": 16,
        "rope_theta": 10000.0,
        "norm_eps": 1e-5,
        "tie_word_embeddings": True,
    },
}

# Token ids the benchmarks draw inputs from start here, so pad (0) and the fake EOS never occur.
FIRST_TOKEN = 2


def param_counts(shape: dict) -> tuple[int, int]:
    """(N_body, N_head): matmul parameters of the blocks, and of the LM head (= the embedding when tied)."""
    d, hd = shape["hidden_size"], shape["head_dim"]
    attn = d * hd * (2 * shape["num_heads"] + 2 * shape["num_kv_heads"])  # q, o and k, v
    mlp = 3 * d * shape["intermediate_size"]
    return shape["num_layers"] * (attn + mlp), shape["vocab_size"] * d


def forward_flops(shape: dict, seqs: int, length: int, head_tokens: int, lm_head: bool = True) -> float:
    """Model FLOPs of a forward pass over `seqs` sequences of `length` tokens.

    2 FLOPs per matmul parameter per token, the LM head only on the `head_tokens` positions each
    sequence needs, plus attention's 4 L (H hd) T per token (QK^T and AV, causal mask not discounted,
    as in PaLM's 6N + 12 L d T training count). Embedding lookups, norms and softmax are not counted.
    """
    body, head = param_counts(shape)
    attention = 4 * shape["num_layers"] * shape["num_heads"] * shape["head_dim"] * length * length
    return seqs * (2 * body * length + attention + (2 * head * head_tokens if lm_head else 0))


def train_flops(shape: dict, seqs: int, length: int, head_tokens: int, lm_head: bool = True) -> float:
    """Forward + backward = 3x the forward FLOPs."""
    return 3 * forward_flops(shape, seqs, length, head_tokens, lm_head)


def decode_flops(shape: dict, batch: int, prompt: int, new_tokens: int) -> float:
    """FLOPs of decoding `new_tokens` tokens one at a time after a `prompt`-token prefix (KV cache)."""
    body, head = param_counts(shape)
    per_ctx = 4 * shape["num_layers"] * shape["num_heads"] * shape["head_dim"]
    total = 0.0
    for t in range(new_tokens):
        total += 2 * body + 2 * head + per_ctx * (prompt + t + 1)
    return batch * total


def decode_bytes(shape: dict, batch: int, prompt: int, new_tokens: int, bytes_per_value: int = 4) -> float:
    """Bytes a decode step must read from memory, on average over the `new_tokens` steps: every matmul
    weight once (the tied LM head is the embedding) and the KV cache of the context so far."""
    body, head = param_counts(shape)
    kv_per_token = 2 * shape["num_layers"] * shape["num_kv_heads"] * shape["head_dim"]
    mean_context = prompt + (new_tokens + 1) / 2
    return bytes_per_value * (body + head + batch * kv_per_token * mean_context)


def prefill_flops(shape: dict, batch: int, prompt: int) -> float:
    """Useful prefill work: the blocks over the prompt and the LM head on its last position only."""
    return forward_flops(shape, batch, prompt, head_tokens=1)


def workload_flops(row: dict) -> float | None:
    """FLOPs of one timed unit of `row` (a training step, or for rollouts None: see rollout fields)."""
    if row["kind"] != "train":
        return None
    shape = SHAPES[row["shape"]]
    seqs, length = row["batch"], row["seq"]
    response = length - row["prompt"]
    task = row["task"]
    if task == "sft":
        return train_flops(shape, seqs, length, response)
    if task == "rm":
        return train_flops(shape, seqs, length, 0, lm_head=False)
    if task in ("dpo", "trl_dpo"):  # policy trained, reference forward
        return train_flops(shape, seqs, length, response) + forward_flops(shape, seqs, length, response)
    if task == "ppo":  # policy and critic trained on the same rollout
        return train_flops(shape, seqs, length, response) + train_flops(shape, seqs, length, 0, lm_head=False)
    raise ValueError(f"unknown training task {task!r}")


def _backend(impl: str) -> str:
    """The worker that runs an impl: ours ("jax"), PyTorch and its libraries ("torch"), google-tunix ("tunix",
    in its own environment)."""
    return "jax" if impl.startswith("jax") else "tunix" if impl == "tunix" else "torch"


def _layout(impl: str) -> str | None:
    """Our layer layout of a jax impl ("loop" or "scan"); None for a peer."""
    return {
        "jax-loop": "loop",
        "jax-scan": "scan",
        "jax-lora": "loop",
        "jax-rloo": "loop",
        "jax-xla": "loop",
        "jax-blockwise": "loop",
        "jax-cudnn": "loop",
    }.get(impl)


# Our impls that pin `ModelConfig.attention` (every other jax row runs the default, "auto").
ATTENTION_IMPLS = {"jax-xla": "xla", "jax-blockwise": "blockwise", "jax-cudnn": "cudnn"}


def _train(task, shape, batch, seq, impl, *, group="train", reps, warmup=1, prompt=None, dtype=None):
    row = {
        "id": f"{group}/{task}/{shape}/{batch}x{seq}/{impl}",
        "group": group,
        "backend": _backend(impl),
        "kind": "train",
        "task": task,
        "impl": impl,
        "layout": _layout(impl),
        "shape": shape,
        "batch": batch,
        "seq": seq,
        "prompt": prompt if prompt is not None else seq // 4,
        "warmup": warmup,
        "reps": reps,
    }
    if impl in ATTENTION_IMPLS:
        row["attention"] = ATTENTION_IMPLS[impl]
    return _with_dtype(row, dtype)


def _with_dtype(row: dict, dtype: str | None) -> dict:
    """The row with its compute dtype set (absent = float32, as every CPU row)."""
    if dtype is not None:
        row["dtype"] = dtype
    return row


def _rollout(shape, batch, impl, *, prompt, new_tokens, reps, warmup=1, group="rollout", dtype=None):
    row = {
        "id": f"{group}/rollout/{shape}/b{batch}/{impl}" if group != "rollout" else f"rollout/{shape}/b{batch}/{impl}",
        "group": group,
        "backend": _backend(impl),
        "kind": "rollout",
        "task": "rollout",
        "impl": impl,
        "layout": _layout(impl),
        "shape": shape,
        "batch": batch,
        "seq": prompt + new_tokens,
        "prompt": prompt,
        "new_tokens": new_tokens,
        "warmup": warmup,
        "reps": reps,
    }
    return _with_dtype(row, dtype)


def _ceiling(impl, sizes, reps, dtype=None, read_mb=1024):
    """The matmul rate (float32, or `dtype`) every row's MFU is against; ours also measures the memory read
    rate over `read_mb` MB (a decode step's bandwidth fraction is against it)."""
    row = {
        "id": f"ceiling/matmul/{impl}" + (f"-{dtype}" if dtype else ""),
        "group": "ceiling",
        "backend": "jax" if impl == "jax" else "torch",
        "kind": "ceiling",
        "task": "matmul",
        "impl": impl,
        "sizes": list(sizes),
        "read_mb": read_mb,
        "warmup": 1,
        "reps": reps,
    }
    return _with_dtype(row, dtype)


def critic_free(samples_per_prompt: int) -> dict:
    """The PPOConfig fields of a "jax-rloo" row: RLOO's leave-one-out baseline over `samples_per_prompt`
    responses to each prompt instead of a critic (the rollout batch holds batch / samples_per_prompt prompts)."""
    return {"estimator": "rloo", "samples_per_prompt": samples_per_prompt}


def _ppo_split(shape, batch, impl, *, prompt, new_tokens, reps, ppo_config=None, group="ppo", dtype=None):
    row = {
        "id": f"{group}/iteration/{shape}/b{batch}/{impl}",
        "group": group,
        "backend": _backend(impl),
        "kind": "ppo_split",
        "task": "ppo_iteration",
        "impl": impl,
        "layout": _layout(impl),
        "shape": shape,
        "batch": batch,
        "seq": prompt + new_tokens,
        "prompt": prompt,
        "new_tokens": new_tokens,
        "warmup": 1,
        "reps": reps,
    }
    if ppo_config is not None:
        row["ppo_config"] = dict(ppo_config)
    return _with_dtype(row, dtype)


def full_rows() -> list[dict]:
    """The real benchmark: about 65 minutes on a quiet 2-core machine (50 min measured on 2026-12-03 for the
    56 rows then, plus ~4 each for the shared-base and the critic-free PPO iteration rows and ~8 for the 18
    attention rows, measured on 2026-12-06). `--only` runs a subset.
    """
    big, tiny = "smollm2-135m", "tiny"
    rows = [_ceiling("jax", (2048, 4096), reps=5), _ceiling("torch", (2048, 4096), reps=5)]
    # 135M at 4 x 256: every objective, ours (both layer layouts for SFT) and the PyTorch peer.
    for task in ("sft", "rm", "dpo", "ppo"):
        impls = ("jax-loop", "jax-scan", "torch") if task == "sft" else ("jax-loop", "torch")
        rows += [_train(task, big, 4, 256, impl, reps=3) for impl in impls]
    rows.append(_train("trl_dpo", big, 4, 256, "trl", reps=3))
    rows.append(_train("dpo", big, 4, 256, "tunix", reps=3))
    # 135M at 8 x 512, SFT only: a 30 s step (docs/results/benchmarks.md#previous-full-run-2026-12-03), so the one objective whose peer ratio matters most.
    rows += [_train("sft", big, 8, 512, impl, reps=3) for impl in ("jax-loop", "torch")]
    # Tiny at 8 x 512: per-op overhead dominates.
    for task in ("sft", "rm", "dpo", "ppo"):
        rows += [_train(task, tiny, 8, 512, impl, reps=5) for impl in ("jax-loop", "jax-scan", "torch")]
    rows.append(_train("trl_dpo", tiny, 8, 512, "trl", reps=5))
    # Rollout: prompt 64, 128 new tokens, greedy.
    for batch in (1, 8, 32):
        rows += [_rollout(big, batch, impl, prompt=64, new_tokens=128, reps=3) for impl in ("jax-loop", "hf-generate")]
    for batch in (1, 8, 32):
        rows += [_rollout(tiny, batch, impl, prompt=64, new_tokens=128, reps=5) for impl in ("jax-loop", "hf-generate")]
    # One RTO PPO iteration at 135M, split into rollout / scoring / update; PyTorch eager and compiled;
    # ours also on one shared base with adapters (issue 17: its peak RSS against the separate models'),
    # and critic-free: RLOO over 2 prompts x 4 responses, the same 8 responses (its time and peak RSS
    # against GAE's jax-loop row).
    rows += [
        _ppo_split(big, 8, impl, prompt=64, new_tokens=128, reps=3)
        for impl in ("jax-loop", "jax-lora", "torch", "torch-compile", "tunix")
    ]
    rows.append(_ppo_split(big, 8, "jax-rloo", prompt=64, new_tokens=128, reps=3, ppo_config=critic_free(4)))
    # Scaling (tiny shape, SFT): sequence length at batch 8, batch size at length 512.
    for seq in (256, 512, 1024):
        rows += [_train("sft", tiny, 8, seq, impl, group="scaling", reps=3) for impl in ("jax-loop", "torch")]
    for batch in (2, 4, 16):
        rows += [_train("sft", tiny, batch, 512, impl, group="scaling", reps=3) for impl in ("jax-loop", "torch")]
    rows += attention_rows()
    return rows


def attention_rows(reps: int = 3) -> list[dict]:
    """Attention implementations (docs/performance.md#attention): the tiny SFT step and PPO update at batch 8
    and 512/1024/2048 tokens with `xla` (the scores `[B, K, G, T, S]` in float32) and `blockwise` (no T x S
    array) pinned, the PyTorch peer beside them (its `sdpa` attention)."""
    return [
        _train(task, "tiny", 8, seq, impl, group="attention", reps=reps)
        for task in ("sft", "ppo")
        for seq in (512, 1024, 2048)
        for impl in ("jax-xla", "jax-blockwise", "torch")
    ]


def device_rows(smoke: bool = False) -> list[dict]:
    """The accelerator suite (`bash benchmarks/device.sh` on a GPU machine; docs/performance.md#on-an-accelerator),
    bfloat16 compute throughout, in the order it is worth measuring when the device time runs out first:
    the bf16 matmul and memory-read ceilings; SmolLM2-135M SFT and DPO at 8 x 1024, decode at batch 1 and 32
    (prompt 128, 128 new tokens; the bandwidth fraction against the read ceiling), the RTO PPO iteration at
    batch 32; the attention implementations on the 135M SFT step at 4 x 2048 and 1 x 8192 (`xla`,
    `blockwise`, `cudnn` pinned, PyTorch's sdpa beside them); then the same training, decode and iteration
    rows at Llama-3.2-1B's shape (4 x 1024, PPO batch 16). Every row of ours has its PyTorch peer (eager,
    float32 weights under bf16 autocast, on the same device).

    smoke=True: the same kinds of rows on the `smoke` shape at toy lengths, one model, one rep (the harness
    on a CPU: `python -m benchmarks.run --smoke --suite device`)."""
    bf16, group = "bfloat16", "device"
    size = lambda full, toy: toy if smoke else full
    reps = size(3, 1)
    models = [("smoke", size(0, 4), 32, 2)] if smoke else [("smollm2-135m", 8, 1024, 32), ("llama-3.2-1b", 4, 1024, 16)]
    prompt, new = size(128, 8), size(128, 8)
    rows = [
        _ceiling("jax", size((4096, 8192), (256,)), reps=size(5, 1), dtype=bf16, read_mb=size(4096, 64)),
        _ceiling("torch", size((4096, 8192), (256,)), reps=size(5, 1), dtype=bf16),
    ]
    for i, (shape, batch, seq, ppo_batch) in enumerate(models):
        for task in ("sft", "dpo"):
            rows += [_train(task, shape, batch, seq, impl, group=group, reps=reps, dtype=bf16) for impl in ("jax-loop", "torch")]
        for decode_batch in (1, 32) if not smoke else (1, 2):
            rows += [
                _rollout(shape, decode_batch, impl, prompt=prompt, new_tokens=new, reps=reps, group=group, dtype=bf16)
                for impl in ("jax-loop", "hf-generate")
            ]
        rows += [
            _ppo_split(shape, ppo_batch, impl, prompt=prompt, new_tokens=new, reps=size(2, 1), group=group, dtype=bf16)
            for impl in ("jax-loop", "torch")
        ]
        if i == 0:  # attention at long sequences: the small model, so that the 8k row fits beside xla's scores
            for batch_long, seq_long in size(((4, 2048), (1, 8192)), ((2, 64), (1, 128))):
                rows += [
                    _train("sft", shape, batch_long, seq_long, impl, group=group, reps=reps, dtype=bf16)
                    for impl in ("jax-xla", "jax-blockwise", "jax-cudnn", "torch")
                ]
    return rows


def smoke_rows() -> list[dict]:
    """Every kind of row on the `smoke` shape, one rep: checks the harness end to end in seconds."""
    s = "smoke"
    rows = [_ceiling("jax", (256,), reps=1), _ceiling("torch", (256,), reps=1)]
    for task in ("sft", "rm", "dpo", "ppo"):
        impls = ("jax-loop", "jax-scan", "torch") if task == "sft" else ("jax-loop", "torch")
        rows += [_train(task, s, 4, 32, impl, reps=1) for impl in impls]
    rows.append(_train("trl_dpo", s, 4, 32, "trl", reps=1))
    rows.append(_train("dpo", s, 4, 32, "tunix", reps=1))
    rows += [_rollout(s, 2, impl, prompt=8, new_tokens=8, reps=1) for impl in ("jax-loop", "hf-generate")]
    rows += [
        _ppo_split(s, 2, impl, prompt=8, new_tokens=8, reps=1) for impl in ("jax-loop", "jax-lora", "torch", "tunix")
    ]
    # Critic-free at the smoke batch of 2: one prompt answered twice (RLOO needs n > 1).
    rows.append(_ppo_split(s, 2, "jax-rloo", prompt=8, new_tokens=8, reps=1, ppo_config=critic_free(2)))
    rows += [_train("sft", s, 2, 64, impl, group="scaling", reps=1) for impl in ("jax-loop", "torch")]
    rows += [_train("sft", s, 2, 64, impl, group="attention", reps=1) for impl in ("jax-xla", "jax-blockwise")]
    return rows


def peer_of(row: dict, rows_by_id: dict) -> list[dict]:
    """The peer rows `row` (one of ours) is compared with: same group, task, shape, batch and length."""
    if row["backend"] != "jax" or row["kind"] not in ("train", "rollout", "ppo_split"):
        return []
    if row["impl"] == "jax-lora":  # adapters on one base: not the peers' full fine-tune (docs/results/lora.md#memory-of-the-rto-iteration-at-the-smollm2-135m-shape sets it beside ours)
        return []
    if row.get("ppo_config"):  # another estimator (no critic): the peers run GAE's; jax-loop's row is its pair
        return []
    peers = []
    base = row["id"].rsplit("/", 1)[0]
    for impl in ("torch", "torch-compile", "hf-generate", "trl", "tunix"):
        peer = rows_by_id.get(f"{base}/{impl}")
        if peer is not None:
            peers.append(peer)
    if row["kind"] == "train" and row["task"] == "dpo":
        trl = rows_by_id.get(base.replace("/dpo/", "/trl_dpo/") + "/trl")
        if trl is not None:
            peers.append(trl)
    return peers
