"""Row parsing: one function per dataset format, each mapping a raw row to a normalised example.

Normalised examples are plain text; tokenization lives in `tokenize.py`.

  SFTExample(prompt, response)
  PreferenceExample(prompt, chosen, rejected)

A response is everything the model generates after the prompt (no EOS; the tokenizer appends it).
Prompt and response are concatenated as *strings* by the model, so the prompt keeps its trailing
marker ("TL;DR:", "\\n\\nAssistant:", or the chat template's generation prompt) and the response
keeps its leading space.

Formats (`FORMATS`, keyed by name):

  tldr_sft                `query` + `reference_response` (vwxyzjn/summarize_from_feedback_tldr_3_filtered
                          _oai_preprocessing_* datasets; a trailing "<|endoftext|>" is removed) or
                          `reference_responses` (shared/data/tldr_sft_oai1b.csv); or the raw
                          `subreddit`/`title`/`post`/`summary` layout of
                          vwxyzjn/summarize_from_feedback_tldr_3_filtered (canonical prompt below,
                          response " " + summary).
  tldr_preference         `prompt`/`chosen`/`rejected` strings (trl-lib/tldr-preference,
                          shared/data/tldr_comparisons_10k.parquet), normalised to the TL;DR layout
                          below: a one-line "SUBREDDIT: x TITLE: y POST: z" prompt is rewritten to
                          the canonical layout and a leading "TL;DR:" is moved from both summaries
                          to the end of the prompt.
  openai_comparisons      openai/summarize_from_feedback `comparisons`: `info.{subreddit,title,post}`,
                          `summaries[0/1].text`, `choice` (index of the preferred summary).
  ultrafeedback           HuggingFaceH4/ultrafeedback_binarized (prefs splits): `chosen`/`rejected`
                          message lists; prompt = chat template of the messages before the last
                          assistant turn with add_generation_prompt=True, responses = last contents.
  ultrafeedback_sft       HuggingFaceH4/ultrafeedback_binarized (sft splits): a `messages` list, same rule.
  hh_rlhf                 Anthropic/hh-rlhf: whole dialogues in `chosen`/`rejected`; split after the
                          last "\\n\\nAssistant:" of their common prefix.
  prompt_chosen_rejected  generic preference strings `prompt`/`chosen`/`rejected`, used verbatim.
  prompt_response         generic SFT strings `prompt`/`response`, used verbatim.

Canonical TL;DR prompt (the layout of the OpenAI/vwxyzjn SFT data, shared by all TL;DR formats so
SFT, reward-model, DPO and PPO stages see the same prompts):

  "SUBREDDIT: r/{subreddit}\\n\\nTITLE: {title}\\n\\nPOST: {post}\\n\\nTL;DR:"

Error policy (applied by `parse_rows`):
  * a required column absent from the data, or a value of the wrong type / structure, means the
    data is not in the named format: `FormatError` (an `rto_jax.errors.DataError`, so a ValueError)
    naming the file, the format, the first bad row and its column, and what was expected vs found;
  * a missing (None/NaN) or empty field in one row, or chosen/rejected that do not share a
    prompt, skips that row; skipped rows are counted per reason (`SKIP_REASONS`).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from rto_jax.errors import DataError, UserError

__all__ = [
    "FORMATS",
    "SKIP_REASONS",
    "Format",
    "FormatError",
    "PreferenceExample",
    "SFTExample",
    "SkipRow",
    "get_format",
    "parse_rows",
    "tldr_prompt",
]

TLDR_MARKER = "TL;DR:"
HH_ASSISTANT = "\n\nAssistant:"

# Why a row can be skipped; the values are the sentence logged with the count.
SKIP_REASONS = {
    "missing_field": "a required field is missing (None/NaN)",
    "empty_prompt": "the prompt is empty",
    "empty_response": "a response is empty",
    "prompt_mismatch": "chosen and rejected do not share the same prompt",
    "prompt_too_long": "the prompt is longer than max_prompt_len tokens (skip_long_prompts=True)",
    "response_too_long": (
        "a response (with EOS) is longer than max_response_len tokens (drop_truncated_responses=True)"
    ),
}


@dataclasses.dataclass(frozen=True)
class SFTExample:
    prompt: str
    response: str


@dataclasses.dataclass(frozen=True)
class PreferenceExample:
    prompt: str
    chosen: str
    rejected: str


Example = SFTExample | PreferenceExample


class FormatError(DataError):
    """The data is not in the format named: `<file>: not in format 'F': row R, column 'C': <what>`.

    Row parsers raise it with the detail and the column only; `parse_rows` (and `resolve_columns`)
    add the file, the format and the row. `row` is None for the whole table, `column` None when no
    single column is at fault. A DataError, so the driver prints it as one line.
    """

    def __init__(
        self,
        message: str,
        row: int | None = None,
        column: str | None = None,
        *,
        source: str | None = None,
        format: str | None = None,  # pylint: disable=redefined-builtin
    ):
        parts = [] if source is None else [str(source)]
        if format is not None:
            parts.append(f"not in format {format!r}")
        where = "" if row is None else f"row {row}"
        if column is not None:
            where += (", " if where else "") + f"column {column!r}"
        if where:
            parts.append(where)
        UserError.__init__(self, ": ".join(parts + [message]))
        self.source = None if source is None else str(source)
        self.row, self.column, self.detail, self.format = row, column, message, format


def _preview(value: Any, limit: int = 40) -> str:
    """A short one-line repr of a value for an error message."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _got(value: Any) -> str:
    """'got int 5', 'got dict {...}': the type and a short repr of an unexpected value."""
    return f"got {type(value).__name__} {_preview(value)}"


