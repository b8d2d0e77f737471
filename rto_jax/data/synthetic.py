"""A small offline alignment benchmark with a known gold reward (in the spirit of Gao et al. 2022,
"Scaling Laws for Reward Model Overoptimization"), sized for a 2-layer d=64 decoder on a CPU.

Everything is drawn from ``numpy.random.default_rng(seed)`` by ``SyntheticTask.create(cfg, seed)``;
the same (cfg, seed) always gives the same task.

Vocabulary (ids)
  0 pad, 1 eos (pad != eos), 2 .. 2+K-1 topic tokens, then C content tokens.  V = 2 + K + C.

Prompts  ``[topic, c_1 .. c_n]``: a topic token and n in [min_context_tokens, P-1] distinct content
  tokens (the "context"), left-padded to P.  Variable true length, like real prompts.

Reference "language" (what SFT imitates): a prompt-conditioned random n-gram source.
  For topic k and the last (ngram_order - 1) content tokens s (start-padded):
      p(c | x, y_<h) = (1 - e_h) * [(1 - copy_prob) * T[k, s, c] + copy_prob * 1[c in ctx] / |ctx|]
      p(eos | x, y_<h) = e_h,   e_h = eos_hazard if h >= min_response_length else 0
  with T[k, s, :] ~ Dirichlet(source_concentration).  Lengths are roughly geometric, mean well
  under R; a few reference samples reach R without EOS.  The exact log-prob of any response is
  ``reference_logprobs``; the source is independent of the gold reward (reference samples are
  "average", not good or bad on purpose).

Gold reward r*(x, y) in [-1, 1] (hidden from every method; only preference labels derived from it
are training data).  With topic k, context set S, content tokens y_1..y_H before the first EOS
(EOS itself excluded from H) and ``ended`` = an EOS was emitted within R:
      q_h      = (w[k, y_h] + b[y_{h-1}, y_h]) / (1 + bigram_scale)   in [-1, 1]
                 (w[k, c] ~ U(-1, 1) per topic and content token; b sparse +-bigram_scale bigram
                 bonuses, immediate repeats always -bigram_scale, no bonus after the start or
                 after a non-content token;
                 q_h = -1 for tokens outside the content vocabulary: pad/topic ids)
      quality  = mean_h q_h                                   (0 if H == 0)
      coverage = |S intersect {y_h}| / |S|                    (prompt tokens mentioned)
      length   = max(0, 1 - |H - target_length| / target_length)
      r*       = a_q quality + a_c (2 coverage - 1) + a_l (2 length - 1) + a_e (2 ended - 1)
  with non-negative weights a_* summing to 1, so r* is in [-1, 1].  Credit is token-level and
  prompt-dependent (which tokens are good depends on the topic, on the previous token and on the
  prompt's context), plus sequence-level terms (length, stopping).  ``gold_token_credit`` splits r*
  into per-token credits that sum to r*; ``max_gold_reward`` gives the exact optimum per prompt
  (dynamic programme).

Why it is fair: the gold reward is a fixed function of (x, y) that no method sees; it is neither a
sum of per-token terms (which would match DPO's implicit reward or a dense token reward exactly)
nor a pure end-of-sequence signal (which would leave token rewards nothing to find): quality is a
per-token *mean*, coverage is a set function, length and stopping are global.  Preference labels
carry Bradley-Terry noise calibrated to human-like agreement (~72%, as on TL;DR).

Arrays follow CONTRACT.md / ``rto_jax.data.tokenize``: prompt_ids/prompt_mask/prompt_positions
[B,P] int32 (left-padded), response_ids [B,R] int32 right-padded with pad, response_mask [B,R]
float32 (1 up to and including the first EOS), SFT batches (input_ids, attention_mask int32,
positions, response_mask float32, prompt_ids, prompt_mask) and preference batches (chosen_*,
rejected_* sharing prompt_ids/prompt_mask).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "PAD_ID",
    "EOS_ID",
    "SyntheticTaskConfig",
    "SyntheticTask",
    "LabelCalibration",
    "make_sft_batch",
    "make_preference_batch",
    "label_preferences",
    "expected_agreement",
    "calibrate_label_temperature",
    "best_of_n_kl",
    "best_of_n_frontier",
    "summarize_responses",
]

PAD_ID = 0
EOS_ID = 1
_TOPIC_OFFSET = 2  # topic k has id 2 + k; content token c has id 2 + K + c


@dataclasses.dataclass(frozen=True)
class SyntheticTaskConfig:
    """What defines a task (with the seed).  Defaults: V = 38, P = 6, R = 24.

    Fields:
      num_topics: K topics; each has its own source transition table and gold token weights.
      num_content_tokens: C content tokens (the only tokens the reference source emits).
      prompt_length: P, the static (left-padded) prompt length: topic + up to P-1 context tokens.
      min_context_tokens: fewest context tokens in a prompt (the count is uniform in [min, P-1]).
      max_response_length: R, the static response length (EOS included when present).
      ngram_order: order of the reference source (2 = bigram; 1 = unigram per topic).
      source_concentration: Dirichlet alpha of each transition row; smaller = sharper source.
      copy_prob: probability mass the source gives to copying a uniformly chosen context token.
      min_response_length: the source never stops before this many content tokens.
      eos_hazard: the source's per-step stop probability after min_response_length.
      target_length: the content length (EOS excluded) the gold length term prefers.
      bigram_density: fraction of (prev, next) content pairs with a +-bigram_scale gold bonus.
      bigram_scale: size of the bigram bonus (and of the penalty for repeating a token).
      quality_weight, coverage_weight, length_weight, eos_weight: a_q, a_c, a_l, a_e of r*
        (non-negative, summing to 1, so r* is in [-1, 1]).
      label_temperature: Bradley-Terry temperature of preference labels; None = calibrate it on
        the pairs being labelled to reach target_agreement.
      target_agreement: expected agreement of labels with the gold ordering when calibrating.
    """

    num_topics: int = 4
    num_content_tokens: int = 32
    prompt_length: int = 6
    min_context_tokens: int = 1
    max_response_length: int = 24
    ngram_order: int = 2
    source_concentration: float = 0.3
    copy_prob: float = 0.25
    min_response_length: int = 2
    eos_hazard: float = 0.12
    target_length: int = 8
    bigram_density: float = 0.15
    bigram_scale: float = 0.5
    quality_weight: float = 0.6
    coverage_weight: float = 0.2
    length_weight: float = 0.1
    eos_weight: float = 0.1
    label_temperature: float | None = None
    target_agreement: float = 0.72

    def __post_init__(self):
        weights = (self.quality_weight, self.coverage_weight, self.length_weight, self.eos_weight)
        if min(weights) < 0 or abs(sum(weights) - 1.0) > 1e-6:
            raise ValueError(f"gold reward weights must be >= 0 and sum to 1, got {weights}")
        if not 1 <= self.min_context_tokens <= self.prompt_length - 1:
            raise ValueError("need 1 <= min_context_tokens <= prompt_length - 1")
        if self.prompt_length - 1 > self.num_content_tokens:
            raise ValueError("context tokens are distinct: prompt_length - 1 <= num_content_tokens")
        if self.ngram_order < 1 or self.num_topics < 1 or self.max_response_length < 1:
            raise ValueError("ngram_order, num_topics and max_response_length must be >= 1")
        if not (0 <= self.copy_prob <= 1 and 0 < self.eos_hazard <= 1):
            raise ValueError("need 0 <= copy_prob <= 1 and 0 < eos_hazard <= 1")
        if self.target_length < 1 or not 0.5 < self.target_agreement < 1:
            raise ValueError("need target_length >= 1 and 0.5 < target_agreement < 1")

    @property
    def vocab_size(self) -> int:
        return _TOPIC_OFFSET + self.num_topics + self.num_content_tokens


# ----------------------------------------------------------------------------------------------
# Masks shared by the gold reward (numpy and jnp) and the source log-probs.


def _alive(xp, response_ids, response_mask, eos_id):
    """[B,R] bool: the response proper, i.e. the mask's leading run up to and incl. the first EOS.

    Everything after the first EOS, and after the first masked-out column, is ignored, so garbage
    in padded positions can never change a reward.
    """
    prefix = xp.cumprod((response_mask > 0).astype(xp.int32), axis=1) > 0
    eos_here = (response_ids == eos_id) & prefix
    eos_before = (xp.cumsum(eos_here.astype(xp.int32), axis=1) - eos_here.astype(xp.int32)) > 0
    return prefix & ~eos_before


def _prompt_parts(xp, prompt_ids, prompt_mask, vocab_size, num_topics):
    """Topic index [B] and context-token indicator [B, V] (bool) of left-padded prompts."""
    real = prompt_mask > 0
    first = xp.argmax(real, axis=1)  # the topic token is the first real token
    topic_tok = xp.take_along_axis(prompt_ids, first[:, None], axis=1)[:, 0]
    topic = xp.clip(topic_tok - _TOPIC_OFFSET, 0, num_topics - 1)
    cols = xp.arange(prompt_ids.shape[1])
    is_ctx = real & (cols[None, :] > first[:, None])
    onehot = prompt_ids[:, :, None] == xp.arange(vocab_size)[None, None, :]
    ctx = xp.any(onehot & is_ctx[:, :, None], axis=1)
    is_content = xp.arange(vocab_size) >= _TOPIC_OFFSET + num_topics
    return topic, ctx & is_content[None, :]


class _GoldParts(NamedTuple):
    reward: Any  # [B] float32
    credit: Any  # [B,R] float32, sums to reward over each row
    quality_credit: Any  # [B,R] float32, the quality term's share of `credit` (a_q q_h / H per content token)
    quality: Any  # [B]
    coverage: Any  # [B]
    length_score: Any  # [B]
    ended: Any  # [B] bool
    length: Any  # [B] int, content tokens (EOS excluded)


# ----------------------------------------------------------------------------------------------
# The task.


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["seed", "transition", "token_weight", "bigram_bonus", "quality_table"],
    meta_fields=["config"],
)
@dataclasses.dataclass(frozen=True, eq=False)
class SyntheticTask:
    """All tables of one task.  Build with ``SyntheticTask.create(cfg, seed)``.

    A pytree whose leaves are its seed and tables (its config is static): a compiled program that takes
    the task's gold functions as `jax.tree_util.Partial(SyntheticTask.gold_credit_jax, task)` traces
    the tables, so the tasks of two seeds share one program.

    Tables (numpy):
      transition    [K, S, C] float64  source next-content-token probs, S = (C+1)^(order-1) states
      token_weight  [K, V] float32     gold w[k, id]: U(-1,1) on content ids, -1 elsewhere
      bigram_bonus  [V+1, V] float32   gold b[prev, next]; row V is the start state (all 0)
      quality_table [K, V+1, V] float32  q for (topic, prev or start, next); -1 for non-content next
    """

    config: SyntheticTaskConfig
    seed: int
    transition: np.ndarray
    token_weight: np.ndarray
    bigram_bonus: np.ndarray
    quality_table: np.ndarray

    # --------------------------------------------------------------------------------- creation
    @classmethod
    def create(cls, config: SyntheticTaskConfig = SyntheticTaskConfig(), seed: int = 0) -> "SyntheticTask":
        rng = np.random.default_rng(seed)
        k, c, v = config.num_topics, config.num_content_tokens, config.vocab_size
        off = _TOPIC_OFFSET + k
        num_states = (c + 1) ** (config.ngram_order - 1)
        transition = rng.dirichlet(np.full(c, config.source_concentration), size=(k, num_states))

        token_weight = np.full((k, v), -1.0, np.float32)
        token_weight[:, off:] = rng.uniform(-1.0, 1.0, size=(k, c))

        # Sparse +-scale bonuses on content bigrams; repeating the previous token is always
        # penalised, so the optimum is not one good token repeated.
        signs = rng.choice(
            [-1.0, 0.0, 1.0],
            size=(c, c),
            p=[config.bigram_density / 2, 1 - config.bigram_density, config.bigram_density / 2],
        )
        np.fill_diagonal(signs, -1.0)
        bigram_bonus = np.zeros((v + 1, v), np.float32)
        bigram_bonus[off:v, off:] = config.bigram_scale * signs

        q = (token_weight[:, None, :] + bigram_bonus[None]) / (1.0 + config.bigram_scale)
        q[:, :, :off] = -1.0  # pad / eos / topic ids as response tokens (eos column is never read)
        return cls(config, seed, transition, token_weight, bigram_bonus, q.astype(np.float32))

    # ------------------------------------------------------------------------------- properties
    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def pad_id(self) -> int:
        return PAD_ID

    @property
    def eos_id(self) -> int:
        return EOS_ID

    @property
    def prompt_length(self) -> int:
        return self.config.prompt_length

    @property
    def max_response_length(self) -> int:
        return self.config.max_response_length

    @property
    def content_offset(self) -> int:
        return _TOPIC_OFFSET + self.config.num_topics

    # --------------------------------------------------------------------------------- prompts
    def sample_prompts(self, rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
        """n prompts: {prompt_ids, prompt_mask, prompt_positions}, each [n, P] int32, left-padded."""
        cfg, p = self.config, self.config.prompt_length
        topic = rng.integers(0, cfg.num_topics, size=n)
        n_ctx = rng.integers(cfg.min_context_tokens, p, size=n)  # in [min, P-1]
        # Distinct context tokens: the first P-1 entries of a random permutation per row.
        ctx = np.argsort(rng.random((n, cfg.num_content_tokens)), axis=1)[:, : p - 1]
        seq = np.concatenate([_TOPIC_OFFSET + topic[:, None], self.content_offset + ctx], axis=1)
        k = np.arange(p)[None, :] - (p - 1 - n_ctx)[:, None]  # index into [topic, ctx...]
        ids = np.where(k >= 0, np.take_along_axis(seq, np.clip(k, 0, p - 1), axis=1), PAD_ID)
        mask = (k >= 0).astype(np.int32)
        positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
        return {"prompt_ids": ids.astype(np.int32), "prompt_mask": mask, "prompt_positions": positions.astype(np.int32)}

    # --------------------------------------------------------------------------- the source
    def _source_context(self, prompt_ids, prompt_mask):
        topic, ctx = _prompt_parts(
            np, np.asarray(prompt_ids), np.asarray(prompt_mask), self.vocab_size, self.config.num_topics
        )
        ctx = ctx[:, self.content_offset :].astype(np.float64)  # [B, C]
        return topic, ctx / np.maximum(ctx.sum(1, keepdims=True), 1.0)

    def _next_probs(self, topic, state, ctx_dist, h):
        """[B, C+1] source probabilities of (content tokens..., EOS) at response position h."""
        cfg = self.config
        content = (1 - cfg.copy_prob) * self.transition[topic, state] + cfg.copy_prob * ctx_dist
        # A prompt without context (impossible with min_context_tokens >= 1) would lose the copy
        # mass; renormalise so the distribution stays proper either way.
        content /= content.sum(1, keepdims=True)
        e = cfg.eos_hazard if h >= cfg.min_response_length else 0.0
        return np.concatenate([(1 - e) * content, np.full((len(topic), 1), e)], axis=1)

    def _next_state(self, state, c):
        """n-gram state after content token index c (state = last order-1 tokens, base C+1)."""
        num_states = (self.config.num_content_tokens + 1) ** (self.config.ngram_order - 1)
        return (state * (self.config.num_content_tokens + 1) + c + 1) % num_states

    def sample_reference_responses(
        self, rng: np.random.Generator, prompts: Mapping[str, np.ndarray], n: int | None = None
    ) -> dict[str, np.ndarray]:
        """Samples from the reference source (ancestral, vectorised over rows; loops over R).

        Returns {response_ids [B,R] int32, response_mask [B,R] float32}; with n given, n samples
        per prompt, shapes [B,n,R].  Rows are right-padded with pad after EOS; a row that reaches
        R without EOS has no EOS (response_mask all ones).
        """
        ids, mask = np.asarray(prompts["prompt_ids"]), np.asarray(prompts["prompt_mask"])
        if n is not None:
            ids, mask = np.repeat(ids, n, axis=0), np.repeat(mask, n, axis=0)
        cfg, b, r = self.config, ids.shape[0], self.config.max_response_length
        topic, ctx_dist = self._source_context(ids, mask)
        state = np.zeros(b, np.int64)
        done = np.zeros(b, bool)
        out = np.full((b, r), PAD_ID, np.int32)
        out_mask = np.zeros((b, r), np.float32)
        for h in range(r):
            cdf = np.cumsum(self._next_probs(topic, state, ctx_dist, h), axis=1)
            choice = np.minimum((cdf < rng.random(b)[:, None] * cdf[:, -1:]).sum(1), cfg.num_content_tokens)
            is_eos = choice == cfg.num_content_tokens
            out[:, h] = np.where(done, PAD_ID, np.where(is_eos, EOS_ID, self.content_offset + choice))
            out_mask[:, h] = ~done
            state = np.where(is_eos | done, state, self._next_state(state, choice))
            done |= is_eos
            if done.all():
                break
        if n is not None:
            out, out_mask = out.reshape(-1, n, r), out_mask.reshape(-1, n, r)
        return {"response_ids": out, "response_mask": out_mask}

    def reference_logprobs(self, prompt_ids, prompt_mask, response_ids, response_mask) -> np.ndarray:
        """Exact per-token log-probs [B,R] float32 of responses under the source (0 where masked;
        -inf for tokens the source never emits).  Sum over R for the sequence log-prob."""
        response_ids = np.asarray(response_ids)
        cfg, (b, r) = self.config, response_ids.shape
        topic, ctx_dist = self._source_context(prompt_ids, prompt_mask)
        alive = _alive(np, response_ids, np.asarray(response_mask), EOS_ID)
        c_idx = response_ids - self.content_offset
        is_content = (c_idx >= 0) & (c_idx < cfg.num_content_tokens)
        col = np.where(response_ids == EOS_ID, cfg.num_content_tokens, np.clip(c_idx, 0, cfg.num_content_tokens - 1))
        state = np.zeros(b, np.int64)
        out = np.zeros((b, r), np.float64)
        with np.errstate(divide="ignore"):
            for h in range(r):
                p = self._next_probs(topic, state, ctx_dist, h)[np.arange(b), col[:, h]]
                p = np.where(is_content[:, h] | (response_ids[:, h] == EOS_ID), p, 0.0)
                out[:, h] = np.where(alive[:, h], np.log(p), 0.0)
                state = np.where(is_content[:, h], self._next_state(state, col[:, h]), state)
        return out.astype(np.float32)

    # ------------------------------------------------------------------------------ gold reward
    def _gold(self, xp, prompt_ids, prompt_mask, response_ids, response_mask) -> _GoldParts:
        """r* and its parts, written once for numpy (xp=np) and jax.numpy (xp=jnp)."""
        cfg, v = self.config, self.vocab_size
        f32 = xp.float32
        topic, ctx = _prompt_parts(xp, prompt_ids, prompt_mask, v, cfg.num_topics)
        y = xp.clip(response_ids, 0, v - 1)
        alive = _alive(xp, response_ids, response_mask, EOS_ID)
        content = alive & (response_ids != EOS_ID)
        ended = xp.any(alive & (response_ids == EOS_ID), axis=1)
        length = content.astype(xp.int32).sum(1)

        # Quality: mean of q over content tokens; q looks at (topic, previous token, token).
        prev = xp.concatenate([xp.full((y.shape[0], 1), v, y.dtype), y[:, :-1]], axis=1)  # v = start
        q = xp.asarray(self.quality_table)[topic[:, None], prev, y]
        h_safe = xp.maximum(length, 1).astype(f32)
        tok_q = xp.where(content, q, 0.0).astype(f32) / h_safe[:, None]
        quality = tok_q.sum(1)

        # Coverage: context tokens mentioned; credit goes to each one's first mention.
        onehot = (y[:, :, None] == xp.arange(v)[None, None, :]) & content[:, :, None]
        seen_before = (xp.cumsum(onehot.astype(xp.int32), axis=1) - onehot.astype(xp.int32)) > 0
        first_mention = xp.any(onehot & ~seen_before & ctx[:, None, :], axis=2)
        n_ctx = ctx.astype(xp.int32).sum(1)
        covered = first_mention.astype(xp.int32).sum(1)
        has_ctx = n_ctx > 0
        coverage = xp.where(has_ctx, covered.astype(f32) / xp.maximum(n_ctx, 1).astype(f32), 1.0).astype(f32)

        length_score = xp.maximum(0.0, 1.0 - xp.abs(length.astype(f32) - cfg.target_length) / cfg.target_length)
        a_q, a_c, a_l, a_e = cfg.quality_weight, cfg.coverage_weight, cfg.length_weight, cfg.eos_weight
        reward = (
            a_q * quality
            + a_c * (2.0 * coverage - 1.0)
            + a_l * (2.0 * length_score - 1.0)
            + a_e * (2.0 * ended.astype(f32) - 1.0)
        ).astype(f32)

        # Per-token credit: quality share per content token, coverage bonus at first mentions,
        # and the sequence-level constants on the last token of the response (EOS if any).
        mention = xp.where(first_mention, 2.0 * a_c / xp.maximum(n_ctx, 1).astype(f32)[:, None], 0.0)
        last = alive.astype(xp.int32).sum(1) - 1
        at_last = xp.arange(y.shape[1])[None, :] == last[:, None]
        seq_const = (
            xp.where(has_ctx, -a_c, a_c) + a_l * (2.0 * length_score - 1.0) + a_e * (2.0 * ended.astype(f32) - 1.0)
        )
        credit = (a_q * tok_q + mention + xp.where(at_last, seq_const[:, None], 0.0)).astype(f32)
        return _GoldParts(reward, credit, (a_q * tok_q).astype(f32), quality, coverage, length_score, ended, length)

    def gold_reward(self, prompt_ids, prompt_mask, response_ids, response_mask) -> np.ndarray:
        """r*(x, y) in [-1, 1]: [B] float32 (numpy).  prompt_* [B,P], response_* [B,R]."""
        args = [np.asarray(a) for a in (prompt_ids, prompt_mask, response_ids, response_mask)]
        return np.asarray(self._gold(np, *args).reward, np.float32)

    def gold_reward_jax(self, prompt_ids, prompt_mask, response_ids, response_mask):
        """The same r* in jax.numpy, for use inside jit (the tables are constants of the program, or traced
        where the task is an argument: see the class docstring)."""
        args = [jnp.asarray(a) for a in (prompt_ids, prompt_mask, response_ids, response_mask)]
        return self._gold(jnp, *args).reward

    def gold_token_credit(self, prompt_ids, prompt_mask, response_ids, response_mask, xp=np):
        """Per-token credit [B,R] float32 that sums over R to r* (0 outside the response):
        a_q q_h / H on content tokens, + 2 a_c / |S| on the first mention of each context token,
        + the sequence-level constants (coverage offset, length, EOS terms) on the last token."""
        args = [xp.asarray(a) for a in (prompt_ids, prompt_mask, response_ids, response_mask)]
        return self._gold(xp, *args).credit

    def gold_credit_jax(self, prompt_ids, prompt_mask, response_ids, response_mask):
        """`gold_token_credit` in jax.numpy, for use inside jit: [B,R] float32 (tables as in `gold_reward_jax`)."""
        return self.gold_token_credit(prompt_ids, prompt_mask, response_ids, response_mask, xp=jnp)

    def gold_quality_credit(self, prompt_ids, prompt_mask, response_ids, response_mask) -> np.ndarray:
        """The token-level part of `gold_token_credit`: a_q q_h / H on each content token, 0 elsewhere
        ([B,R] float32, numpy). What a per-token reward can find that no sequence-level term holds."""
        args = [np.asarray(a) for a in (prompt_ids, prompt_mask, response_ids, response_mask)]
        return np.asarray(self._gold(np, *args).quality_credit, np.float32)

    def gold_components(self, prompt_ids, prompt_mask, response_ids, response_mask) -> dict[str, np.ndarray]:
        """{reward, quality, coverage, length_score, ended, length} per row (numpy), for eval."""
        args = [np.asarray(a) for a in (prompt_ids, prompt_mask, response_ids, response_mask)]
        parts = self._gold(np, *args)._asdict()
        del parts["credit"], parts["quality_credit"]
        return parts

    def max_gold_reward(self, prompt_ids, prompt_mask) -> np.ndarray:
        """The exact maximum of r*(x, .) over all responses of length <= R, per prompt: [B] float32.

        Dynamic programme over (length, last token, set of context tokens mentioned): for each
        length H it finds the largest sum of q, per mentioned-subset; the other terms of r* only
        depend on (H, subset, ended).  Cost ~ R * 2^|S| * V^2 per prompt.
        """
        cfg, v, r = self.config, self.vocab_size, self.config.max_response_length
        prompt_ids, prompt_mask = np.asarray(prompt_ids), np.asarray(prompt_mask)
        topic, ctx = _prompt_parts(np, prompt_ids, prompt_mask, v, cfg.num_topics)
        tokens = np.array([t for t in range(v) if t != EOS_ID])  # anything but EOS may be emitted
        a_q, a_c, a_l, a_e = cfg.quality_weight, cfg.coverage_weight, cfg.length_weight, cfg.eos_weight
        out = np.zeros(len(topic), np.float32)
        cache: dict[tuple, float] = {}
        for i in range(len(topic)):
            ctx_ids = tuple(np.flatnonzero(ctx[i]))
            key = (int(topic[i]), ctx_ids)
            if key not in cache:
                q = self.quality_table[topic[i]].astype(np.float64)
                n_ctx, m_all = len(ctx_ids), 1 << len(ctx_ids)
                bit = np.zeros(v, np.int64)
                for j, t in enumerate(ctx_ids):
                    bit[t] = 1 << j
                popcount = np.array([bin(m).count("1") for m in range(m_all)])
                coverage = popcount / n_ctx if n_ctx else np.ones(m_all)
                cols = np.broadcast_to(tokens, (m_all, len(tokens)))
                new_m = np.arange(m_all)[:, None] | bit[tokens][None, :]
                best = np.full((m_all, len(tokens)), -np.inf)  # best[m, j]: sum q, ends in tokens[j]
                best[bit[tokens], np.arange(len(tokens))] = q[v, tokens]  # H = 1, from start
                value = a_c * (2 * coverage[0] - 1) + a_l * -1.0 + a_e * 1.0  # H = 0: just EOS
                for h in range(1, r + 1):
                    by_m = best.max(1)  # best sum for each mentioned subset at length h
                    ls = max(0.0, 1 - abs(h - cfg.target_length) / cfg.target_length)
                    ended = 1.0 if h <= r - 1 else 0.0  # EOS needs a free column
                    cand = a_q * by_m / h + a_c * (2 * coverage - 1) + a_l * (2 * ls - 1) + a_e * (2 * ended - 1)
                    value = max(value, float(cand.max()))
                    if h == r:
                        break
                    step = (best[:, :, None] + q[tokens][:, tokens][None]).max(1)  # [m, next]
                    best = np.full_like(best, -np.inf)
                    np.maximum.at(best, (new_m, np.broadcast_to(np.arange(len(tokens)), cols.shape)), step)
                cache[key] = value
            out[i] = cache[key]
        return out

    # ------------------------------------------------------------------------------ data helpers
    def make_sft_data(self, rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
        """n (prompt, reference response) rows as an SFT batch (see ``make_sft_batch``)."""
        prompts = self.sample_prompts(rng, n)
        responses = self.sample_reference_responses(rng, prompts)
        return make_sft_batch(
            prompts["prompt_ids"], prompts["prompt_mask"], responses["response_ids"], responses["response_mask"]
        )

    def make_preference_data(
        self,
        rng: np.random.Generator,
        prompts: Mapping[str, np.ndarray],
        responses_a: Mapping[str, np.ndarray],
        responses_b: Mapping[str, np.ndarray],
        temperature: float | None = None,
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Labels two responses per prompt by Bradley-Terry on r* and returns a preference batch.

        P(a preferred) = sigmoid((r*(a) - r*(b)) / temperature).  temperature defaults to
        config.label_temperature; if that is None it is calibrated on these pairs to
        config.target_agreement.  Returns (batch, info) with info: temperature, gold_a, gold_b,
        a_preferred [B] bool, gold_chosen, gold_rejected, expected_agreement and agreement (the
        fraction of non-tied pairs whose label matches the gold ordering).
        """
        pid, pm = prompts["prompt_ids"], prompts["prompt_mask"]
        gold_a = self.gold_reward(pid, pm, responses_a["response_ids"], responses_a["response_mask"])
        gold_b = self.gold_reward(pid, pm, responses_b["response_ids"], responses_b["response_mask"])
        if temperature is None:
            temperature = self.config.label_temperature
        if temperature is None:
            temperature = calibrate_label_temperature(rng, gold_a, gold_b, self.config.target_agreement).temperature
        a_pref = label_preferences(rng, gold_a, gold_b, temperature)
        pick = lambda key: np.where(a_pref[:, None], responses_a[key], responses_b[key])  # noqa: E731
        other = lambda key: np.where(a_pref[:, None], responses_b[key], responses_a[key])  # noqa: E731
        batch = make_preference_batch(
            pid, pm, pick("response_ids"), pick("response_mask"), other("response_ids"), other("response_mask")
        )
        diff = gold_a - gold_b
        untied = np.abs(diff) > 1e-6
        info = {
            "temperature": float(temperature),
            "gold_a": gold_a,
            "gold_b": gold_b,
            "a_preferred": a_pref,
            "gold_chosen": np.where(a_pref, gold_a, gold_b),
            "gold_rejected": np.where(a_pref, gold_b, gold_a),
            "expected_agreement": expected_agreement(gold_a, gold_b, temperature),
            "agreement": float(np.mean((diff > 0)[untied] == a_pref[untied])) if untied.any() else float("nan"),
        }
        return batch, info

    def reference_report(
        self, rng: np.random.Generator, num_prompts: int = 256, num_samples: int = 64, with_max: bool = True
    ) -> dict[str, float]:
        """Headline numbers of the reference source on fresh prompts: mean gold reward, best-of-n
        gold (n = num_samples), exact max, lengths, EOS rate, per-token entropy (nats)."""
        prompts = self.sample_prompts(rng, num_prompts)
        resp = self.sample_reference_responses(rng, prompts, n=num_samples)
        r = self.max_response_length
        ids, mask = resp["response_ids"].reshape(-1, r), resp["response_mask"].reshape(-1, r)
        pid = np.repeat(prompts["prompt_ids"], num_samples, axis=0)
        pm = np.repeat(prompts["prompt_mask"], num_samples, axis=0)
        gold = self.gold_reward(pid, pm, ids, mask)
        logp = self.reference_logprobs(pid, pm, ids, mask)
        frontier = best_of_n_frontier(gold.reshape(num_prompts, num_samples))
        out = {
            "gold_mean": float(gold.mean()),
            "gold_std": float(gold.std()),
            f"gold_best_of_{num_samples}": float(frontier["mean"][-1]),
            "token_entropy": float(-logp.sum() / mask.sum()),
            **summarize_responses(ids, mask),
        }
        if with_max:
            out["gold_max"] = float(self.max_gold_reward(prompts["prompt_ids"], prompts["prompt_mask"]).mean())
        return out


