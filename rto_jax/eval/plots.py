"""Headless matplotlib plots of a comparison's results (PNG)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: no display on training machines
import matplotlib.pyplot as plt  # noqa: E402

# One colour per method in every plot, so the two figures read together.
_COLORS = {
    "sft": "C0", "dpo": "C1", "ppo": "C2", "rto": "C3", "rto_sequence_end": "C4", "rto_no_rm": "C5",
    "oracle_dense": "C9", "oracle_rm": "C6",
}  # fmt: skip


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


def _panels(count: int):
    cols = min(count, 4)
    rows = -(-count // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.0 * rows), squeeze=False)
    for ax in axes.flat[count:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:count])


def _label_panel(ax, title: str, xlabel: str) -> None:
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel("gold reward", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def _save_panels(fig, path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_study_curves(cells: dict[str, dict], path: str | Path) -> Path:
    """One panel per study cell: every method's mean held-out gold reward vs episodes over the seeds,
    with the 95% interval as a band (experiments/synthetic_study_report.py's `cells`)."""
    fig, axes = _panels(len(cells))
    for ax, (name, cell) in zip(axes, cells.items()):
        for index, (method, m) in enumerate(cell["methods"].items()):
            xs = [p["episodes"] for p in m["curve"]]
            color = _color(method, index)
            ax.plot(xs, [p["gold"]["mean"] for p in m["curve"]], marker="o", markersize=2, label=method, color=color)
            ax.fill_between(
                xs, [p["gold"]["low"] for p in m["curve"]], [p["gold"]["high"] for p in m["curve"]], alpha=0.2, color=color
            )  # fmt: skip
        _label_panel(ax, f"{name} (n={cell['n']})", "episodes")
    return _save_panels(fig, path)


def plot_study_differences(cells: dict[str, dict], path: str | Path, baseline: str = "ppo") -> Path:
    """One panel per study cell: each method's gold reward minus the baseline's, seed by seed, along
    training (mean over seeds, 95% interval as a band): above 0 where the method is ahead at that
    many episodes. A method's `minus_<baseline>_curve` holds the paired differences."""
    fig, axes = _panels(len(cells))
    for ax, (name, cell) in zip(axes, cells.items()):
        ax.axhline(0.0, color="gray", linewidth=0.8)
        for index, (method, m) in enumerate(cell["methods"].items()):
            if method == baseline:
                continue
            curve, color = m[f"minus_{baseline}_curve"], _color(method, index)
            xs = [p["episodes"] for p in curve]
            label = f"{method} - {baseline}"
            ax.plot(xs, [p["mean"] for p in curve], marker="o", markersize=2, color=color, label=label)
            ax.fill_between(xs, [p["low"] for p in curve], [p["high"] for p in curve], alpha=0.15, color=color)
        _label_panel(ax, f"{name} (n={cell['n']})", "episodes")
        ax.set_ylabel(f"gold reward, method - {baseline}", fontsize=8)
    return _save_panels(fig, path)


def plot_study_frontier(cells: dict[str, dict], path: str | Path, sweep: list[str] = ()) -> Path:
    """One panel per study cell: gold reward vs KL(pi || pi_sft) along each method's training (means
    over seeds), its final point with 95% intervals, and pi_sft's best-of-n frontier as reference.

    sweep: cells that differ only in the KL coefficient: a last panel joins each method's final
    points across them (the method's gold-vs-KL frontier)."""
    fig, axes = _panels(len(cells) + bool(sweep))
    if sweep:
        ax = axes.pop()
        bon = cells[sweep[0]]["best_of_n"]
        ax.plot([p["kl"] for p in bon], [p["gold_reward"] for p in bon], color="gray", label="best-of-n")
        for index, method in enumerate(cells[sweep[0]]["methods"]):
            finals = sorted(
                (cells[c]["methods"][method]["kl_to_ref"]["mean"], cells[c]["methods"][method]["gold_reward"]["mean"])
                for c in sweep
                if method in cells[c]["methods"]
            )
            ax.plot(*zip(*finals), marker="o", color=_color(method, index), label=method)
        _label_panel(ax, "final points across " + ", ".join(sweep), "KL to pi_sft (nats)")
        ax.title.set_fontsize(7)
    for ax, (name, cell) in zip(axes, cells.items()):
        bon = cell["best_of_n"]
        ax.plot([p["kl"] for p in bon], [p["gold_reward"] for p in bon], color="gray", label="best-of-n")
        for index, (method, m) in enumerate(cell["methods"].items()):
            color = _color(method, index)
            ax.plot([p["kl"] for p in m["curve"]], [p["gold"]["mean"] for p in m["curve"]], color=color, alpha=0.5)
            gold, kl = m["gold_reward"], m["kl_to_ref"]
            # A cell with one seed has no interval (nan): its point is drawn without error bars.
            ax.errorbar(
                kl["mean"], gold["mean"],
                yerr=None if gold["n"] < 2 else [[gold["mean"] - gold["low"]], [gold["high"] - gold["mean"]]],
                xerr=None if kl["n"] < 2 else [[kl["mean"] - kl["low"]], [kl["high"] - kl["mean"]]],
                fmt="o", capsize=2, color=color, label=method,
            )  # fmt: skip
        _label_panel(ax, f"{name} (n={cell['n']})", "KL to pi_sft (nats)")
    return _save_panels(fig, path)


def plot_study_reach(
    cells: dict[str, dict], path: str | Path, baseline: str = "ppo", data_fraction: float = 1 / 8
) -> Path:
    """One panel per study cell: for fractions f of the baseline's final gain over pi_sft, each
    method's median episodes (over seeds) to first reach pi_sft + f * gain; a dashed line at
    `data_fraction` of the baseline's own (the paper's claim: PPO's level with 1/8 of the data). A
    method's `reach_fractions` is [{fraction, median}, ...], median None where most seeds never got there."""
    fig, axes = _panels(len(cells))
    for ax, (name, cell) in zip(axes, cells.items()):
        for index, (method, m) in enumerate(cell["methods"].items()):
            points = [(p["fraction"], p["median"]) for p in m["reach_fractions"] if p["median"] is not None]
            if points:
                ax.plot(*zip(*points), marker="o", markersize=3, color=_color(method, index), label=method)
        claim = [(p["fraction"], p["median"] * data_fraction) for p in cell["methods"][baseline]["reach_fractions"]
                 if p["median"] is not None]  # fmt: skip
        if claim:
            ax.plot(*zip(*claim), linestyle="--", color="gray", label=f"{data_fraction:.3g} x {baseline}")
        _label_panel(ax, f"{name} (n={cell['n']})", f"fraction of {baseline}'s final gain over pi_sft")
        ax.set_ylabel("episodes to reach (median)", fontsize=8)
    return _save_panels(fig, path)