class SkipRow(Exception):
    """Raised by a row parser for a row that is dropped (and counted) rather than fatal."""

    def __init__(self, reason: str):
        assert reason in SKIP_REASONS, reason
        super().__init__(reason)
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class Format:
    """A dataset format: its kind, the columns it needs and how to parse one row.

    `columns` lists alternatives per logical field: ("reference_response", "reference_responses")
    means either column may hold the field. `alt_columns` is a whole alternative layout, used when
    `columns` does not match. `parse(row, cols, tokenizer)` receives the resolved column names
    {field: column} and returns an example or raises SkipRow / FormatError.
    """

    name: str
    kind: str  # "sft" or "preference"
    columns: Mapping[str, tuple[str, ...]]
    parse: Callable[[Mapping[str, Any], Mapping[str, str], Any], Example]
    needs_tokenizer: bool = False
    description: str = ""
    alt_columns: Mapping[str, tuple[str, ...]] | None = None


# ----------------------------------------------------------------------------------------------
# Field helpers.


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _text(row: Mapping[str, Any], column: str, *, empty_reason: str) -> str:
    """A string field: None/NaN -> skip 'missing_field'; blank -> skip `empty_reason`."""
    value = row.get(column)
    if _is_missing(value):
        raise SkipRow("missing_field")
    if not isinstance(value, str):
        raise FormatError(f"expected a string, {_got(value)}", column=column)
    if not value.strip():
        raise SkipRow(empty_reason)
    return value


def _sub(value: Any, key: str | int, where: str, column: str) -> Any:
    """value[key] for nested structs/lists: missing -> skip, wrong container type -> FormatError.

    `where` names the nested value ("summaries[0]"), `column` the row's column that holds it."""
    if _is_missing(value):
        raise SkipRow("missing_field")
    if isinstance(key, int):
        if not isinstance(value, (list, tuple)):
            raise FormatError(f"{where}: expected a list, {_got(value)}", column=column)
        if len(value) <= key:
            raise FormatError(f"{where}: expected more than {key} entries, got {len(value)}", column=column)
        return value[key]
    if not isinstance(value, Mapping):
        raise FormatError(f"{where}: expected a struct/dict, {_got(value)}", column=column)
    if key not in value:
        raise FormatError(f"{where}: has no field {key!r} (fields: {sorted(value)})", column=column)
    return value[key]


def _nonempty(text: Any, where: str, empty_reason: str, column: str) -> str:
    if _is_missing(text):
        raise SkipRow("missing_field")
    if not isinstance(text, str):
        raise FormatError(f"{where}: expected a string, {_got(text)}", column=column)
    if not text.strip():
        raise SkipRow(empty_reason)
    return text


# ----------------------------------------------------------------------------------------------
# TL;DR.

_TLDR_CANONICAL = re.compile(r"SUBREDDIT: .*\n\nTITLE: .*\n\nPOST: .*\n\nTL;DR:\Z", re.DOTALL)
_TLDR_ONE_LINE = re.compile(r"SUBREDDIT: (?P<sub>\S+) TITLE: (?P<title>.*?) POST: (?P<post>.*)\Z", re.DOTALL)


def tldr_prompt(subreddit: str, title: str, post: str) -> str:
    """The canonical TL;DR prompt (OpenAI's layout, as in vwxyzjn/summarize_from_feedback_tldr_3)."""
    subreddit = subreddit.strip()
    if not subreddit.startswith("r/"):
        subreddit = "r/" + subreddit
    return f"SUBREDDIT: {subreddit}\n\nTITLE: {title.strip()}\n\nPOST: {post.strip()}\n\n{TLDR_MARKER}"