# ----------------------------------------------------------------------------------------------
# Batches in the CONTRACT.md layout.


def make_sft_batch(prompt_ids, prompt_mask, response_ids, response_mask) -> dict[str, np.ndarray]:
    """SFT arrays: input_ids, attention_mask, positions [B,P+R] int32, response_mask [B,R] float32,
    prompt_ids, prompt_mask [B,P] int32.  The response mask is made canonical (its leading run up
    to and including the first EOS) and response ids outside it are set to pad."""
    prompt_ids, prompt_mask = np.asarray(prompt_ids, np.int32), (np.asarray(prompt_mask) > 0).astype(np.int32)
    response_ids = np.asarray(response_ids, np.int32)
    alive = _alive(np, response_ids, np.asarray(response_mask), EOS_ID)
    attention_mask = np.concatenate([prompt_mask, alive.astype(np.int32)], axis=1)
    return {
        "input_ids": np.concatenate(
            [np.where(prompt_mask > 0, prompt_ids, PAD_ID), np.where(alive, response_ids, PAD_ID)], axis=1
        ).astype(np.int32),
        "attention_mask": attention_mask,
        "positions": np.maximum(np.cumsum(attention_mask, axis=1) - 1, 0).astype(np.int32),
        "response_mask": alive.astype(np.float32),
        "prompt_ids": prompt_ids,
        "prompt_mask": prompt_mask,
    }


