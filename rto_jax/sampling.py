"""Jitted autoregressive sampling with a preallocated KV cache.

Shapes are static: prompts are left-padded to P, at most R tokens are generated, the cache has
P + R slots. One prefill call fills slots 0..P-1; a `lax.while_loop` then decodes one token per
iteration and stops as soon as every row has produced EOS (or after R tokens).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from rto_jax.models.layers import compute_dtype, constrain
from rto_jax.models.transformer import default_positions
from rto_jax.objectives.sft import first_argmax


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int  # R
    eos_id: int
    pad_id: int
    temperature: float = 1.0  # log-probs are always of the temperature-scaled distribution
    top_k: int = 0  # 0: no top-k filter
    top_p: float = 1.0  # 1.0: no nucleus filter
    greedy: bool = False

    def __post_init__(self):
        if self.pad_id == self.eos_id:
            raise ValueError(f"SamplingConfig: pad_id ({self.pad_id}) must differ from eos_id, or EOS is masked out")
        if self.temperature <= 0:
            raise ValueError(f"SamplingConfig.temperature={self.temperature}: must be > 0 (use greedy=True for argmax)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingConfig.top_p={self.top_p}: must be in (0, 1]")


# Logical axes of a KV cache array `[L?, B, K, S, D]` (the leading `layers` axis only with scan_layers).
KV_CACHE_AXES = ("layers", "batch", "kv_heads", "length", None)  # [L, B, K, S, D]


def _constrain_cache(cache):
    """Pins the cache's sharding (batch over data x fsdp, kv heads over tensor) inside a sharded step; else a no-op."""
    return jax.tree.map(lambda c: constrain(c, KV_CACHE_AXES[-c.ndim :]), cache)


class Samples(NamedTuple):
    """What the sampler saw while it decoded; the log-probs and entropies are of the unfiltered
    distribution (before top-k / top-p), the same numbers a teacher-forced forward pass gives, so PPO
    reuses them instead of scoring the policy again."""

    tokens: jax.Array  # [B, R] int32, pad after the first EOS
    logprobs: jax.Array  # [B, R] float32, log pi(y_t | ...) at the sampling temperature, 0 where masked
    response_mask: jax.Array  # [B, R] float32, 1 up to and including the first EOS
    steps: jax.Array  # [] int32, decode iterations run (< R when every row stopped early)
    untempered_logprobs: jax.Array  # [B, R] float32, the same at temperature 1, 0 where masked
    entropy: jax.Array  # [B, R] float32, entropy of the tempered next-token distribution, 0 where masked


