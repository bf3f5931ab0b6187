"""What a model's penultimate features say: a 2-D t-SNE map of a split coloured by class, and the k-NN accuracy of
the features (fit on train, scored on the split), both with scikit-learn.

The penultimate features are the input of the head (the last top-level layer with parameters that the forward
pass calls), caught by forward pre-hooks: (B, D), or (B, D, H, W) for a dense head (a segmenter's 1x1 conv),
averaged over the pixels to (B, D).
"""

from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from deeprecipe.config import Config
from deeprecipe.core import UserError
from deeprecipe.data.core import Data, eval_batches
from deeprecipe.engine.atomic import atomic_text
from deeprecipe.runtime import Runtime


@torch.no_grad()
def batch_features(family, model: nn.Module, batch: tuple, spec) -> tuple[torch.Tensor, torch.Tensor]:
    """(penultimate features (B, D) fp32 on the CPU, model output) of a raw batch, through the family's prepare.

    The features are the input of the last top-level layer with parameters that the forward pass calls: the head
    (a classifier's `head`, a segmenter's 1x1 scoring conv), whatever the order its layers were registered in."""
    calls: list[torch.Tensor] = []
    hooks = [
        m.register_forward_pre_hook(lambda m, args: calls.append(args[0]))
        for m in model.children()
        if any(True for _ in m.parameters())
    ]
    try:
        out = model(family.batch_input(family.prepare(batch, spec, None)))
    finally:
        for h in hooks:
            h.remove()
    if not calls or not isinstance(calls[-1], torch.Tensor):
        raise UserError("no top-level layer of the model was called with a tensor: no penultimate features to read")
    return pooled(calls[-1]), out


def pooled(f: torch.Tensor) -> torch.Tensor:
    """Head inputs (B, D) or (B, D, H, W) -> features (B, D) fp32 on the CPU (a dense head's averaged over pixels)."""
    f = f.float()
    return (f.flatten(2).mean(2) if f.ndim > 2 else f).cpu()


def features(
    family, model: nn.Module, data: Data, split: str, cfg: Config, rt: Runtime, limit: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Penultimate features (N, D) and labels (N,) of the first `limit` (0: all) examples of a split."""
    feats, labels = [], []
    model.eval()
    with rt.autocast():
        for batch in eval_batches(data.split(split), cfg.train.eval_batch_size, rt.device, limit):
            feats.append(batch_features(family, model, batch, data.spec)[0])
            labels.append(batch[-1].cpu())
    return torch.cat(feats), torch.cat(labels)


def knn_accuracy(train_f: torch.Tensor, train_y: torch.Tensor, test_f: torch.Tensor, test_y: torch.Tensor, k=5):
    """Accuracy of a k-nearest-neighbour classifier (scikit-learn, Euclidean on L2-normalized features) fit on
    the train features and scored on the test features."""
    from sklearn.neighbors import KNeighborsClassifier

    def unit(f):
        return torch.nn.functional.normalize(f.float(), dim=1).numpy()

    knn = KNeighborsClassifier(n_neighbors=min(k, len(train_f)))
    return float(knn.fit(unit(train_f), train_y.numpy()).score(unit(test_f), test_y.numpy()))


def embed(
    family,
    model: nn.Module,
    data: Data,
    cfg: Config,
    rt: Runtime,
    run_dir: Path,
    split: str,
    points: int = 2000,
    k: int = 5,
) -> dict:
    """plots/embedding.png (t-SNE of the split's penultimate features coloured by class), embedding.json and
    report-embedding.html in the run folder; returns {"knn_acc", "k", "train", "points", "split", "chance", ...}."""
    from sklearn.manifold import TSNE

    from deeprecipe.engine import plots

    y0 = data.split(split).take(torch.arange(1))[-1]
    if y0.ndim != 1 or y0.dtype.is_floating_point:
        raise UserError("embed needs a model with one class label per example (a classifier's run)")
    if data.train is None or len(data.train) < 2:
        raise UserError("embed fits its k-NN on the train split, and this data set has none")
    names = data.spec.class_names
    tr_f, tr_y = features(family, model, data, "train", cfg, rt, limit=10_000)
    f, y = features(family, model, data, split, cfg, rt, limit=points)
    acc = knn_accuracy(tr_f, tr_y, f, y, k)
    chance = float(torch.bincount(y).max()) / len(y)  # always answering the commonest class
    xy = TSNE(2, init="pca", perplexity=min(30.0, (len(f) - 1) / 3), random_state=0).fit_transform(f.numpy())
    fig, ax = plots.plt.subplots(figsize=(7, 6))
    cmap = plots.plt.get_cmap("tab10" if len(names) <= 10 else "tab20")
    for c in np.unique(y.numpy()):
        m = y.numpy() == c
        ax.scatter(xy[m, 0], xy[m, 1], s=6, color=cmap(int(c) % cmap.N), label=names[int(c)] if names else str(c))
    ax.set(xticks=[], yticks=[], title=f"t-SNE of {split} penultimate features ({k}-NN accuracy {acc:.3f})")
    ax.legend(markerscale=2, fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    run_dir = Path(run_dir)
    plots.save_figure(fig, run_dir / "plots" / "embedding.png")
    r = {"split": split, "knn_acc": acc, "k": k, "train": len(tr_f), "points": len(f), "dim": f.shape[1]}
    r["chance"] = chance
    atomic_text(run_dir / "embedding.json", json.dumps(r, indent=1))
    atomic_text(
        run_dir / "report-embedding.html",
        f"<h2>Embedding</h2><p>{k}-NN accuracy of the {html.escape(split)} penultimate features "
        f"({r['dim']} dimensions; fit on {len(tr_f)} train examples, {len(f)} scored): <b>{acc:.4f}</b> "
        f"(chance {chance:.4f}); the map is plots/embedding.png.</p>",
    )
    return r
