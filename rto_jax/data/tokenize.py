"""Tokenization, truncation, padding and collation into the CONTRACT.md batch layout.

Layout (CONTRACT.md): a row is the prompt left-padded to static length P followed by the response
right-padded to static length R.

  SFT arrays          input_ids [N,P+R] int32, attention_mask [N,P+R] int32,
                      positions [N,P+R] int32 = max(cumsum(attention_mask) - 1, 0),
                      response_mask [N,R] float32 (1 on response tokens incl. EOS),
                      prompt_ids [N,P] int32, prompt_mask [N,P] int32.
  preference arrays   chosen_{input_ids,attention_mask,positions,response_mask} and the same for
                      rejected_, sharing prompt_ids and prompt_mask (stored once).
  prompt-only arrays  prompt_ids [N,P], prompt_mask [N,P], prompt_positions [N,P] (for rollouts).

Prompts
  * tokenized without special tokens, then the tokenizer's own start tokens (BOS for Llama, none
    for GPT-2/Pythia/Qwen2) are put in front, never twice (chat templates that already write
    "<|begin_of_text|>" keep one). `add_bos` overrides: True forces [bos], False adds nothing.
  * longer than P tokens: truncated by default, or skipped (`skip_long_prompts=True`).
    `prompt_truncation`:
      "left"       keep the LAST P tokens (after the start tokens), so the prompt's end marker
                   ("TL;DR:", "Assistant:", the generation prompt) always survives;
      "tldr_post"  for TL;DR prompts ("... POST: body\\n\\nTL;DR:") shorten the POST body at a word
                   boundary until the whole prompt fits, keeping subreddit, title and "TL;DR:";
                   falls back to "left" for other prompts or when the header alone is too long;
      "auto"       (default) "tldr_post" for prompts in the TL;DR layout, "left" otherwise.
Responses
  * tokenized without special tokens; cut at the first EOS token if the text contains one (e.g. a
    trailing "<|endoftext|>"); EOS appended; right-padded to R.
  * longer than R tokens (counting EOS): truncated to R tokens, and then they carry NO EOS (the
    row is still used; `responses_truncated` counts them) unless `drop_truncated_responses=True`,
    which skips the row (a preference pair is skipped if either response is too long).
Pad id must differ from EOS (otherwise the EOS loss is masked and the model never learns to stop):
pass `pad_id` explicitly when the tokenizer has none or reuses EOS.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from rto_jax.data.formats import SKIP_REASONS, PreferenceExample, SFTExample

__all__ = [
    "PREFERENCE_KEYS",
    "PROMPT_KEYS",
    "SFT_KEYS",
    "DataStats",
    "collate",
    "collate_prompts",
    "encode_prompts",
    "encode_responses",
    "prompt_only",
    "special_ids",
    "start_tokens",
    "tokenize_preference",
    "tokenize_prompts",
    "tokenize_sft",
]

logger = logging.getLogger(__name__)

PROMPT_TRUNCATIONS = ("auto", "left", "tldr_post")
SFT_KEYS = ("input_ids", "attention_mask", "positions", "response_mask", "prompt_ids", "prompt_mask")
SEQUENCE_KEYS = ("input_ids", "attention_mask", "positions", "response_mask")
PREFERENCE_KEYS = tuple(f"{side}_{k}" for side in ("chosen", "rejected") for k in SEQUENCE_KEYS) + (
    "prompt_ids",
    "prompt_mask",
)
PROMPT_KEYS = ("prompt_ids", "prompt_mask", "prompt_positions")

# A TL;DR prompt: header up to "POST: ", the body, and the "TL;DR:" marker.
_TLDR_PARTS = re.compile(r"(?P<head>.*?POST: )(?P<body>.*?)(?P<tail>\s*TL;DR:\s*)\Z", re.DOTALL)

# How a prompt longer than max_prompt_len was cut (DataStats.prompts_truncated_by):
#   "tldr_post"   the POST shortened at a word boundary; SUBREDDIT, TITLE and "TL;DR:" kept
#   "left"        the last tokens kept (prompt_truncation='left', or a prompt not in the TL;DR layout)
#   "left_header" a TL;DR prompt whose header and marker alone do not fit: the last tokens kept
TRUNCATION_KINDS = ("tldr_post", "left", "left_header")


@dataclasses.dataclass
class DataStats:
    """What loading/tokenizing did: rows seen, examples kept, skips per reason, truncations."""

    source: str = "<examples>"
    num_rows: int = 0
    num_examples: int = 0
    skipped: dict[str, int] = dataclasses.field(default_factory=dict)
    prompts_truncated: int = 0
    responses_truncated: int = 0
    # How the truncated prompts were cut ({kind: count}, TRUNCATION_KINDS), under which setting.
    prompts_truncated_by: dict[str, int] = dataclasses.field(default_factory=dict)
    prompt_truncation: str | None = None
    max_prompt_len: int | None = None

    _logged: set = dataclasses.field(default_factory=set, repr=False, compare=False)

    def skip(self, reason: str, count: int = 1) -> None:
        if count:
            self.skipped[reason] = self.skipped.get(reason, 0) + count

    def log(self) -> None:
        """One warning per skip reason (count and why) and per kind of truncation, each only once
        per DataStats (loading and tokenizing both call this)."""
        for reason, count in self.skipped.items():
            if count and reason not in self._logged:
                self._logged.add(reason)
                logger.warning(
                    "%s: skipped %d of %d rows: %s (%s).",
                    self.source,
                    count,
                    self.num_rows,
                    SKIP_REASONS.get(reason, reason),
                    reason,
                )
        if self.responses_truncated and "responses_truncated" not in self._logged:
            self._logged.add("responses_truncated")
            logger.warning(
                "%s: %d responses were longer than max_response_len and were truncated WITHOUT EOS "
                "(set drop_truncated_responses=True to skip them instead).",
                self.source,
                self.responses_truncated,
            )
        if self.prompts_truncated and "prompts_truncated" not in self._logged:
            self._logged.add("prompts_truncated")
            logger.info("%s", self.truncation_message())

    def truncation_message(self) -> str:
        """What prompt truncation did, per kind, for the setting actually used."""
        p = "max_prompt_len" if self.max_prompt_len is None else f"max_prompt_len={self.max_prompt_len}"
        mode = self.prompt_truncation
        setting = "" if mode is None else f"prompt_truncation={mode!r}"
        if mode == "auto":
            setting += ": 'tldr_post' for prompts in the TL;DR layout, 'left' for the others"
        by = self.prompts_truncated_by
        left = "cut from the left (the beginning dropped, the last tokens that fit kept)"
        parts = []
        if by.get("tldr_post"):
            parts.append(
                f"{_count(by['tldr_post'], 'TL;DR prompt')}: POST shortened at a word boundary (SUBREDDIT, TITLE "
                "and the final 'TL;DR:' kept)"
            )
        if by.get("left"):
            parts.append(
                f"{_count(by['left'], 'prompt')}{'' if mode == 'left' else ' not in the TL;DR layout'}: {left}"
            )
        if by.get("left_header"):
            parts.append(
                f"{_count(by['left_header'], 'TL;DR prompt')} whose SUBREDDIT, TITLE and 'TL;DR:' alone do not fit: "
                "cut from the left instead (the beginning, SUBREDDIT and TITLE included, dropped; the end kept)"
            )
        other = self.prompts_truncated - sum(by.values())
        if other > 0:  # Counted by a caller that did not say how.
            parts.append(f"{_count(other, 'prompt')}: truncated")
        return (
            f"{self.source}: {_count(self.prompts_truncated, 'prompt')} longer than {p} tokens truncated"
            + (f" ({setting})" if setting else "")
            + ": "
            + "; ".join(parts)
            + "."
        )


def _count(n: int, what: str) -> str:
    return f"{n} {what}{'' if n == 1 else 's'}"


# ----------------------------------------------------------------------------------------------
# Special tokens.


def special_ids(tokenizer: Any, pad_id: int | None = None, eos_id: int | None = None) -> tuple[int, int]:
    """(pad_id, eos_id): explicit arguments win over the tokenizer's; they must differ."""
    if eos_id is None:
        eos_id = getattr(tokenizer, "eos_token_id", None)
    if eos_id is None:
        raise ValueError("the tokenizer has no eos_token_id; pass eos_id explicitly")
    if pad_id is None:
        pad_id = getattr(tokenizer, "pad_token_id", None)
        if pad_id is None or pad_id == eos_id:
            raise ValueError(
                f"the tokenizer's pad token ({pad_id}) is missing or equal to EOS ({eos_id}); pad must "
                "differ from EOS so the EOS token is trained. Pass a distinct pad_id (e.g. an unused "
                "reserved token id, or add a '<pad>' token) explicitly."
            )
    if int(pad_id) == int(eos_id):
        raise ValueError(f"pad_id ({pad_id}) must differ from eos_id ({eos_id})")
    return int(pad_id), int(eos_id)


