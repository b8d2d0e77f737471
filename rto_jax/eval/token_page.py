"""A self-contained HTML page of sampled responses with every token coloured by its token reward.

    render(samples, title=..., color_by=..., scale=..., meta=..., notes=...) -> str
        one page: a legend (the colour scale, the coefficients), then per sample the prompt (collapsed),
        the response with one <span> per response token, coloured on a diverging scale by the sum of
        the parts named in `color_by` (RTO: the DPO token reward), the reward model's score at the end,
        and the per-sample sums of each part
    token_strings(ids, decode) -> [str]   readable text of each token (byte-level BPE markers decoded)

A pure function of plain data (strings, lists of floats, dicts): the evaluation stage computes the
numbers (rto_jax/pipeline/evaluate.py) and this module only lays them out. Every token's values are in
its `title` (the hover tooltip) and in data attributes (`data-id`, `data-<part>`, `data-lr-<model>`,
`data-color`), so tests and scripts can read them back. No external URL, font or script: the file
opens from disk anywhere.
"""

from __future__ import annotations

import dataclasses
import html
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

NEGATIVE = (202, 0, 32)  # red: the reward pushes the token down
POSITIVE = (5, 113, 176)  # blue: the reward pushes the token up
SEP = " \u00b7 "
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")  # shown as \xNN (not valid in HTML text)


@dataclasses.dataclass
class SampleView:
    """One sampled response, its valid tokens only (up to and including EOS; no padding).

    parts: the token reward's parts per token (e.g. {"dpo", "kl", "score"}), each `len(tokens)` long.
    log_ratios: {model: log pi_model(y_h) - log pi_ref(y_h)} per token; "policy" is the sampled policy.
    raw_score: the reward model's score; score: as PPO uses it (normalized, clipped, EOS penalty).
    info: other per-sample numbers shown in its header (judge score, win, ...).
    """

    prompt: str
    tokens: list[str]
    token_ids: list[int]
    parts: dict[str, list[float]]
    log_ratios: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    raw_score: float | None = None
    score: float | None = None
    eos: bool = False
    info: dict[str, Any] = dataclasses.field(default_factory=dict)


def token_strings(ids: Sequence[int], decode: Callable[[list[int]], str], window: int = 4) -> list[str]:
    """The text each token adds to the decoded response: `decode(ids[i-w:i+1])` minus `decode(ids[i-w:i])`.

    Decoding a short window rather than the token alone keeps what a lone token loses (the leading
    space of SentencePiece pieces; a UTF-8 character split over two byte-level tokens is shown on the
    token that completes it). Linear in the length.
    """
    ids = [int(i) for i in ids]
    out = []
    for i in range(len(ids)):
        before = decode(ids[max(0, i - window) : i]) if i else ""
        after = decode(ids[max(0, i - window) : i + 1])
        common = 0
        while common < min(len(before), len(after)) and before[common] == after[common]:
            common += 1
        out.append(after[common:] if common == len(before) else decode([ids[i]]))
    return out


def attr_name(name: str) -> str:
    """A data-attribute-safe form of a part or model name."""
    return re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-") or "x"


def color_values(sample: SampleView, color_by: Sequence[str]) -> list[float]:
    """The per-token value that sets each token's colour: the sum of the parts in `color_by`."""
    return [sum(sample.parts[name][i] for name in color_by) for i in range(len(sample.tokens))]


def default_scale(samples: Sequence[SampleView], color_by: Sequence[str]) -> float:
    """The largest |value| over the page (the colour saturates there); 1 when every value is 0."""
    values = [abs(v) for s in samples for v in color_values(s, color_by) if math.isfinite(v)]
    return max(values, default=0.0) or 1.0


def _rgb(value: float, scale: float) -> tuple[str, bool]:
    """Background colour of `value` on the diverging scale [-scale, scale] (white at 0), and whether
    the text should be light."""
    if not math.isfinite(value):
        return "rgb(160,160,160)", False
    t = max(-1.0, min(1.0, value / scale)) if scale > 0 else 0.0
    c = POSITIVE if t > 0 else NEGATIVE
    a = abs(t)
    mix = [round(255 * (1 - a) + x * a) for x in c]
    return f"rgb({mix[0]},{mix[1]},{mix[2]})", a > 0.6