def filter_logits(logits, top_k: int, top_p: float):
    """Sets logits outside the top-k / nucleus to -inf. logits `[B, V]` (already temperature-scaled)."""
    neg_inf = jnp.finfo(logits.dtype).min
    if top_k > 0:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, neg_inf, logits)
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        # Keep the smallest prefix whose mass reaches top_p: a token stays if the mass before it is < top_p.
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        cutoff = jnp.min(jnp.where(mass_before < top_p, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, neg_inf, logits)
    return logits


def _next_token(logits, rng, config: SamplingConfig):
    """Picks the next token `[B]`; returns it with its log-prob under the temperature-scaled, unfiltered
    distribution, its log-prob at temperature 1, and that tempered distribution's entropy (each `[B]`)."""
    logits = logits.astype(jnp.float32)
    scaled = logits / config.temperature
    if config.greedy:
        token = first_argmax(scaled)
    else:
        token = jax.random.categorical(rng, filter_logits(scaled, config.top_k, config.top_p), axis=-1)
    pick = lambda logp: jnp.take_along_axis(logp, token[:, None], axis=-1)[:, 0]
    logp = jax.nn.log_softmax(scaled, axis=-1)
    entropy = -jnp.sum(jnp.exp(logp) * logp, axis=-1)
    untempered = pick(jax.nn.log_softmax(logits, axis=-1)) if config.temperature != 1.0 else pick(logp)
    return token.astype(jnp.int32), pick(logp), untempered, entropy


def generate(
    graphdef: nnx.GraphDef, params, prompt_ids, prompt_mask, rng, config: SamplingConfig, repeats: int = 1
) -> Samples:
    """Samples up to R tokens after each left-padded prompt. Pure; jit with graphdef, config and repeats static.

    prompt_ids, prompt_mask: `[B / n, P]` (left-padded), each answered n = `repeats` times (rows i*n ..
    i*n + n - 1 of the output). The prompts are prefilled once and their KV cache repeated, so n
    answers cost one prefill: the same samples as `repeats=1` on the prompts repeated n times.
    Returns `Samples` of `[B, R]` arrays.
    """
    model = nnx.merge(graphdef, params)
    prompts, prompt_len = prompt_ids.shape
    batch, new = prompts * repeats, config.max_new_tokens
    cache = _constrain_cache(model.init_cache(prompts, prompt_len + new, compute_dtype(model.config)))
    key_mask = jnp.concatenate([prompt_mask.astype(jnp.int32), jnp.zeros((prompts, new), jnp.int32)], axis=1)
    # Prefill: only the last prompt position needs the vocabulary projection.
    hidden, cache = model.decoder(prompt_ids, key_mask, default_positions(prompt_mask), cache, 0)
    logits = model.logits_from_hidden(hidden[:, -1:])
    prompt_lengths = jnp.sum(prompt_mask.astype(jnp.int32), axis=1)
    if repeats > 1:  # every array with a batch axis, prompt i's row repeated n times in place
        logits, key_mask, prompt_lengths = (jnp.repeat(x, repeats, axis=0) for x in (logits, key_mask, prompt_lengths))
        # the cache `[L?, B, K, S, D]`: batch is the fourth axis from the end
        cache = _constrain_cache(jax.tree.map(lambda c: jnp.repeat(c, repeats, axis=c.ndim - 4), cache))

    def cond(carry):
        t, done = carry[0], carry[1]
        return (t < new) & ~jnp.all(done)

    def body(carry):
        t, done, tokens, logprobs, mask, last_logits, cache, key_mask = carry
        token, *stats = _next_token(last_logits, jax.random.fold_in(rng, t), config)
        token = jnp.where(done, config.pad_id, token)
        tokens = tokens.at[:, t].set(token)
        # logprobs [3, B, R]: tempered log-prob, untempered log-prob, entropy
        logprobs = logprobs.at[:, :, t].set(jnp.where(done, 0.0, jnp.stack(stats)))
        mask = mask.at[:, t].set(jnp.where(done, 0.0, 1.0))
        done = done | (token == config.eos_id)
        key_mask = key_mask.at[:, prompt_len + t].set(1)
        logits, cache = model.forward_cached(
            token[:, None], key_mask, (prompt_lengths + t)[:, None], cache, prompt_len + t
        )
        cache = _constrain_cache(cache)
        return t + 1, done, tokens, logprobs, mask, logits[:, -1], cache, key_mask

    init = (
        jnp.int32(0),
        jnp.zeros((batch,), bool),
        jnp.full((batch, new), config.pad_id, jnp.int32),
        jnp.zeros((3, batch, new), jnp.float32),
        jnp.zeros((batch, new), jnp.float32),
        logits[:, -1],
        cache,
        key_mask,
    )
    steps, _, tokens, stats, mask, _, _, _ = jax.lax.while_loop(cond, body, init)
    return Samples(tokens, stats[0], mask, steps, untempered_logprobs=stats[1], entropy=stats[2])


generate_jit = jax.jit(generate, static_argnums=(0, 5, 6))


def sample(model: nnx.Module, prompt_ids, prompt_mask, rng, config: SamplingConfig, repeats: int = 1) -> Samples:
    """Convenience wrapper: splits `model` and calls the jitted `generate`."""
    graphdef, params = nnx.split(model)
    return generate_jit(graphdef, params, jnp.asarray(prompt_ids), jnp.asarray(prompt_mask), rng, config, repeats)


def response_inputs(prompt_ids, prompt_mask, samples: Samples):
    """The CONTRACT layout of prompt + response: `input_ids`, `attention_mask`, `positions` `[B, P+R]`."""
    input_ids = jnp.concatenate([prompt_ids, samples.tokens], axis=1)
    attention_mask = jnp.concatenate([prompt_mask.astype(jnp.int32), samples.response_mask.astype(jnp.int32)], 1)
    return input_ids, attention_mask, default_positions(attention_mask)
