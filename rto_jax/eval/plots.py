"""Headless matplotlib plots of a comparison's results (PNG)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: no display on training machines
import matplotlib.pyplot as plt  # noqa: E402

# One colour per method in every plot, so the two figures read together.
_COLORS = {"sft": "C0", "dpo": "C1", "ppo": "C2", "rto": "C3", "rto_sequence_end": "C4", "rto_no_rm": "C5"}


def _color(name: str, index: int):
    return _COLORS.get(name, f"C{(6 + index) % 10}")


def plot_gold_vs_episodes(curves: dict[str, list], path: str | Path, title: str = "") -> Path:
    """curves: method -> [(episodes, gold reward), ...] (or [(episodes, mean, se), ...] across seeds)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for index, (name, curve) in enumerate(curves.items()):
        xs = [p[0] for p in curve]
        ys = [p[1] for p in curve]
        ax.plot(xs, ys, marker="o", markersize=3, label=name, color=_color(name, index))
        if curve and len(curve[0]) > 2:
            se = [p[2] for p in curve]
            ax.fill_between(
                xs,
                [y - s for y, s in zip(ys, se)],
                [y + s for y, s in zip(ys, se)],
                alpha=0.2,
                color=_color(name, index),
            )
    ax.set_xlabel("episodes (prompts rolled out)")
    ax.set_ylabel("gold reward (held-out prompts)")
    ax.set_title(title or "Gold reward vs episodes")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_gold_vs_kl(methods: dict[str, dict], best_of_n: list[dict], path: str | Path, title: str = "") -> Path:
    """Each method's (KL to pi_sft, gold reward) with standard errors, over the best-of-n frontier."""
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(
        [p["kl"] for p in best_of_n], [p["gold_reward"] for p in best_of_n], color="gray", label="best-of-n (pi_sft)"
    )
    for n in (1, 4, 16, 64):
        if n <= len(best_of_n):
            p = best_of_n[n - 1]
            ax.annotate(f"n={n}", (p["kl"], p["gold_reward"]), fontsize=7, color="gray")
    for index, (name, m) in enumerate(methods.items()):
        ax.errorbar(
            m["kl"],
            m["gold_reward"],
            yerr=m.get("gold_reward_se", 0.0),
            xerr=m.get("kl_se", 0.0),
            fmt="o",
            capsize=3,
            label=name,
            color=_color(name, index),
        )
    ax.set_xlabel("KL(pi || pi_sft) (nats per response)")
    ax.set_ylabel("gold reward (held-out prompts)")
    ax.set_title(title or "Gold reward vs KL")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
