"""Scores of models on arrays, shared by the stages (rto_jax/pipeline/stages.py, evaluate.py).

    score_arrays(model, arrays, batch_size) -> [N]   a scalar-head model's scores of SFT-layout rows
    reward_accuracy(model, preference, batch_size)    a reward model's held-out preference accuracy
    sample_responses(...)                             one sample per prompt, SFT-layout arrays
    sequences(prompts, response_ids, response_mask)   SFT-layout arrays of prompts and responses
    fixed_size_batches(arrays, batch_size)            batches of one shape (the last one padded)
    weighted_mean([(metrics, rows), ...])             a row-weighted mean of per-batch metrics

Functions of arrays and models only: what reads a config or a workdir (the evaluation stage, the
judge, the token pages) is rto_jax/pipeline/evaluate.py.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rto_jax.data import pad_batch
from rto_jax.distributed import to_host
from rto_jax.sampling import SamplingConfig, generate_jit, response_inputs
from rto_jax.scoring import sequence_scores

SEQUENCE_KEYS = ("input_ids", "attention_mask", "positions", "response_mask")


def fixed_size_batches(arrays: dict, batch_size: int):
    """Batches of `batch_size` rows over all of `arrays` (the last one padded by repeating a row), with
    their valid row counts: one compiled shape."""
    n = len(next(iter(arrays.values())))
    for start in range(0, n, batch_size):
        yield pad_batch({k: v[start : start + batch_size] for k, v in arrays.items()}, batch_size)


def weighted_mean(values: list[tuple[dict, int]]) -> dict[str, float]:
    """Row-weighted mean of per-batch metric dicts `[(metrics, rows), ...]`."""
    values = [(to_host(m), n) for m, n in values]
    total = sum(n for _, n in values)
    return {k: float(sum(float(m[k]) * n for m, n in values) / total) for k in values[0][0]}


@functools.partial(jax.jit, static_argnums=0)
def _scores(graphdef, params, input_ids, attention_mask, positions, response_mask):
    return sequence_scores(nnx.merge(graphdef, params), input_ids, attention_mask, positions, response_mask)


def score_arrays(model, arrays: dict, batch_size: int, prefix: str = "") -> np.ndarray:
    """Scalar-head scores `[N]` of SFT-layout arrays (or of the `prefix`-ed keys of preference arrays)."""
    graphdef, params = nnx.split(model)
    out = []
    for batch, n in fixed_size_batches({k: arrays[prefix + k] for k in SEQUENCE_KEYS}, batch_size):
        out.append(to_host(_scores(graphdef, params, *(batch[k] for k in SEQUENCE_KEYS)))[:n])
    return np.concatenate(out)


def reward_accuracy(model, preference: dict, batch_size: int) -> dict:
    chosen = score_arrays(model, preference, batch_size, "chosen_")
    rejected = score_arrays(model, preference, batch_size, "rejected_")
    return {
        "accuracy": float(np.mean(chosen > rejected)),
        "margin": float(np.mean(chosen - rejected)),
        "score_chosen": float(np.mean(chosen)),
        "score_rejected": float(np.mean(rejected)),
    }


def sample_responses(graphdef, params, prompts: dict, batch_size: int, sampling: SamplingConfig, rng) -> dict:
    """One sample per prompt row: SFT-layout arrays (input_ids, attention_mask, positions, response_mask)."""
    parts = []
    for i, (batch, n) in enumerate(fixed_size_batches(prompts, batch_size)):
        ids, mask = jnp.asarray(batch["prompt_ids"]), jnp.asarray(batch["prompt_mask"])
        samples = generate_jit(graphdef, params, ids, mask, jax.random.fold_in(rng, i), sampling)
        input_ids, attention_mask, positions = response_inputs(ids, mask, samples)
        rows = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "positions": positions,
            "response_mask": samples.response_mask,
        }
        parts.append({k: v[:n] for k, v in to_host(rows).items()})
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def sequences(prompts: dict, response_ids, response_mask) -> dict:
    """SFT-layout arrays of prompts `[N, P]` and responses `[N, R]` (host numpy)."""
    attention_mask = np.concatenate([prompts["prompt_mask"], response_mask], axis=1).astype(np.int32)
    return {
        "input_ids": np.concatenate([prompts["prompt_ids"], response_ids], axis=1).astype(np.int32),
        "attention_mask": attention_mask,
        "positions": np.maximum(np.cumsum(attention_mask, axis=1) - 1, 0).astype(np.int32),
        "response_mask": np.asarray(response_mask, np.float32),
    }
