"""Class scores, shared by the families that predict one class per example (classify, video, text classification)
and the GAN (which augments real images as classify does): per-example crops and flips of an image batch, the batch
a classifier sees, logits over a split, the metrics of logits, and one prediction as `predict` reports it.
"""

from __future__ import annotations

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


def augment(x: torch.Tensor, spec: DataSpec, draws: Draws) -> torch.Tensor:
    pad, flip = spec.extra.get("crop_pad", 0), spec.extra.get("flip", False)
    if pad:
        x = random_crop(x, pad, draws)
    if flip:
        mask = draws.rand(len(x)) < 0.5
        x = torch.where(mask.view(-1, *[1] * (x.ndim - 1)), x.flip(-1), x)
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