def start_tokens(tokenizer: Any, add_bos: bool | None = None) -> list[int]:
    """Tokens the tokenizer puts in front of a text (BOS for Llama-style tokenizers, often none)."""
    if add_bos is False:
        return []
    if add_bos is True:
        if getattr(tokenizer, "bos_token_id", None) is None:
            raise ValueError("add_bos=True but the tokenizer has no bos_token_id")
        return [int(tokenizer.bos_token_id)]
    with_special = list(tokenizer("a", add_special_tokens=True)["input_ids"])
    without = list(tokenizer("a", add_special_tokens=False)["input_ids"])
    if without and with_special[-len(without) :] == without:
        return [int(t) for t in with_special[: len(with_special) - len(without)]]
    return []


def _encode(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    if not texts:
        return []
    return [list(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]


# ----------------------------------------------------------------------------------------------
# Prompts.


def _tldr_truncate(tokenizer: Any, text: str, budget: int) -> list[int] | None:
    """Shortens the POST body at a word boundary so the prompt fits `budget` tokens, or None."""
    parts = _TLDR_PARTS.match(text)
    if parts is None:
        return None
    head, body, tail = parts["head"], parts["body"], parts["tail"]
    cuts = [0] + [m.start() for m in re.finditer(r"\s+", body)]  # Word boundaries, ascending.

    def encoded(i: int) -> list[int]:
        return _encode(tokenizer, [head + body[: cuts[i]].rstrip() + tail])[0]

    # Guess the cut from the token offsets of the full prompt (one encode), then bisect below it.
    hi = len(cuts) - 1
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        offsets, n = enc["offset_mapping"], len(enc["input_ids"])
        tail_tokens = 0
        while tail_tokens < n and offsets[n - 1 - tail_tokens][0] >= len(head) + len(body):
            tail_tokens += 1
        first_dropped = budget - tail_tokens  # Index of the first body token that does not fit.
        if 0 <= first_dropped < n:
            char = offsets[first_dropped][0] - len(head)
            hi = max(0, min(hi, int(np.searchsorted(cuts, char, side="right")) - 1))
            ids = encoded(hi)
            if len(ids) <= budget:
                return ids
    except (NotImplementedError, KeyError, TypeError, ValueError):
        pass  # Slow tokenizers have no offsets: plain bisection.
    lo = 0
    if len(encoded(0)) > budget:
        return None  # Even with an empty body the header and marker do not fit.
    while lo < hi:  # Largest cut that fits (token count is ~monotone in the cut).
        mid = (lo + hi + 1) // 2
        if len(encoded(mid)) <= budget:
            lo = mid
        else:
            hi = mid - 1
    ids = encoded(lo)
    return ids if len(ids) <= budget else None


def encode_prompts(
    prompts: Sequence[str],
    tokenizer: Any,
    max_prompt_len: int,
    *,
    prompt_truncation: str = "auto",
    add_bos: bool | None = None,
) -> tuple[list[list[int]], np.ndarray]:
    """Token ids of each prompt (start tokens included, at most max_prompt_len) and a bool array
    saying which prompts were longer than max_prompt_len (and so were truncated)."""
    ids, too_long, _ = _encode_prompts(prompts, tokenizer, max_prompt_len, prompt_truncation, add_bos)
    return ids, too_long


def _encode_prompts(
    prompts: Sequence[str], tokenizer: Any, max_prompt_len: int, prompt_truncation: str, add_bos: bool | None
) -> tuple[list[list[int]], np.ndarray, list[str]]:
    """encode_prompts, and how each prompt was truncated: "" (it fit) or one of TRUNCATION_KINDS."""
    if prompt_truncation not in PROMPT_TRUNCATIONS:
        raise ValueError(f"prompt_truncation must be one of {PROMPT_TRUNCATIONS}, got {prompt_truncation!r}")
    prefix = start_tokens(tokenizer, add_bos)
    budget = max_prompt_len - len(prefix)
    if budget < 1:
        raise ValueError(f"max_prompt_len={max_prompt_len} leaves no room after start tokens {prefix}")
    out, too_long, how = [], np.zeros(len(prompts), bool), [""] * len(prompts)
    for i, (text, ids) in enumerate(zip(prompts, _encode(tokenizer, prompts))):
        if prefix and ids[: len(prefix)] == prefix:
            ids = ids[len(prefix) :]  # The text already starts with them (e.g. a chat template's BOS).
        if len(ids) > budget:
            too_long[i] = True
            short = None
            how[i] = "left"
            if prompt_truncation in ("auto", "tldr_post") and _TLDR_PARTS.match(text):
                short = _tldr_truncate(tokenizer, text, budget)
                if short is not None and prefix and short[: len(prefix)] == prefix:
                    short = short[len(prefix) :]
                how[i] = "tldr_post" if short is not None and len(short) <= budget else "left_header"
            ids = short if how[i] == "tldr_post" else ids[-budget:]
        out.append(prefix + ids)
    return out, too_long, how


def encode_responses(
    responses: Sequence[str], tokenizer: Any, max_response_len: int, eos_id: int
) -> tuple[list[list[int]], np.ndarray]:
    """Response ids with EOS appended, cut to max_response_len; and which were cut (no EOS left)."""
    if max_response_len < 1:
        raise ValueError(f"max_response_len must be >= 1, got {max_response_len}")
    out, truncated = [], np.zeros(len(responses), bool)
    for i, ids in enumerate(_encode(tokenizer, responses)):
        if eos_id in ids:
            ids = ids[: ids.index(eos_id)]
        ids = ids + [eos_id]
        if len(ids) > max_response_len:
            truncated[i] = True
            ids = ids[:max_response_len]
        out.append(ids)
    return out, truncated


# ----------------------------------------------------------------------------------------------
# Collation.


def _positions(mask: np.ndarray) -> np.ndarray:
    return np.maximum(np.cumsum(mask, axis=-1) - 1, 0).astype(np.int32)


def collate_prompts(prompt_ids: Sequence[Sequence[int]], max_prompt_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """Left-pads prompts to P: prompt_ids, prompt_mask, prompt_positions (all [N,P] int32)."""
    n, p = len(prompt_ids), max_prompt_len
    ids = np.full((n, p), pad_id, np.int32)
    mask = np.zeros((n, p), np.int32)
    for i, row in enumerate(prompt_ids):
        if len(row) > p:
            raise ValueError(f"prompt {i} has {len(row)} tokens > max_prompt_len={p}")
        if row:
            ids[i, p - len(row) :] = row
            mask[i, p - len(row) :] = 1
    return {"prompt_ids": ids, "prompt_mask": mask, "prompt_positions": _positions(mask)}


def collate(
    prompt_ids: Sequence[Sequence[int]],
    response_ids: Sequence[Sequence[int]],
    max_prompt_len: int,
    max_response_len: int,
    pad_id: int,
) -> dict[str, np.ndarray]:
    """Prompt (left-padded to P) + response (right-padded to R) rows in the CONTRACT layout.

    Responses are taken as given (EOS included if present); response_mask is 1 on every response
    token, so cut responses at their first EOS before calling this.
    """
    prompts = collate_prompts(prompt_ids, max_prompt_len, pad_id)
    n, r = len(response_ids), max_response_len
    if n != len(prompt_ids):
        raise ValueError(f"{len(prompt_ids)} prompts but {n} responses")
    resp = np.full((n, r), pad_id, np.int32)
    resp_mask = np.zeros((n, r), np.int32)
    for i, row in enumerate(response_ids):
        if len(row) > r:
            raise ValueError(f"response {i} has {len(row)} tokens > max_response_len={r}")
        resp[i, : len(row)] = row
        resp_mask[i, : len(row)] = 1
    mask = np.concatenate([prompts["prompt_mask"], resp_mask], axis=1)
    return {
        "input_ids": np.concatenate([prompts["prompt_ids"], resp], axis=1),
        "attention_mask": mask,
        "positions": _positions(mask),
        "response_mask": resp_mask.astype(np.float32),
        "prompt_ids": prompts["prompt_ids"],
        "prompt_mask": prompts["prompt_mask"],
    }


def prompt_only(arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The prompt-only batch (prompt_ids, prompt_mask, prompt_positions) of SFT/preference arrays."""
    mask = np.asarray(arrays["prompt_mask"], np.int32)
    return {
        "prompt_ids": np.asarray(arrays["prompt_ids"], np.int32),
        "prompt_mask": mask,
        "prompt_positions": _positions(mask),
    }


# ----------------------------------------------------------------------------------------------
# Examples -> arrays.


def _unique_encode_prompts(prompts, tokenizer, max_prompt_len, prompt_truncation, add_bos):
    """_encode_prompts over distinct prompts only (preference data repeats prompts), per row:
    (ids, too_long, how each was truncated)."""
    index: dict[str, int] = {}
    for p in prompts:
        index.setdefault(p, len(index))
    ids, too_long, how = _encode_prompts(list(index), tokenizer, max_prompt_len, prompt_truncation, add_bos)
    rows = [index[p] for p in prompts]
    return (
        [ids[j] for j in rows],
        too_long[rows] if rows else np.zeros(0, bool),
        np.array([how[j] for j in rows], dtype=object),
    )


def _count_truncations(stats: DataStats, how: np.ndarray, keep: np.ndarray, prompt_truncation, max_prompt_len):
    """Adds the kept rows' prompt truncations, per kind, to stats."""
    stats.prompt_truncation, stats.max_prompt_len = prompt_truncation, max_prompt_len
    for kind in TRUNCATION_KINDS:
        count = int(((how == kind) & keep).sum()) if len(how) else 0
        if count:
            stats.prompts_truncated_by[kind] = stats.prompts_truncated_by.get(kind, 0) + count
            stats.prompts_truncated += count


def _empty(keys, p, r):
    out = {}
    for k in keys:
        width = r if k.endswith("response_mask") else p if k.startswith("prompt") else p + r
        out[k] = np.zeros((0, width), np.float32 if k.endswith("response_mask") else np.int32)
    return out


def _kept_rows(stats: DataStats, long, how, cuts, skip_long_prompts, drop_truncated_responses, truncation, p):
    """Indices of the rows to keep, given which prompts (`long`, and `how` each was cut) and
    responses (`cuts`, one mask per response column) were truncated; records skips and truncations
    in `stats` and logs them."""
    cut = np.logical_or.reduce(cuts)
    keep = np.ones(len(long), bool)
    if skip_long_prompts:
        stats.skip("prompt_too_long", int(long.sum()))
        keep &= ~long
    if drop_truncated_responses:
        stats.skip("response_too_long", int((cut & keep).sum()))
        keep &= ~cut
    _count_truncations(stats, how, keep, truncation, p)
    stats.responses_truncated += int(sum((c & keep).sum() for c in cuts))
    idx = np.flatnonzero(keep)
    stats.num_examples = len(idx)
    stats.log()
    return idx


def tokenize_sft(
    examples: Sequence[SFTExample],
    tokenizer: Any,
    max_prompt_len: int,
    max_response_len: int,
    *,
    pad_id: int | None = None,
    eos_id: int | None = None,
    prompt_truncation: str = "auto",
    skip_long_prompts: bool = False,
    drop_truncated_responses: bool = False,
    add_bos: bool | None = None,
    stats: DataStats | None = None,
) -> tuple[dict[str, np.ndarray], DataStats]:
    """SFT examples -> (SFT arrays, stats). Logs one warning per skip reason / truncation kind."""
    pad_id, eos_id = special_ids(tokenizer, pad_id, eos_id)
    stats = stats if stats is not None else DataStats(num_rows=len(examples))
    prompts, long, how = _unique_encode_prompts(
        [e.prompt for e in examples], tokenizer, max_prompt_len, prompt_truncation, add_bos
    )
    responses, cut = encode_responses([e.response for e in examples], tokenizer, max_response_len, eos_id)
    idx = _kept_rows(
        stats, long, how, [cut], skip_long_prompts, drop_truncated_responses, prompt_truncation, max_prompt_len
    )
    if not len(idx):
        return _empty(SFT_KEYS, max_prompt_len, max_response_len), stats
    arrays = collate([prompts[i] for i in idx], [responses[i] for i in idx], max_prompt_len, max_response_len, pad_id)
    return arrays, stats


def tokenize_preference(
    examples: Sequence[PreferenceExample],
    tokenizer: Any,
    max_prompt_len: int,
    max_response_len: int,
    *,
    pad_id: int | None = None,
    eos_id: int | None = None,
    prompt_truncation: str = "auto",
    skip_long_prompts: bool = False,
    drop_truncated_responses: bool = False,
    add_bos: bool | None = None,
    stats: DataStats | None = None,
) -> tuple[dict[str, np.ndarray], DataStats]:
    """Preference examples -> (preference arrays, stats); chosen_/rejected_ share the prompt."""
    pad_id, eos_id = special_ids(tokenizer, pad_id, eos_id)
    stats = stats if stats is not None else DataStats(num_rows=len(examples))
    prompts, long, how = _unique_encode_prompts(
        [e.prompt for e in examples], tokenizer, max_prompt_len, prompt_truncation, add_bos
    )
    chosen, cut_c = encode_responses([e.chosen for e in examples], tokenizer, max_response_len, eos_id)
    rejected, cut_r = encode_responses([e.rejected for e in examples], tokenizer, max_response_len, eos_id)
    idx = _kept_rows(
        stats, long, how, [cut_c, cut_r], skip_long_prompts, drop_truncated_responses, prompt_truncation, max_prompt_len
    )
    if not len(idx):
        return _empty(PREFERENCE_KEYS, max_prompt_len, max_response_len), stats
    p = [prompts[i] for i in idx]
    arrays = {}
    for side, resp in (("chosen", chosen), ("rejected", rejected)):
        side_arrays = collate(p, [resp[i] for i in idx], max_prompt_len, max_response_len, pad_id)
        for k in SEQUENCE_KEYS:
            arrays[f"{side}_{k}"] = side_arrays[k]
    arrays["prompt_ids"] = side_arrays["prompt_ids"]
    arrays["prompt_mask"] = side_arrays["prompt_mask"]
    return arrays, stats


def tokenize_prompts(
    prompts: Sequence[str | SFTExample | PreferenceExample],
    tokenizer: Any,
    max_prompt_len: int,
    *,
    pad_id: int | None = None,
    eos_id: int | None = None,
    prompt_truncation: str = "auto",
    skip_long_prompts: bool = False,
    add_bos: bool | None = None,
    unique: bool = False,
    stats: DataStats | None = None,
) -> tuple[dict[str, np.ndarray], DataStats]:
    """Prompt-only arrays for rollouts (prompt_ids, prompt_mask, prompt_positions).

    Accepts strings or examples; `unique=True` keeps the first occurrence of each distinct prompt.
    """
    pad_id, eos_id = special_ids(tokenizer, pad_id, eos_id)
    texts = [p if isinstance(p, str) else p.prompt for p in prompts]
    stats = stats if stats is not None else DataStats(num_rows=len(texts))
    if unique:
        texts = list(dict.fromkeys(texts))
    ids, long, how = _unique_encode_prompts(texts, tokenizer, max_prompt_len, prompt_truncation, add_bos)
    keep = np.ones(len(texts), bool)
    if skip_long_prompts:
        stats.skip("prompt_too_long", int(long.sum()))
        keep &= ~long
    _count_truncations(stats, how, keep, prompt_truncation, max_prompt_len)
    idx = np.flatnonzero(keep)
    stats.num_examples = len(idx)
    stats.log()
    return collate_prompts([ids[i] for i in idx], max_prompt_len, pad_id), stats