def make_preference_batch(
    prompt_ids, prompt_mask, chosen_ids, chosen_mask, rejected_ids, rejected_mask
) -> dict[str, np.ndarray]:
    """chosen_/rejected_{input_ids, attention_mask, positions, response_mask} + shared prompt_ids,
    prompt_mask, each side laid out as ``make_sft_batch``."""
    out = {}
    for side, ids, mask in (("chosen", chosen_ids, chosen_mask), ("rejected", rejected_ids, rejected_mask)):
        sft = make_sft_batch(prompt_ids, prompt_mask, ids, mask)
        for key in ("input_ids", "attention_mask", "positions", "response_mask"):
            out[f"{side}_{key}"] = sft[key]
    out["prompt_ids"], out["prompt_mask"] = sft["prompt_ids"], sft["prompt_mask"]
    return out


def summarize_responses(response_ids, response_mask) -> dict[str, float]:
    """Mean response length (tokens incl. EOS), mean content length (EOS excluded), EOS rate."""
    response_ids = np.asarray(response_ids)
    alive = _alive(np, response_ids, np.asarray(response_mask), EOS_ID)
    eos = (alive & (response_ids == EOS_ID)).any(1)
    return {
        "length": float(alive.sum(1).mean()),
        "content_length": float((alive.sum(1) - eos).mean()),
        "eos_rate": float(eos.mean()),
    }