_EOT = "<|endoftext|>"  # The vwxyzjn preprocessing appends GPT-NeoX's EOS text to references.


def _parse_tldr_sft(row, cols, tokenizer):
    del tokenizer
    if "prompt" in cols:
        prompt = _text(row, cols["prompt"], empty_reason="empty_prompt")
        response = _text(row, cols["response"], empty_reason="empty_response")
    else:  # Raw layout of vwxyzjn/summarize_from_feedback_tldr_3_filtered.
        parts = [_text(row, cols[k], empty_reason="empty_prompt") for k in ("subreddit", "title", "post")]
        prompt = tldr_prompt(*parts)
        response = " " + _text(row, cols["summary"], empty_reason="empty_response").strip()
    if response.endswith(_EOT):
        response = response[: -len(_EOT)]
        if not response.strip():
            raise SkipRow("empty_response")
    return SFTExample(prompt, response)


def _parse_prompt_response(row, cols, tokenizer):
    del tokenizer
    return SFTExample(
        _text(row, cols["prompt"], empty_reason="empty_prompt"),
        _text(row, cols["response"], empty_reason="empty_response"),
    )


def _parse_tldr_preference(row, cols, tokenizer):
    del tokenizer
    prompt = _text(row, cols["prompt"], empty_reason="empty_prompt")
    chosen = _text(row, cols["chosen"], empty_reason="empty_response")
    rejected = _text(row, cols["rejected"], empty_reason="empty_response")
    match = _TLDR_ONE_LINE.match(prompt)
    if match and not _TLDR_CANONICAL.match(prompt):
        prompt = tldr_prompt(match["sub"], match["title"], match["post"])
    if chosen.startswith(TLDR_MARKER) and rejected.startswith(TLDR_MARKER):
        chosen, rejected = chosen[len(TLDR_MARKER) :], rejected[len(TLDR_MARKER) :]
        if not chosen.strip() or not rejected.strip():
            raise SkipRow("empty_response")
        if not prompt.rstrip().endswith(TLDR_MARKER):
            prompt = prompt.rstrip() + "\n\n" + TLDR_MARKER
    return PreferenceExample(prompt, chosen, rejected)


def _parse_openai_comparisons(row, cols, tokenizer):
    del tokenizer
    info_col, sum_col = cols["info"], cols["summaries"]
    info = row.get(info_col)
    post = _sub(info, "post", info_col, info_col)
    title = _sub(info, "title", info_col, info_col)
    subreddit = _sub(info, "subreddit", info_col, info_col)
    for name, value in (("post", post), ("title", title), ("subreddit", subreddit)):
        _nonempty(value, f"{info_col}.{name}", "empty_prompt", info_col)
    summaries = row.get(sum_col)
    texts = [_sub(_sub(summaries, i, sum_col, sum_col), "text", f"{sum_col}[{i}]", sum_col) for i in (0, 1)]
    texts = [_nonempty(t, f"{sum_col}[{i}].text", "empty_response", sum_col) for i, t in enumerate(texts)]
    choice = row.get(cols["choice"])
    if _is_missing(choice):
        raise SkipRow("missing_field")
    if isinstance(choice, bool) or not isinstance(choice, int) or choice not in (0, 1):
        raise FormatError(f"expected 0 or 1, {_got(choice)}", column=cols["choice"])
    # Summaries follow the prompt's "TL;DR:" after a space, as in the vwxyzjn preprocessing.
    return PreferenceExample(tldr_prompt(subreddit, title, post), " " + texts[choice], " " + texts[1 - choice])


# ----------------------------------------------------------------------------------------------
# Chat (UltraFeedback).


def _check_messages(messages: Any, column: str) -> list[dict]:
    if _is_missing(messages):
        raise SkipRow("missing_field")
    if not isinstance(messages, (list, tuple)) or not messages:
        raise FormatError(f"expected a non-empty list of {{role, content}} messages, {_got(messages)}", column=column)
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            raise FormatError(f"message {i}: expected a {{role, content}} message, {_got(m)}", column=column)
        if _is_missing(m["content"]):
            raise SkipRow("missing_field")
        for key in ("role", "content"):
            if not isinstance(m[key], str):
                raise FormatError(f"message {i}: {key}: expected a string, {_got(m[key])}", column=column)
        out.append({"role": m["role"], "content": m["content"]})
    if out[-1]["role"] != "assistant":
        raise FormatError(
            f"the messages should end with an assistant turn, they end with {out[-1]['role']!r}", column=column
        )
    return out


