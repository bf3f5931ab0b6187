"""Plots for the run folder (matplotlib, Agg backend: no display needed). Each writes one PNG atomically."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from deeprecipe.engine.atomic import atomic_write  # noqa: E402


def save_figure(fig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=110, bbox_inches="tight"))
    plt.close(fig)


FRACTIONS = ("acc", "top5", "iou")  # metrics named so are fractions in [0, 1]


def fraction_ylim(values: list[float]) -> tuple[float, float]:
    """The y range of a fraction's curve: up to 1 (perfect) from a tenth at or below its lowest value, at most 0.9,
    so that 0.983 -> 0.989 reads as the small step it is rather than filling the plot."""
    low = min(0.9, math.floor(min(values) * 10) / 10)
    return low, 1 + 0.02 * (1 - low)  # a little room above 1 for the markers


def curves(rows: list[dict], path: Path) -> None:
    """Training loss and every val_* metric against the step (fractions such as accuracy on a fixed-scale axis)."""
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
        values = [v for _, v in pts]
        if k.endswith(FRACTIONS) and 0 <= min(values) and max(values) <= 1:
            ax.set_ylim(*fraction_ylim(values))
    save_figure(fig, path)


def confusion(matrix: list[list[int]], names: list[str], path: Path, title: str = "confusion matrix") -> None:
    m = torch.tensor(matrix, dtype=torch.float)
    n = len(names)
    fig, ax = plt.subplots(figsize=(1 + 0.5 * n, 0.5 + 0.5 * n))
    ax.imshow(m / m.sum(1, keepdim=True).clamp_min(1), cmap="Blues", vmin=0, vmax=1)
    if n <= 30:
        for i in range(n):
            for j in range(n):
                ax.text(
                    j,
                    i,
                    int(m[i, j]),
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if m[i, j] > 0.5 * m[i].sum() else "black",
                )
        ax.set_xticks(range(n), names, rotation=90, fontsize=7)
        ax.set_yticks(range(n), names, fontsize=7)
    ax.set_xlabel("predicted"), ax.set_ylabel("true"), ax.set_title(title)
    save_figure(fig, path)


def image_grid(images: torch.Tensor, captions: list[str] | None, path: Path, title: str = "", cols: int = 8) -> None:
    """images: (N, C, H, W) floats in [0, 1]. One canvas in one axes (a subplot per image is ~10x slower)."""
    n, (C, H, W) = len(images), images.shape[1:]
    cols = max(1, min(cols, n))
    rows = max(1, (n + cols - 1) // cols)
    cell_in = 1.4  # inches per cell: small images are scaled up, large ones down
    scale = cell_in / (W * 1.1)  # inches per pixel
    gap_w = int(W * 0.1) + 1
    gap_h = round((0.36 if captions else 0.08) / scale) + 1  # room for a two-line caption under each image
    canvas = torch.ones(rows * (H + gap_h), cols * (W + gap_w), 3)
    for i in range(n):
        r, c = divmod(i, cols)
        img = images[i].float().clamp(0, 1).permute(1, 2, 0)
        canvas[r * (H + gap_h) : r * (H + gap_h) + H, c * (W + gap_w) : c * (W + gap_w) + W] = (
            img.expand(H, W, 3) if C == 1 else img[..., :3]
        )
    fig = plt.figure(figsize=(canvas.shape[1] * scale, canvas.shape[0] * scale + (0.3 if title else 0)))
    ax = fig.add_axes((0, 0, 1, canvas.shape[0] * scale / fig.get_figheight()))
    ax.imshow(canvas.numpy(), interpolation="nearest" if W <= 96 else "antialiased", aspect="equal")
    ax.axis("off")
    for i, cap in enumerate(captions or []):
        r, c = divmod(i, cols)
        ax.text(c * (W + gap_w) + W / 2, r * (H + gap_h) + H + 0.03 / scale, cap, fontsize=6, ha="center", va="top")
    if title:
        fig.suptitle(title, fontsize=9, y=1 - 0.1 / fig.get_figheight())
    save_figure(fig, path)
