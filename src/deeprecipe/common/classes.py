"""Class scores, shared by the families that predict one class per example (classify, video, text classification)
and the GAN (which augments real images as classify does): per-example crops and flips of an image batch, the batch
a classifier sees, logits over a split, the metrics of logits, and one prediction as `predict` reports it.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from deeprecipe.config import Config
from deeprecipe.core import DataSpec
from deeprecipe.data.core import Data, Draws, eval_batches
from deeprecipe.data.image_ops import normalize
from deeprecipe.runtime import Runtime


def random_crop(x: torch.Tensor, pad: int, draws: Draws) -> torch.Tensor:
    """Per-example random crop of a zero-padded batch, as two gathers (no Python loop over examples)."""
    B, C, H, W = x.shape
    xp = F.pad(x, (pad, pad, pad, pad))  # (B, C, H+2p, W+2p)
    dy = draws.randint(2 * pad + 1, B).view(B, 1)
    dx = draws.randint(2 * pad + 1, B).view(B, 1)
    rows = (dy + torch.arange(H, device=x.device)).view(B, 1, H, 1).expand(B, C, H, W + 2 * pad)
    cols = (dx + torch.arange(W, device=x.device)).view(B, 1, 1, W).expand(B, C, H, W)
    return xp.gather(2, rows).gather(3, cols)  # (B, C, H, W)


def erase_boxes(n: int, size: tuple[int, int], p: float, draws: Draws) -> torch.Tensor:
    """Random erasing's rectangles as a (n, H, W) bool mask: with chance p an example gets one box of 2-33% of the
    image with aspect ratio (h / w) log-uniform in [1/3, 3], placed uniformly inside it; the others get none."""
    H, W = size
    u = draws.uniform(n, 5)  # area, aspect, top, left, on: one column each, so each is independent of the others
    area = H * W * (0.02 + 0.31 * u[:, 0])
    aspect = torch.exp(math.log(3.0) * (2 * u[:, 1] - 1))
    h = (area * aspect).sqrt().round().clamp(1, H)
    w = (area / aspect).sqrt().round().clamp(1, W)
    top, left = (u[:, 2] * (H - h + 1)).floor(), (u[:, 3] * (W - w + 1)).floor()
    rows = torch.arange(H, device=u.device).view(1, H)
    cols = torch.arange(W, device=u.device).view(1, W)
    inside_r = (rows >= top[:, None]) & (rows < (top + h)[:, None])  # (n, H)
    inside_c = (cols >= left[:, None]) & (cols < (left + w)[:, None])  # (n, W)
    return (u[:, 4] < p).view(n, 1, 1) & inside_r[:, :, None] & inside_c[:, None, :]


def augment(x: torch.Tensor, spec: DataSpec, draws: Draws) -> torch.Tensor:
    pad, flip, erase = spec.extra.get("crop_pad", 0), spec.extra.get("flip", False), spec.extra.get("erase", 0.0)
    if pad:
        x = random_crop(x, pad, draws)
    if flip:
        mask = draws.rand(len(x)) < 0.5
        x = torch.where(mask.view(-1, *[1] * (x.ndim - 1)), x.flip(-1), x)
    if erase and x.ndim == 4:  # normalized images: 0 is the data set's mean colour
        x = x.masked_fill(erase_boxes(len(x), x.shape[-2:], erase, draws)[:, None], 0.0)
    return x


def prepare(batch, spec: DataSpec, draws: Draws | None = None):
    """uint8 images -> normalized floats, cropped and flipped when `draws` is given; labels unchanged."""
    x, y = batch
    x = normalize(x, spec)
    if draws is not None:
        x = augment(x, spec, draws)
    if x.ndim == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y


def predict_split(
    model: nn.Module, data: Data, split: str, cfg: Config, rt: Runtime, prepare=prepare
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (N, classes) in fp32 on the CPU, and labels (N,), over a whole split (batches through `prepare`)."""
    logits, labels = [], []
    for batch in eval_batches(data.split(split), cfg.train.eval_batch_size, rt.device, cfg.train.limit_eval):
        x, y = prepare(batch, data.spec)
        logits.append(model(x).float().cpu())
        labels.append(y.cpu())
    return torch.cat(logits), torch.cat(labels)


def metrics(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict:
    from torchmetrics.functional.classification import (
        multiclass_accuracy,
        multiclass_confusion_matrix,
        multiclass_precision,
        multiclass_recall,
    )

    out = {
        "loss": F.cross_entropy(logits, labels).item(),
        "acc": multiclass_accuracy(logits, labels, num_classes, average="micro").item(),
    }
    if num_classes > 5:
        out["top5"] = multiclass_accuracy(logits, labels, num_classes, top_k=5, average="micro").item()
    out["precision"] = multiclass_precision(logits, labels, num_classes, average=None).tolist()
    out["recall"] = multiclass_recall(logits, labels, num_classes, average=None).tolist()
    out["confusion"] = multiclass_confusion_matrix(logits, labels, num_classes).tolist()
    return out


def top_labels(name: str, probs: torch.Tensor, class_names: list[str], k: int = 3) -> dict:
    """One prediction as `predict` reports it: the best label, its probability and the top k."""
    top = probs.topk(min(k, len(probs)))
    labels = [{"label": class_names[i], "prob": round(float(p), 4)} for p, i in zip(top.values, top.indices)]
    best = labels[0]
    return {
        "file": name,
        "label": best["label"],
        "prob": best["prob"],
        "top": labels,
        "text": f"{name}: {best['label']} ({best['prob']:.3f})",
    }