def _chat_prompt(tokenizer, messages: list[dict]) -> str:
    if tokenizer is None:
        raise ValueError("chat formats need a tokenizer (its chat template builds the prompt)")
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"tokenizer {type(tokenizer).__name__} has no chat_template; set one (tokenizer.chat_template"
            " = ...) or use a chat/instruct tokenizer"
        )
    if not messages:
        raise SkipRow("empty_prompt")
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _parse_ultrafeedback(row, cols, tokenizer):
    chosen = _check_messages(row.get(cols["chosen"]), cols["chosen"])
    rejected = _check_messages(row.get(cols["rejected"]), cols["rejected"])
    if chosen[:-1] != rejected[:-1]:
        raise SkipRow("prompt_mismatch")
    for m in (chosen[-1], rejected[-1]):
        if not m["content"].strip():
            raise SkipRow("empty_response")
    prompt = _chat_prompt(tokenizer, chosen[:-1])
    return PreferenceExample(prompt, chosen[-1]["content"], rejected[-1]["content"])


def _parse_ultrafeedback_sft(row, cols, tokenizer):
    messages = _check_messages(row.get(cols["messages"]), cols["messages"])
    if not messages[-1]["content"].strip():
        raise SkipRow("empty_response")
    return SFTExample(_chat_prompt(tokenizer, messages[:-1]), messages[-1]["content"])


# ----------------------------------------------------------------------------------------------
# HH-RLHF.


def split_hh(chosen: str, rejected: str) -> tuple[str, str, str]:
    """(prompt, chosen_response, rejected_response) of two HH dialogues.

    The prompt is the longest common prefix cut back to end with its last "\\n\\nAssistant:", so a
    response that itself contains "\\n\\nAssistant:" does not move the split.
    """
    lo, hi = 0, min(len(chosen), len(rejected))
    while lo < hi:  # Length of the common prefix by bisection (slice compares run in C).
        mid = (lo + hi + 1) // 2
        if chosen[:mid] == rejected[:mid]:
            lo = mid
        else:
            hi = mid - 1
    common = chosen[:lo]
    cut = common.rfind(HH_ASSISTANT)
    if cut < 0:
        raise SkipRow("prompt_mismatch")
    end = cut + len(HH_ASSISTANT)
    return chosen[:end], chosen[end:], rejected[end:]


def _parse_hh(row, cols, tokenizer):
    del tokenizer
    chosen = _text(row, cols["chosen"], empty_reason="empty_response")
    rejected = _text(row, cols["rejected"], empty_reason="empty_response")
    for name, text in (("chosen", chosen), ("rejected", rejected)):
        if HH_ASSISTANT not in text:
            raise FormatError(
                f"expected an HH-RLHF dialogue with a '\\n\\nAssistant:' turn, got {_preview(text)}", column=cols[name]
            )
    prompt, chosen_response, rejected_response = split_hh(chosen, rejected)
    if not chosen_response.strip() or not rejected_response.strip():
        raise SkipRow("empty_response")
    return PreferenceExample(prompt, chosen_response, rejected_response)


# ----------------------------------------------------------------------------------------------
# Generic.


def _parse_prompt_chosen_rejected(row, cols, tokenizer):
    del tokenizer
    return PreferenceExample(
        _text(row, cols["prompt"], empty_reason="empty_prompt"),
        _text(row, cols["chosen"], empty_reason="empty_response"),
        _text(row, cols["rejected"], empty_reason="empty_response"),
    )


# ----------------------------------------------------------------------------------------------
# Registry.

