"""Plots for the run folder (matplotlib, Agg backend: no display needed). Each writes one PNG atomically."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from deeprecipe.engine.checkpoint import atomic_write  # noqa: E402


def _save(fig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=110, bbox_inches="tight"))
    plt.close(fig)


def curves(rows: list[dict], path: Path) -> None:
    """Training loss and every val_* metric against the step."""
    keys = sorted({k for r in rows for k, v in r.items() if k.startswith("val_") and isinstance(v, (int, float))})
    fig, axes = plt.subplots(1, 1 + len(keys), figsize=(4 * (1 + len(keys)), 3), squeeze=False)
    for key in ("loss", "d_loss", "g_loss"):  # a GAN logs the losses of its two nets
        train = [(r["step"], r[key]) for r in rows if key in r]
        if train:
            axes[0, 0].plot(*zip(*train), label=f"train {key}")
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    if val:
        axes[0, 0].plot(*zip(*val), "o-", label="val loss")
    axes[0, 0].set_xlabel("step"), axes[0, 0].set_title("loss"), axes[0, 0].legend()
    for ax, k in zip(axes[0, 1:], keys):
        pts = [(r["step"], r[k]) for r in rows if k in r]
        ax.plot(*zip(*pts), "o-")
        ax.set_xlabel("step"), ax.set_title(k)
    _save(fig, path)


def confusion(matrix: list[list[int]], names: list[str], path: Path, title: str = "confusion matrix") -> None:
    m = torch.tensor(matrix, dtype=torch.float)
    n = len(names)
    fig, ax = plt.subplots(figsize=(1 + 0.5 * n, 0.5 + 0.5 * n))
    ax.imshow(m / m.sum(1, keepdim=True).clamp_min(1), cmap="Blues", vmin=0, vmax=1)
    if n <= 30:
        for i in range(n):
            for j in range(n):
                ax.text(j, i, int(m[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if m[i, j] > 0.5 * m[i].sum() else "black")
        ax.set_xticks(range(n), names, rotation=90, fontsize=7)
        ax.set_yticks(range(n), names, fontsize=7)
    ax.set_xlabel("predicted"), ax.set_ylabel("true"), ax.set_title(title)
    _save(fig, path)


def image_grid(images: torch.Tensor, captions: list[str] | None, path: Path, title: str = "", cols: int = 8) -> None:
    """images: (N, C, H, W) floats in [0, 1]."""
    n = len(images)
    rows = max(1, (n + cols - 1) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.4, rows * (1.6 if captions else 1.4)), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n:
            img = images[i].permute(1, 2, 0).clamp(0, 1).numpy()
            ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray" if img.shape[-1] == 1 else None,
                      vmin=0, vmax=1)
            if captions:
                ax.set_title(captions[i], fontsize=6)
    if title:
        fig.suptitle(title, fontsize=9)
    _save(fig, path)