# ----------------------------------------------------------------------------------------------
# Preference labels with human-like noise.


def _sigmoid(x):
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(x, np.float64)))


def label_preferences(rng: np.random.Generator, rewards_a, rewards_b, temperature: float) -> np.ndarray:
    """[B] bool, True where a is preferred: Bernoulli(sigmoid((r_a - r_b) / temperature))."""
    p = _sigmoid((np.asarray(rewards_a, np.float64) - np.asarray(rewards_b, np.float64)) / temperature)
    return rng.random(p.shape) < p


def expected_agreement(rewards_a, rewards_b, temperature: float) -> float:
    """P(label agrees with the sign of the gold difference) = mean sigmoid(|diff| / T), over
    non-tied pairs (a tie has no gold ordering to agree with)."""
    diff = np.abs(np.asarray(rewards_a, np.float64) - np.asarray(rewards_b, np.float64))
    diff = diff[diff > 1e-6]
    return float(_sigmoid(diff / temperature).mean()) if diff.size else float("nan")


class LabelCalibration(NamedTuple):
    temperature: float
    expected_agreement: float  # closed form at `temperature`
    sampled_agreement: float  # one Monte Carlo draw of labels at `temperature` (uses rng)
    num_pairs: int  # non-tied pairs used


def calibrate_label_temperature(
    rng: np.random.Generator | None, rewards_a, rewards_b, target_agreement: float = 0.72
) -> LabelCalibration:
    """The Bradley-Terry temperature whose expected label/gold agreement is target_agreement.

    Agreement falls monotonically from 1 (T -> 0) to 1/2 (T -> inf), so bisect on log T.  rng,
    if given, draws one set of labels to report the sampled agreement next to the expected one.
    """
    a, b = np.asarray(rewards_a, np.float64), np.asarray(rewards_b, np.float64)
    untied = np.abs(a - b) > 1e-6
    if not untied.any():
        raise ValueError("all pairs are tied: no temperature can reach the target agreement")
    lo, hi = math.log(1e-8), math.log(1e4)
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if expected_agreement(a[untied], b[untied], math.exp(mid)) > target_agreement:
            lo = mid  # too clean: raise T
        else:
            hi = mid
    t = math.exp(0.5 * (lo + hi))
    sampled = float("nan")
    if rng is not None:
        labels = label_preferences(rng, a[untied], b[untied], t)
        sampled = float(np.mean(labels == (a[untied] > b[untied])))
    return LabelCalibration(t, expected_agreement(a[untied], b[untied], t), sampled, int(untied.sum()))


