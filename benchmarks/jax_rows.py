"""Rows measured on our JAX code: matmul ceiling, training steps, sampler rollout, a PPO iteration's split."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks.timing import Unavailable, measure
from benchmarks.workloads import FIRST_TOKEN, SHAPES
from rto_jax.models import CausalLM, LoraConfig, ModelConfig, ScalarHeadModel, default_positions, with_adapters
from rto_jax.models import attention
from rto_jax.models.layers import compute_dtype
from rto_jax.objectives.advantages import needs_critic
from rto_jax.objectives.token_rewards import bind, ppo, rto
from rto_jax.sampling import SamplingConfig, generate_jit
from rto_jax.train import (
    DPOLoss,
    Experience,
    OptimizerConfig,
    PPOConfig,
    TrainState,
    create_ppo_state,
    create_shared_base_ppo_state,
    make_optimizer,
    make_ppo_fns,
    RewardModelLoss,
    SFTLoss,
    make_train_step,
)

PAD = 0


def _config(row: dict) -> ModelConfig:
    if row.get("attention") == "cudnn" and jax.default_backend() != "gpu":
        raise Unavailable(f"cuDNN attention needs a GPU (JAX's backend here: {jax.default_backend()})")
    return ModelConfig(
        **SHAPES[row["shape"]],
        scan_layers=row.get("layout") == "scan",
        dtype=row.get("dtype", "float32"),
        attention=row.get("attention", "auto"),
    )


def _sync(tree):
    return jax.block_until_ready(tree)


def device_kind() -> str:
    """Where the rows run ("cpu", "gpu", "tpu"): a ratio is only taken between rows on the same kind."""
    return jax.default_backend()


def device_peak_mb() -> float | None:
    """Peak bytes in use on the first device so far (MB); None where the backend keeps no such count (CPU)."""
    stats = jax.local_devices()[0].memory_stats()
    return stats["peak_bytes_in_use"] / 2**20 if stats and "peak_bytes_in_use" in stats else None


def ceiling(row: dict) -> dict:
    """Best matmul rate over the sizes (float32, or the row's dtype): jitted `jnp.dot` of two n x n matrices."""
    out = {"by_size": {}}
    dot = jax.jit(jnp.dot)
    dtype = jnp.dtype(row.get("dtype", "float32"))
    for n in row["sizes"]:
        a = jax.random.normal(jax.random.key(0), (n, n), dtype)
        b = jax.random.normal(jax.random.key(1), (n, n), dtype)
        timing = measure(lambda a=a, b=b: dot(a, b), row["warmup"], row["reps"], _sync)
        out["by_size"][str(n)] = 2 * n**3 / timing["median_s"] / 1e9
        out["median_s"] = timing["median_s"]  # of the largest size, the last one
    out["gflops"] = max(out["by_size"].values())
    out["bandwidth_gbs"] = _read_bandwidth(row["warmup"], row["reps"], row.get("read_mb", 1024))
    return out


def _read_bandwidth(warmup: int, reps: int, megabytes: int = 1024) -> float:
    """Memory read rate in GB/s: a jitted sum over a float32 array far larger than the caches (the
    access pattern of a batch-1 decode step, which streams every weight once)."""
    x = jnp.ones((megabytes * 2**20 // 4,), jnp.float32)
    total = jax.jit(jnp.sum)
    timing = measure(lambda: total(x), warmup, reps, _sync)
    return x.size * 4 / timing["median_s"] / 1e9


def _token_ids(rng, shape, vocab):
    return jnp.asarray(rng.integers(FIRST_TOKEN, vocab, shape), jnp.int32)


def _sequences(rng, seqs, length, response, vocab, prefix=""):
    """Full-length rows (no padding) in the CONTRACT layout; response = the last `response` columns."""
    mask = jnp.ones((seqs, length), jnp.int32)
    return {
        f"{prefix}input_ids": _token_ids(rng, (seqs, length), vocab),
        f"{prefix}attention_mask": mask,
        f"{prefix}positions": default_positions(mask),
        f"{prefix}response_mask": jnp.ones((seqs, response), jnp.float32),
    }


def _optimizer():
    # AdamW after global-norm clipping, as every trainer here uses; the peers do the same.
    return make_optimizer(OptimizerConfig(learning_rate=1e-5, schedule="constant"))


def train(row: dict, measure=measure) -> dict:
    """Median step time of SFT / reward model / DPO (reference in the step) / PPO update on random data.

    `measure` (benchmarks.timing's) is passed in so that benchmarks.profile can take the timed callables."""
    cfg = _config(row)
    rng = np.random.default_rng(0)
    seqs, length = row["batch"], row["seq"]
    response = length - row["prompt"]
    task = row["task"]
    key = jax.random.key(0)
    if task in ("rm", "dpo") and seqs % 2:
        raise ValueError(f"{row['id']}: a preference batch needs an even number of sequences")
    if task == "sft":
        step = make_train_step(SFTLoss())
        state = TrainState.create(CausalLM(cfg, nnx.Rngs(0)), _optimizer())
        batch = _sequences(rng, seqs, length, response, cfg.vocab_size)
    elif task in ("rm", "dpo"):
        pairs = seqs // 2
        batch = {
            **_sequences(rng, pairs, length, response, cfg.vocab_size, "chosen_"),
            **_sequences(rng, pairs, length, response, cfg.vocab_size, "rejected_"),
        }
        if task == "rm":
            step = make_train_step(RewardModelLoss())
            state = TrainState.create(ScalarHeadModel(cfg, nnx.Rngs(0)), _optimizer())
        else:
            step = make_train_step(DPOLoss(beta=0.1))
            policy = CausalLM(cfg, nnx.Rngs(0))
            reference = jax.tree.map(jnp.copy, nnx.split(policy)[1])
            state = TrainState.create(policy, _optimizer()).replace(frozen={"ref": reference})
    elif task == "ppo":
        state, (_, update_fn, _), _ = _ppo_setup(cfg, response, update_only=True)
        data = _sequences(rng, seqs, length, response, cfg.vocab_size)
        batch = Experience(
            input_ids=data["input_ids"],
            attention_mask=data["attention_mask"],
            positions=data["positions"],
            response_mask=data["response_mask"],
            logp_old=jnp.asarray(-rng.exponential(1.0, (seqs, response)), jnp.float32),
            values=jnp.asarray(rng.normal(size=(seqs, response)), jnp.float32),
            advantages=jnp.asarray(rng.normal(size=(seqs, response)), jnp.float32),
            returns=jnp.asarray(rng.normal(size=(seqs, response)), jnp.float32),
            group_ids=jnp.arange(seqs, dtype=jnp.int32),  # one prompt per row (GAE's update does not read them)
        )
        step = update_fn
    else:
        raise ValueError(f"{row['id']}: unknown task {task!r}")

    holder = {"state": state}

    def one_step():
        holder["state"], metrics = step(holder["state"], batch, key)
        return holder["state"], metrics

    result = measure(one_step, row["warmup"], row["reps"], _sync)
    # What the step's attention ran as (`auto` resolved for this backend, dtype and length).
    result["compute_dtype"] = jnp.dtype(compute_dtype(cfg)).name  # what the row's dtype reached
    result["attention_impl"] = attention.resolve(
        cfg.attention,
        backend=jax.default_backend(),
        dtype=compute_dtype(cfg),
        num_keys=length,
        num_queries=length,
        batch_heads=seqs * cfg.num_heads,
    )
    return result


# The adapters of the "jax-lora" rows: rank 16 on every projection (alpha 32).
BENCH_ADAPTERS = LoraConfig(rank=16, alpha=32.0)


def _ppo_setup(
    cfg: ModelConfig,
    response: int,
    beta_dpo: float = 0.0,
    greedy: bool = True,
    adapters=None,
    ppo_config=None,
    update_only: bool = False,
):
    """PPO state (policy, critic, reward model, reference; DPO policy when beta_dpo != 0) and jitted fns.
    adapters: PPO on one shared base instead (policy, critic, reward model and DPO policy as adapters).
    ppo_config: PPOConfig fields a row sets (e.g. {"estimator": "rloo", "samples_per_prompt": 4}); under a
    critic-free estimator the state holds no critic, so neither its weights nor its optimizer state exist.
    update_only: the state holds only what `ppo_update` reads (policy and critic: no reference or reward model),
    as the PyTorch peer of the PPO update row holds; such a state cannot make experience."""
    # EOS = vocab_size: an id the model can never emit, so every rollout runs all `response` tokens.
    sampling = SamplingConfig(max_new_tokens=response, eos_id=cfg.vocab_size, pad_id=PAD, greedy=greedy)
    token_reward = bind(rto, beta_dpo=beta_dpo) if beta_dpo else bind(ppo)
    # The rows measure one epoch.
    config = PPOConfig(sampling=sampling, token_reward=token_reward, ppo_epochs=1, **(ppo_config or {}))
    with_critic = needs_critic(config.estimator)
    if adapters is None:
        policy = CausalLM(cfg, nnx.Rngs(0))
        critic = ScalarHeadModel.from_causal_lm(policy, nnx.Rngs(1)) if with_critic else None
        reward = None if update_only else ScalarHeadModel(cfg, nnx.Rngs(2))
        frozen = {} if update_only else {"ref": nnx.split(policy)[1]}
        if beta_dpo:
            frozen["dpo"] = nnx.split(CausalLM(cfg, nnx.Rngs(3)))[1]
        state = create_ppo_state(policy, critic, _optimizer(), _optimizer(), frozen=frozen, reward_model=reward)
    else:
        base = CausalLM(cfg, nnx.Rngs(0))
        reward = with_adapters(ScalarHeadModel(cfg, nnx.Rngs(2), decoder=base.decoder), adapters, nnx.Rngs(4))
        frozen = {"dpo": with_adapters(base, adapters, nnx.Rngs(3))} if beta_dpo else {}
        critic = reward.with_affine_output(1.0, 0.0) if with_critic else None
        state = create_shared_base_ppo_state(
            base, adapters, critic, _optimizer(), _optimizer(),
            frozen=frozen, reward_model=reward, rngs=nnx.Rngs(1),
        )  # fmt: skip
    return state, make_ppo_fns(config), config


def _rollout_model(row: dict):
    """SmolLM2-135M from the real GGUF when the shape is the 135M one and the file is present, else random init."""
    cfg = _config(row)
    if row["shape"] == "smollm2-135m":
        from rto_jax.models import load_pretrained
        from rto_jax.models.smollm2 import find_smollm2_gguf

        path = find_smollm2_gguf()
        if path is not None:
            model = load_pretrained(path, kind="lm", scan_layers=cfg.scan_layers, dtype=cfg.dtype)
            return model, f"real weights: {path.name}"
    return CausalLM(cfg, nnx.Rngs(0)), "random init"


def rollout(row: dict, measure=measure) -> dict:
    """Prefill and decode tokens/s of the jitted sampler (greedy, EOS never emitted).

    A call with R new tokens runs the prefill plus R one-token forwards (the last one's logits unused);
    one with 1 new token runs the prefill plus one. So a decode step takes (t_R - t_1) / (R - 1) and the
    prefill t_1 minus one step.
    """
    model, weights = _rollout_model(row)
    batch, prompt, new = row["batch"], row["prompt"], row["new_tokens"]
    vocab = model.config.vocab_size
    rng = np.random.default_rng(0)
    prompt_ids = _token_ids(rng, (batch, prompt), vocab)
    prompt_mask = jnp.ones((batch, prompt), jnp.int32)
    graphdef, params = nnx.split(model)
    key = jax.random.key(0)

    def call(max_new):
        config = SamplingConfig(max_new_tokens=max_new, eos_id=vocab, pad_id=PAD, greedy=True)
        return lambda: generate_jit(graphdef, params, prompt_ids, prompt_mask, key, config)

    full = measure(call(new), row["warmup"], row["reps"], _sync)
    samples = call(new)()
    generated = int(jnp.sum(samples.response_mask))
    if generated != batch * new:
        raise RuntimeError(f"{row['id']}: generated {generated} tokens, expected {batch * new}")
    one = measure(call(1), row["warmup"], row["reps"], _sync)
    return _split_rollout(full, one, new, weights)


def _split_rollout(full: dict, one: dict, new: int, weights: str) -> dict:
    step_s = max(full["median_s"] - one["median_s"], 0.0) / max(new - 1, 1)
    return {
        "median_s": full["median_s"],
        "times_s": full["times_s"],
        "first_s": full["first_s"],
        "one_token_median_s": one["median_s"],
        "decode_step_s": step_s,
        "prefill_s": max(one["median_s"] - step_s, 1e-9),
        "weights": weights,
    }


def ppo_split(row: dict, measure=measure) -> dict:
    """One RTO PPO iteration at rollout batch B, timed in pieces with the jitted functions PPO uses:
    the sampler alone, `make_experience` (sampler + the scoring forwards + rewards + advantages), `ppo_update`.
    Scoring = make_experience - sampler. Sampling is non-greedy (temperature 1), as in training.
    impl "jax-lora": the same iteration on one shared base (`BENCH_ADAPTERS`). A row's `ppo_config` sets
    PPOConfig fields: "jax-rloo" is the iteration with a critic-free estimator, B / n prompts answered n
    times each (the same B responses, without the critic's forward, backward and optimizer state)."""
    cfg = _config(row)
    batch, prompt, new = row["batch"], row["prompt"], row["new_tokens"]
    adapters = BENCH_ADAPTERS if row["impl"] == "jax-lora" else None
    state, (experience_fn, update_fn, _), config = _ppo_setup(
        cfg, new, beta_dpo=0.05, greedy=False, adapters=adapters, ppo_config=row.get("ppo_config")
    )
    n = config.samples_per_prompt
    if batch % n:
        raise ValueError(f"{row['id']}: batch {batch} is not a multiple of samples_per_prompt {n}")
    policy_params = state.lm_params(state.policy.params)  # on a shared base: the adapters with the base
    rng = np.random.default_rng(0)
    prompts = {
        "prompt_ids": _token_ids(rng, (batch // n, prompt), cfg.vocab_size),
        "prompt_mask": jnp.ones((batch // n, prompt), jnp.int32),
    }
    # The sampler alone as make_experience calls it: B / n prompts, each prefilled once and answered n times.
    key = jax.random.key(0)
    ids, mask = prompts["prompt_ids"], prompts["prompt_mask"]
    sampler = measure(
        lambda: generate_jit(state.policy.graphdef, policy_params, ids, mask, key, config.sampling, n),
        row["warmup"],
        row["reps"],
        _sync,
    )
    experience = measure(lambda: experience_fn(state, prompts, key), row["warmup"], row["reps"], _sync)
    exp, _ = experience_fn(state, prompts, key)
    if exp.input_ids.shape[0] != batch:
        raise RuntimeError(f"{row['id']}: make_experience returned {exp.input_ids.shape[0]} rows, expected {batch}")
    holder = {"state": state}

    def update():
        holder["state"], metrics = update_fn(holder["state"], exp, key)
        return holder["state"], metrics

    upd = measure(update, row["warmup"], row["reps"], _sync)
    rollout_s = sampler["median_s"]
    scoring_s = max(experience["median_s"] - rollout_s, 0.0)
    update_s = upd["median_s"]
    split = {"rollout": rollout_s, "scoring": scoring_s, "update": update_s}
    total = sum(split.values())
    return {
        "median_s": total,
        "times_s": [],
        "first_s": sampler["first_s"] + experience["first_s"] + upd["first_s"],
        "split_s": split,
        # benchmarks.profile's `measure` only captures the calls and reports 0 s: no shares then.
        "split_share": {part: seconds / total if total > 0 else 0.0 for part, seconds in split.items()},
        "make_experience_s": experience["median_s"],
        # What ran (benchmarks.run counts the FLOPs from it): the estimator, and whether a critic was trained.
        "estimator": config.estimator,
        "samples_per_prompt": n,
        "critic": state.critic is not None,
    }


RUNNERS = {"ceiling": ceiling, "train": train, "rollout": rollout, "ppo_split": ppo_split}