FORMATS: dict[str, Format] = {
    f.name: f
    for f in [
        Format(
            "tldr_sft",
            "sft",
            {"prompt": ("query",), "response": ("reference_response", "reference_responses")},
            _parse_tldr_sft,
            description="TL;DR SFT: query -> reference_response(s), or subreddit/title/post -> summary",
            alt_columns={"subreddit": ("subreddit",), "title": ("title",), "post": ("post",), "summary": ("summary",)},
        ),
        Format(
            "tldr_preference",
            "preference",
            {"prompt": ("prompt",), "chosen": ("chosen",), "rejected": ("rejected",)},
            _parse_tldr_preference,
            description="TL;DR prompt/chosen/rejected (trl-lib/tldr-preference)",
        ),
        Format(
            "openai_comparisons",
            "preference",
            {"info": ("info",), "summaries": ("summaries",), "choice": ("choice",)},
            _parse_openai_comparisons,
            description="openai/summarize_from_feedback comparisons",
        ),
        Format(
            "ultrafeedback",
            "preference",
            {"chosen": ("chosen",), "rejected": ("rejected",)},
            _parse_ultrafeedback,
            needs_tokenizer=True,
            description="HuggingFaceH4/ultrafeedback_binarized preference splits (chat messages)",
        ),
        Format(
            "ultrafeedback_sft",
            "sft",
            {"messages": ("messages",)},
            _parse_ultrafeedback_sft,
            needs_tokenizer=True,
            description="HuggingFaceH4/ultrafeedback_binarized sft splits (chat messages)",
        ),
        Format(
            "hh_rlhf",
            "preference",
            {"chosen": ("chosen",), "rejected": ("rejected",)},
            _parse_hh,
            description="Anthropic/hh-rlhf whole dialogues",
        ),
        Format(
            "prompt_chosen_rejected",
            "preference",
            {"prompt": ("prompt",), "chosen": ("chosen",), "rejected": ("rejected",)},
            _parse_prompt_chosen_rejected,
            description="generic prompt/chosen/rejected strings",
        ),
        Format(
            "prompt_response",
            "sft",
            {"prompt": ("prompt",), "response": ("response",)},
            _parse_prompt_response,
            description="generic prompt/response strings",
        ),
    ]
}


def get_format(name: str) -> Format:
    if name not in FORMATS:
        raise ValueError(f"unknown data format {name!r}; known formats: {sorted(FORMATS)}")
    return FORMATS[name]


def resolve_columns(
    fmt: Format,
    column_names: Sequence[str],
    source: str,
    column_map: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """{field: column} for this table, or FormatError naming the missing column(s), the columns
    present and the `column_map` way out.

    `column_map` overrides the column of a field, e.g. {"response": "postprocessed_response"}.
    """
    column_map = dict(column_map or {})
    layouts = [fmt.columns] + ([fmt.alt_columns] if fmt.alt_columns else [])
    known = set().union(*layouts)
    unknown = set(column_map) - known
    if unknown:
        raise ValueError(
            f"column_map fields {sorted(unknown)} are not fields of format {fmt.name!r} (fields: {sorted(known)})"
        )
    problems, first_missing = [], None
    for layout in layouts:
        resolved, missing = {}, []
        for field, candidates in layout.items():
            if field in column_map:
                candidates = (column_map[field],)
            found = [c for c in candidates if c in column_names]
            if found:
                resolved[field] = found[0]
            else:
                missing.append(" or ".join(repr(c) for c in candidates))
                first_missing = first_missing or field
        if not missing:
            return resolved
        problems.append(("missing column " if len(missing) == 1 else "missing columns ") + ", ".join(missing))
    alternative = f" (or, in the alternative layout, {problems[1]})" if len(problems) > 1 else ""
    raise FormatError(
        f"{problems[0]}{alternative}; columns present: {list(column_names)}; if another column holds "
        f"it, name it with column_map, e.g. --config.data.{fmt.kind}.column_map='{first_missing}=COLUMN'",
        row=0,
        source=source,
        format=fmt.name,
    )


def parse_rows(
    rows: Iterable[Mapping[str, Any]],
    fmt: Format | str,
    *,
    source: str = "<rows>",
    column_names: Sequence[str] | None = None,
    column_map: Mapping[str, str] | None = None,
    tokenizer: Any = None,
) -> tuple[list[Example], dict[str, int]]:
    """Parses rows into examples; returns (examples, {skip reason: count}).

    `column_names` defaults to the keys of the first row. Raises FormatError (a DataError) naming
    `source`, the format, the first bad row and its column when the data is not in the format.
    """
    fmt = get_format(fmt) if isinstance(fmt, str) else fmt
    if fmt.needs_tokenizer and tokenizer is None:
        raise ValueError(f"format {fmt.name!r} needs a tokenizer (chat template)")
    iterator = iter(rows)
    examples: list[Example] = []
    skipped: dict[str, int] = {}
    cols = None
    if column_names is not None:
        cols = resolve_columns(fmt, column_names, source, column_map)
    for index, row in enumerate(iterator):
        if cols is None:
            cols = resolve_columns(fmt, list(row.keys()), source, column_map)
        try:
            examples.append(fmt.parse(row, cols, tokenizer))
        except SkipRow as skip:
            skipped[skip.reason] = skipped.get(skip.reason, 0) + 1
        except FormatError as e:
            raise FormatError(e.detail, index, e.column, source=source, format=fmt.name) from None
    return examples, skipped
