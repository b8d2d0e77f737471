"""How well a token reward assigns credit, on a task whose true per-token credit is known (the
synthetic task's `gold_token_credit`, which sums to the gold reward r* over each response).

The paper's argument for RTO is that DPO's implicit per-token reward is good token-level credit.
On the synthetic task that is measurable: each part of a token reward (the DPO term, the reward
model's score at the last token, the KL penalty, ...) is correlated with the gold credit

  per token     Pearson over every valid token of every response: does the part put more reward
                on the tokens that earned more of r*?
  per response  Pearson over responses of the part's sum with r*: does it rank whole responses
                as the gold reward does? (For the score part, the reward model's accuracy as a
                sequence reward.)

Pure numpy on host arrays; `nan` where a correlation is undefined (a part constant over the batch).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np


def pearson(a, b, weights=None) -> float:
    """Pearson correlation of `a` and `b` (same shape) over the entries where `weights` > 0 (all
    entries when None); nan when either side is constant there or fewer than 2 entries are kept."""
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    if weights is not None:
        keep = np.asarray(weights).ravel() > 0
        a, b = a[keep], b[keep]
    if a.size < 2:
        return float("nan")
    a, b = a - a.mean(), b - b.mean()
    denominator = np.sqrt((a * a).sum() * (b * b).sum())
    # A constant side (up to float rounding of its values) has no correlation to report.
    if denominator <= 1e-12 * max(1.0, float(np.abs(a).max() + np.abs(b).max())) ** 2:
        return float("nan")
    return float((a * b).sum() / denominator)


def credit_correlations(parts: Mapping[str, np.ndarray], gold_credit, mask, quality_credit=None) -> dict[str, float]:
    """Per part of a token reward (`parts` {name: [B, R]}, 0 outside `mask` [B, R]) against the gold
    credit [B, R] (0 outside the mask):

      <name>_token     per-token Pearson with the gold credit
      <name>_quality   per-token Pearson with `quality_credit` [B, R] (the gold credit's token-level
                       term alone, without the sequence-level constants it puts on the last token)
      <name>_response  Pearson of the part's per-response sum with r* = the gold credit's sum
    """
    mask = np.asarray(mask) > 0
    gold_credit = np.where(mask, np.asarray(gold_credit, np.float64), 0.0)
    gold = gold_credit.sum(axis=1)
    out = {}
    for name, part in parts.items():
        part = np.where(mask, np.asarray(part, np.float64), 0.0)
        out[f"{name}_token"] = pearson(part, gold_credit, mask)
        if quality_credit is not None:
            out[f"{name}_quality"] = pearson(part, quality_credit, mask)
        out[f"{name}_response"] = pearson(part.sum(axis=1), gold)
    return out


def token_scale(part, mask) -> float:
    """The standard deviation of `part` [B, R] over the valid tokens of `mask` (what sets how much
    a dense term moves the advantages: a constant offset per token does not)."""
    values = np.asarray(part, np.float64)[np.asarray(mask) > 0]
    return float(values.std()) if values.size else 0.0
