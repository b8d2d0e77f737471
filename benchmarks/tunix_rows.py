"""Peer rows of google-tunix (JAX): its DPO step and its PPO iteration on our shapes, random init.

Runs in tunix's own environment (`make tunix-env`), imports nothing from rto_jax; the models and
trainers are built by third_party/tunix_peers. tunix has no RTO: its PPO iteration scores four models
(reference and old-policy log-probs, critic values, reward model), as many forward passes as our RTO
iteration (reference and DPO-policy log-probs, critic, reward model; our policy's come from the sampler).
"""

from __future__ import annotations

import statistics
import time

import jax
import numpy as np
from flax import nnx

from benchmarks.timing import measure
from benchmarks.workloads import FIRST_TOKEN, SHAPES
from third_party import tunix_peers


def train(row: dict) -> dict:
    """tunix's `DPOTrainer` step: the reference log-probs (`_prepare_inputs`) then the policy's jitted
    forward, backward and AdamW update (`jit_train_and_eval_step`), the two calls its `train()` makes."""
    if row["task"] != "dpo":
        raise ValueError(f"{row['id']}: tunix rows cover DPO only, not {row['task']!r}")
    shape = SHAPES[row["shape"]]
    pairs, response = row["batch"] // 2, row["seq"] - row["prompt"]
    trainer = tunix_peers.dpo_trainer(
        tunix_peers.llama(shape, 0), tunix_peers.llama(shape, 0), max_steps=max(row["warmup"], 1) + row["reps"]
    )
    train_step, _ = trainer.jit_train_and_eval_step()
    rng = np.random.default_rng(0)
    ids = lambda length: rng.integers(FIRST_TOKEN, shape["vocab_size"], (pairs, length))
    batch = tunix_peers.dpo_input(ids(row["prompt"]), ids(response), ids(response))

    def step():
        loss, _, _ = train_step(trainer._prepare_inputs(batch))
        return loss

    return measure(step, row["warmup"], row["reps"], jax.block_until_ready)


def ppo_iteration(row: dict) -> dict:
    """tunix's PPO iteration (`PPOLearner._run_global_step`: rollout with its vanilla sampler, the four
    scoring forwards, GAE, one actor and one critic update), timed one iteration at a time."""
    shape = SHAPES[row["shape"]]
    batch, prompt, new = row["batch"], row["prompt"], row["new_tokens"]
    warm = max(row["warmup"], 1)
    iterations = warm + row["reps"]
    # EOS = the last id: random-init models spread their mass over 49k ids, so rows run all `new` tokens.
    learner, cluster = tunix_peers.ppo_learner(
        shape, batch=batch, prompt=prompt, new_tokens=new, iterations=iterations, eos_id=shape["vocab_size"] - 1
    )
    times, lengths = [], []
    run_step, generate = learner._run_global_step, cluster.generate

    def timed_step(*args, **kwargs):
        start = time.perf_counter()
        out = run_step(*args, **kwargs)
        jax.block_until_ready(nnx.state(cluster.actor_trainer.model))
        times.append(time.perf_counter() - start)
        return out

    def counted_generate(*args, **kwargs):
        out = generate(*args, **kwargs)
        lengths.extend(len(tokens) for tokens in out.tokens)
        return out

    learner._run_global_step, cluster.generate = timed_step, counted_generate
    rng = np.random.default_rng(0)
    words = lambda: " ".join(f"t{i}" for i in rng.integers(FIRST_TOKEN, shape["vocab_size"], prompt))
    learner.train([{"prompts": [words() for _ in range(batch)]} for _ in range(iterations)])
    if len(times) != iterations:
        raise RuntimeError(f"{row['id']}: tunix ran {len(times)} PPO iterations, expected {iterations}")
    if min(lengths) != new:
        raise RuntimeError(f"{row['id']}: tunix generated {min(lengths)}..{max(lengths)} tokens, expected {new}")
    return {"first_s": times[0], "times_s": times[warm:], "median_s": statistics.median(times[warm:])}


def device_kind() -> str:
    """Where the rows run ("cpu", "gpu", "tpu"): a ratio is only taken between rows on the same kind."""
    return jax.default_backend()


RUNNERS = {"train": train, "ppo_split": ppo_iteration}
