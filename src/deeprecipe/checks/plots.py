"""The checks' own plots (matplotlib, Agg): class counts, prediction dynamics, the LR range test."""

from __future__ import annotations

from pathlib import Path

from deeprecipe.engine.plots import plt, save_figure


def bars(values: list[float], names: list[str], path: Path, title: str) -> None:
    fig, ax = plt.subplots(figsize=(max(4, 0.35 * len(values)), 3))
    ax.bar(range(len(values)), values)
    if len(names) <= 40:
        ax.set_xticks(range(len(values)), names, rotation=90, fontsize=7)
    ax.set_title(title)
    save_figure(fig, path)


def dynamics(steps: list[int], probs: list[list[float]], path: Path) -> None:
    """probs[k][i]: probability of the true target of fixed example i at steps[k] (exp of its mean loss)."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    cols = list(zip(*probs))
    for c in cols:
        ax.plot(steps, c, color="tab:blue", alpha=0.35, lw=1)
    ax.plot(steps, [sum(r) / len(r) for r in probs], color="black", lw=2, label="mean")
    ax.set_xlabel("step"), ax.set_ylabel("p(true target)"), ax.set_ylim(0, 1), ax.legend()
    ax.set_title("predictions on a fixed held-out batch during training")
    save_figure(fig, path)


def lr_curve(lrs: list[float], losses: list[float], suggestion: float, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(lrs, losses)
    ax.axvline(suggestion, color="tab:red", ls="--", label=f"suggested lr {suggestion:.2g}")
    ax.set_xscale("log"), ax.set_xlabel("learning rate"), ax.set_ylabel("loss (smoothed)"), ax.legend()
    ax.set_title("learning-rate range test")
    save_figure(fig, path)