def _num(x) -> str:
    """A value for data attributes (round-trips to float32 precision)."""
    return "nan" if x is None else f"{float(x):.7g}"


def _signed(x, digits: int = 4) -> str:
    return "n/a" if x is None else f"{float(x):+.{digits}g}"


def _shown(text: str) -> str:
    """A token's text as displayed: newlines get a visible mark (and still break the line), tabs a
    visible arrow, other control characters are written \\xNN; an empty token (a partial UTF-8
    character) a dotted circle."""
    if text == "":
        return "\u25cc"
    text = text.replace("\r", "").replace("\n", "\u21b5\n").replace("\t", "\u2192\t")
    return CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def _lr_label(model: str) -> str:
    return "log \u03c0/\u03c0_ref" if model == "policy" else f"log \u03c0_{model}/\u03c0_ref"


def _short(text: str, head: int = 90, tail: int = 90) -> str:
    text = " ".join(text.split())
    return text if len(text) <= head + tail + 5 else f"{text[:head]} \u2026 {text[-tail:]}"


CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 1.5em auto; max-width: 1100px;
       color: #222; background: #fff; line-height: 1.45; padding: 0 1em; }
h1 { font-size: 1.35em; margin-bottom: .2em; }
.meta { border-collapse: collapse; font-size: .88em; margin: .5em 0; }
.meta td { padding: 1px 10px 1px 0; vertical-align: top; }
.meta td:first-child { color: #666; white-space: nowrap; }
.note { background: #fff6d5; border-left: 4px solid #e0b000; padding: .3em .7em; font-size: .9em; }
.legend { display: flex; align-items: center; gap: .6em; font-size: .88em; margin: .8em 0; }
.bar { width: 260px; height: 14px; border: 1px solid #aaa;
       background: linear-gradient(to right, rgb(202,0,32), #fff, rgb(5,113,176)); }
.sample { border: 1px solid #ddd; border-radius: 6px; padding: .6em .9em; margin: 1em 0; }
.sample h2 { font-size: 1em; margin: 0 0 .3em 0; }
.sample h2 small { font-weight: normal; color: #555; }
details { font-size: .88em; color: #444; margin-bottom: .4em; }
details pre { white-space: pre-wrap; background: #f6f6f6; padding: .5em; margin: .3em 0; }
.response { font-family: ui-monospace, "DejaVu Sans Mono", Menlo, monospace; font-size: .95em;
            white-space: pre-wrap; word-break: break-word; line-height: 1.9; }
.response span.tok { padding: 1px 0; border-radius: 2px; box-shadow: inset -1px 0 0 rgba(255,255,255,.8); }
.response span:hover { outline: 2px solid #000; }
.response span.light { color: #fff; }
.response span.eos { border: 1px dashed #333; font-size: .85em; }
.score { display: inline-block; margin-left: .4em; padding: 0 .5em; border-radius: 10px; background: #333;
         color: #fff; font-family: system-ui, sans-serif; font-size: .82em; white-space: nowrap; }
.sums { border-collapse: collapse; font-size: .84em; margin-top: .5em; }
.sums td, .sums th { border: 1px solid #ddd; padding: 1px 8px; text-align: right; }
.sums th { background: #f3f3f3; font-weight: 600; }
"""


def _token_span(sample: SampleView, i: int, value: float, scale: float, eos_id: int | None) -> str:
    token, token_id = sample.tokens[i], int(sample.token_ids[i])
    background, light = _rgb(value, scale)
    lines = [f"{token!r}  id {token_id}" + ("  (EOS)" if token_id == eos_id else "")]
    lines += [f"{name} part: {_signed(values[i])}" for name, values in sample.parts.items()]
    lines += [f"{_lr_label(model)}: {_signed(values[i])}" for model, values in sample.log_ratios.items()]
    lines.append(f"token reward: {_signed(sum(values[i] for values in sample.parts.values()))}")
    attrs = [f'data-id="{token_id}"', f'data-color="{_num(value)}"']
    attrs += [f'data-{attr_name(name)}="{_num(values[i])}"' for name, values in sample.parts.items()]
    attrs += [f'data-lr-{attr_name(model)}="{_num(values[i])}"' for model, values in sample.log_ratios.items()]
    classes = ["tok"] + (["light"] if light else []) + (["eos"] if token_id == eos_id else [])
    return (
        f'<span class="{" ".join(classes)}" style="background:{background}" {" ".join(attrs)} '
        f'title="{html.escape(chr(10).join(lines), quote=True)}">{html.escape(_shown(token))}</span>'
    )


def _score_badge(sample: SampleView, unused: bool) -> str:
    if sample.raw_score is None:
        return ""
    text = f"RM score {_signed(sample.raw_score)}"
    tip = [f"reward model's raw score: {_signed(sample.raw_score, 6)}"]
    if sample.score is not None:
        text += f" \u2192 {_signed(sample.score)} for PPO"
        how = "normalized, clipped" + ("" if sample.eos else ", minus the missing-EOS penalty")
        tip.append(f"as PPO uses it ({how}): {_signed(sample.score, 6)}")
    if sample.parts.get("score"):
        tip.append(f"score part at the last token: {_signed(sample.parts['score'][-1], 6)}")
    elif unused:
        text += " (not in this reward)"
    if not sample.eos:
        text += " \u00b7 no EOS"
    return (
        f'<span class="score" data-raw-score="{_num(sample.raw_score)}" data-score="{_num(sample.score)}" '
        f'title="{html.escape(chr(10).join(tip), quote=True)}">{html.escape(text)}</span>'
    )


def _sums_table(sample: SampleView) -> str:
    cols = [(f"\u03a3 {name}", sum(values)) for name, values in sample.parts.items()]
    cols.append(("\u03a3 token reward", sum(sum(values) for values in sample.parts.values())))
    cols += [(f"\u03a3 {_lr_label(model)}", sum(values)) for model, values in sample.log_ratios.items()]
    head = "".join(f"<th>{html.escape(name)}</th>" for name, _ in cols)
    body = "".join(f"<td>{html.escape(_signed(value))}</td>" for _, value in cols)
    return f'<table class="sums"><tr>{head}</tr><tr>{body}</tr></table>'


def render(
    samples: Sequence[SampleView],
    *,
    title: str,
    color_by: Sequence[str],
    scale: float | None = None,
    meta: Mapping[str, Any] | None = None,
    notes: Sequence[str] = (),
    eos_id: int | None = None,
    score_unused: bool = False,
) -> str:
    """The HTML page (a string) of `samples`.

    color_by: the parts whose per-token sum sets the colour (RTO: ["dpo"]); its description is in
    the legend. scale: the |value| at which the colour saturates (default: the page's largest).
    meta: ordered {label: value} shown in the header (policy, token reward, coefficients, ...).
    notes: highlighted remarks (e.g. that there is no DPO part). score_unused: the reward model's
    score is shown but is no part of the token reward.
    """
    color_by = list(color_by)
    scale = float(scale) if scale and scale > 0 else default_scale(samples, color_by)
    what = " + ".join(color_by) if color_by else "nothing"
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title>",
        f"<style>{CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    if meta:
        rows = "".join(
            f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(str(v))}</td></tr>" for k, v in meta.items()
        )
        out.append(f'<table class="meta">{rows}</table>')
    out += [f'<p class="note">{html.escape(note)}</p>' for note in notes]
    out.append(
        f'<div class="legend"><span>colour: per-token <b>{html.escape(what)}</b></span>'
        f'<span>{_signed(-scale, 3)}</span><span class="bar"></span><span>{_signed(scale, 3)}</span>'
        "<span>(red: pushed down, blue: pushed up; hover a token for every part)</span></div>"
    )
    for index, sample in enumerate(samples):
        values = color_values(sample, color_by)
        header = [f"{len(sample.tokens)} tokens", "EOS" if sample.eos else "no EOS"]
        header += [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in sample.info.items()]
        spans = "".join(_token_span(sample, i, values[i], scale, eos_id) for i in range(len(sample.tokens)))
        out += [
            f'<section class="sample" data-index="{index}">',
            f"<h2>sample {index} <small>{html.escape(SEP.join(header))}</small></h2>",
            f"<details><summary>prompt: {html.escape(_short(sample.prompt))}</summary>",
            f"<pre>{html.escape(sample.prompt)}</pre></details>",
            f'<div class="response">{spans}{_score_badge(sample, score_unused)}</div>',
            _sums_table(sample),
            "</section>",
        ]
    out.append("</body></html>")
    return "\n".join(out) + "\n"