# ----------------------------------------------------------------------------------------------
# Best-of-n reference curve.


def best_of_n_kl(n):
    """KL(best-of-n || base) = log n - (n - 1) / n (continuous base distribution, no ties)."""
    n = np.asarray(n, np.float64)
    return np.log(n) - (n - 1.0) / n


def best_of_n_frontier(gold, max_n: int | None = None, method: str = "unbiased") -> dict[str, np.ndarray]:
    """Best-of-n gold reward for n = 1..max_n from gold rewards [num_prompts, N] of N samples per
    prompt (max_n defaults to N).

    method "unbiased": per prompt, the mean of max over all n-subsets of the N samples (the
    order-statistics U-statistic sum_i r_(i) C(i-1, n-1) / C(N, n)); "first": the max over the
    first n samples.  Both are unbiased for E[max of n]; "unbiased" has lower variance.
    Returns {n, kl (= best_of_n_kl(n)), mean, stderr} (stderr across prompts), each [max_n].
    """
    gold = np.asarray(gold, np.float64)
    num_prompts, big_n = gold.shape
    max_n = big_n if max_n is None else max_n
    if not 1 <= max_n <= big_n:
        raise ValueError(f"max_n={max_n} must be in [1, {big_n}]")
    ns = np.arange(1, max_n + 1)
    per_prompt = np.zeros((num_prompts, max_n))
    if method == "unbiased":
        ranked = np.sort(gold, axis=1)  # ascending: r_(1) .. r_(N)
        for j, n in enumerate(ns):
            w = np.array([math.comb(i - 1, n - 1) for i in range(1, big_n + 1)], np.float64) / math.comb(big_n, n)
            per_prompt[:, j] = ranked @ w
    elif method == "first":
        per_prompt = np.maximum.accumulate(gold[:, :max_n], axis=1)
    else:
        raise ValueError(f"unknown method {method!r}")
    stderr = per_prompt.std(0, ddof=1) / math.sqrt(num_prompts) if num_prompts > 1 else np.zeros(max_n)
    return {"n": ns, "kl": best_of_n_kl(ns), "mean": per_prompt.mean(0), "stderr": stderr}
