"""Drift monitoring of an image model: reference statistics saved with the run, and two-sample tests of new images
against them.

At the end of training (engine/loop.py) `save_reference` keeps, from the held-out split (val, else test, else
train), up to REF_EXAMPLES examples' statistics in drift_reference.safetensors:

- features (N, D): the penultimate features (engine/embed.py: the head's input, pooled over pixels);
- channel_mean (N, C): each image's per-channel mean in [0, 1];
- inputs (S, C, 16, 16): a small sample of the images downsampled (for looking at, and for later tests);
- classes (K,): how often each class was predicted (a segmenter: the class of most pixels of each image).

`score` compares a window of new images with them by three tests, each a p-value under "same distribution":
- features: the maximum mean discrepancy (MMD^2, biased estimate) with a Gaussian kernel whose bandwidth is the
  median pairwise distance (the median heuristic), its p-value by permutation (Gretton et al. 2012);
- inputs: scipy's two-sample Kolmogorov-Smirnov test on each channel's image means (Bonferroni over channels);
- predictions: scipy's chi-square test of independence of the (sample, predicted class) counts table, two
  samples, so the reference's own sampling noise counts too.
A window drifts when its smallest p-value is below alpha / 3 (Bonferroni over the three tests); its score is the
features' MMD^2 (0 for identical distributions).
"""

from __future__ import annotations

import html
import json
import math
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from deeprecipe.config import Config
from deeprecipe.core import UserError
from deeprecipe.data.core import Data, eval_batches
from deeprecipe.engine.atomic import atomic_text, atomic_write
from deeprecipe.engine.embed import batch_features
from deeprecipe.runtime import Runtime

REF_EXAMPLES = 512  # enough for the tests' power on a window of tens of images, and seconds to compute
REF_SAMPLE = 64  # downsampled images kept
FILE = "drift_reference.safetensors"


def image_batch_stats(family, model: nn.Module, x: torch.Tensor, rest: tuple, spec) -> dict[str, torch.Tensor]:
    """uint8 images (B, C, H, W) (and the rest of their batch) -> features (B, D), channel_mean (B, C),
    predicted (B,) class (-1 where the output is not one score per class), all on the CPU."""
    f, out = batch_features(family, model, (x, *rest), spec)
    return {"features": f, "channel_mean": channel_means(x), "predicted": predicted(out, len(x), spec.num_classes)}


def channel_means(x: torch.Tensor) -> torch.Tensor:
    """uint8 images (B, C, H, W) -> each image's per-channel mean in [0, 1], (B, C) on the CPU."""
    return x.float().mean((-2, -1)).cpu() / 255


def predicted(out, n: int, num_classes: int) -> torch.Tensor:
    """Model output -> (n,) predicted class per example: the argmax of (B, K) scores, the class of most pixels of
    (B, K, H, W) scores; -1 where the output is not one score per class."""
    if not (isinstance(out, torch.Tensor) and out.ndim >= 2 and out.shape[1] == num_classes):
        return torch.full((n,), -1, dtype=torch.long)
    p = out.float().argmax(1).cpu()
    return p if p.ndim == 1 else torch.stack([torch.bincount(v.flatten(), minlength=num_classes).argmax() for v in p])


def reference(family, model: nn.Module, data: Data, cfg: Config, rt: Runtime) -> dict[str, torch.Tensor] | None:
    """The reference statistics (see the module docstring) of the held-out split, or None when the data are not
    uint8 images (B, C, H, W) with classes."""
    split = next((s for s in ("val", "test", "train") if getattr(data, s) is not None and len(getattr(data, s))), "")
    if not split or not data.spec.num_classes:
        return None
    first = data.split(split).take(torch.arange(1))
    if len(first) != 2 or first[0].dtype != torch.uint8 or first[0].ndim != 4:  # (images, labels or masks) only
        return None
    parts, sample = [], []
    model.eval()
    with torch.no_grad(), rt.autocast():
        for x, *rest in eval_batches(data.split(split), cfg.train.eval_batch_size, rt.device, REF_EXAMPLES):
            parts.append(image_batch_stats(family, model, x, tuple(rest), data.spec))
            sample.append(F.adaptive_avg_pool2d(x.float() / 255, 16).cpu())
    ref = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    pred = ref.pop("predicted")
    ref["classes"] = torch.bincount(pred[pred >= 0], minlength=data.spec.num_classes).float()
    ref["inputs"] = torch.cat(sample)[:REF_SAMPLE]
    return ref


def save_reference(family, model: nn.Module, data: Data, cfg: Config, rt: Runtime, run_dir: Path) -> Path | None:
    """drift_reference.safetensors in the run folder (written atomically), for `deeprecipe monitor`; None (and no
    file) for a run whose data are not class-labelled images."""
    from safetensors.torch import save_file

    try:
        ref = reference(family, model, data, cfg, rt)
    except UserError as e:  # a user's model whose head cannot be found: the run itself is fine
        warnings.warn(f"no drift reference for `deeprecipe monitor`: {e}", stacklevel=2)
        return None
    if ref is None:
        return None
    path = Path(run_dir) / FILE
    atomic_write(path, lambda p: save_file({k: v.contiguous() for k, v in ref.items()}, str(p)))
    return path


def load_reference(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    path = Path(run_dir) / FILE
    if not path.is_file():
        raise UserError(
            f"{run_dir}: no {FILE}; runs of image classifiers and segmenters save it at the end of training "
            "(train the run again with this version)"
        )
    return load_file(str(path))


def mmd_test(a: torch.Tensor, b: torch.Tensor, permutations: int = 500, seed: int = 0) -> tuple[float, float]:
    """(MMD^2, permutation p-value) of samples a (N, D) and b (M, D): Gaussian kernel with the median pairwise
    distance as bandwidth. MMD^2 = w^T K w with w = 1/N on a's rows and -1/M on b's, so all permutations are one
    matrix product."""
    z = torch.cat([a, b]).double()
    n, N = len(a), len(a) + len(b)
    d2 = torch.cdist(z, z).pow(2)
    off = d2[torch.triu_indices(N, N, 1).unbind()]
    bw2 = off.median().clamp_min(1e-12)
    K = torch.exp(-d2 / (2 * bw2))
    g = torch.Generator().manual_seed(seed)
    order = torch.stack([torch.arange(N)] + [torch.randperm(N, generator=g) for _ in range(permutations)])
    w = torch.where(order < n, 1.0 / n, -1.0 / (N - n)).double()  # (P + 1, N): row 0 the observed split
    stats = ((w @ K) * w).sum(1)
    return float(stats[0]), float((1 + (stats[1:] >= stats[0] - 1e-12).sum()) / (1 + permutations))


def score(ref: dict[str, torch.Tensor], new: dict[str, torch.Tensor], alpha: float = 0.01, seed: int = 0) -> dict:
    """The tests of a window of new examples' statistics (image_batch_stats) against the reference: {"mmd2",
    "p_features", "p_inputs", "p_classes" (None without class counts), "drift" (bool), "n"}."""
    from scipy import stats

    # enough permutations that the smallest p-value they can give, 1 / (1 + n), is well below the alarm level
    perms = max(500, math.ceil(9 / alpha))
    mmd2, p_f = mmd_test(ref["features"].float(), new["features"].float(), perms, seed)
    C = ref["channel_mean"].shape[1]
    ks = [stats.ks_2samp(ref["channel_mean"][:, c].numpy(), new["channel_mean"][:, c].numpy()).pvalue for c in range(C)]
    p_in = min(1.0, C * float(min(ks)))
    p_cls = None
    pred = new["predicted"]
    if ref["classes"].sum() > 0 and (pred >= 0).all():
        table = np.stack([ref["classes"].double().numpy(), np.bincount(pred.numpy(), minlength=len(ref["classes"]))])
        table = table[:, table.sum(0) > 0]  # classes neither sample predicted say nothing
        p_cls = float(stats.chi2_contingency(table).pvalue) if table.shape[1] > 1 else 1.0
    ps = [p for p in (p_f, p_in, p_cls) if p is not None]
    return {
        "n": len(pred),
        "mmd2": mmd2,
        "p_features": p_f,
        "p_inputs": p_in,
        "p_classes": p_cls,
        "drift": min(ps) < alpha / len(ps),
    }


def windows(n: int, size: int) -> list[range]:
    """Consecutive windows of `size` over n items; a last window shorter than half of `size` joins the one before."""
    cuts = list(range(0, n, size))
    if len(cuts) > 1 and n - cuts[-1] < size / 2:
        cuts.pop()
    return [range(a, b) for a, b in zip(cuts, cuts[1:] + [n])]


def monitor(
    family,
    model: nn.Module,
    spec,
    cfg: Config,
    rt: Runtime,
    run_dir: Path,
    images: Sequence[torch.Tensor],
    window: int = 64,
    alpha: float = 0.01,
) -> list[dict]:
    """uint8 images (C, H, W) at the model's size, in arrival order (any sequence: a window's images are taken
    when it is scored) -> one `score` per window (see `windows`), with "first" and "last" (0-based numbers)."""
    if not len(images):
        raise UserError("monitor: no images to score")
    ref = load_reference(run_dir)
    out = []
    model.eval()
    for w in windows(len(images), window):
        x = torch.stack([images[i] for i in w]).to(rt.device)
        with torch.no_grad(), rt.autocast():
            new = image_batch_stats(family, model, x, (torch.zeros(len(x), dtype=torch.long, device=x.device),), spec)
        out.append({"first": w.start, "last": w.stop - 1} | score(ref, new, alpha, seed=w.start))
    return out


def save_monitor(results: list[dict], run_dir: Path, source: str, alpha: float) -> None:
    """drift.json (the windows of `monitor` for `source`), plots/drift.png (MMD^2 and the p-values per window)
    and report-drift.html (the report's Drift section) in the run folder."""
    from matplotlib.ticker import MaxNLocator

    from deeprecipe.engine import plots

    run_dir = Path(run_dir)
    atomic_text(run_dir / "drift.json", json.dumps({"source": source, "alpha": alpha, "windows": results}, indent=1))
    fig, (a, b) = plots.plt.subplots(1, 2, figsize=(11, 3.8))
    n = range(len(results))
    a.plot(n, [r["mmd2"] for r in results], marker="o")
    a.set(xlabel="window", ylabel="MMD^2 of the features", title=f"drift of {Path(source).name}")
    for key, label in (("p_features", "features (MMD)"), ("p_inputs", "inputs (KS)"), ("p_classes", "classes")):
        if all(r[key] is not None for r in results):
            b.semilogy(n, [max(r[key], 1e-6) for r in results], marker="o", label=label)
    b.axhline(alpha / 3, color="red", linestyle="--", label=f"alarm below {alpha}/3")
    b.set(xlabel="window", ylabel="p-value", title="two-sample tests against the reference")
    b.legend(fontsize=7)
    for ax in (a, b):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    plots.save_figure(fig, run_dir / "plots" / "drift.png")
    bad = sum(r["drift"] for r in results)
    cells = ("n", "mmd2", "p_features", "p_inputs", "p_classes")
    rows = "".join(
        f"<tr><td>{i}</td>"
        + "".join("<td>-</td>" if r[k] is None else f"<td>{r[k]:.4g}</td>" for k in cells)
        + f"<td>{'DRIFT' if r['drift'] else ''}</td></tr>"
        for i, r in enumerate(results)
    )
    atomic_text(
        run_dir / "report-drift.html",
        f"<h2>Drift</h2><p>{html.escape(source)}: {bad} of {len(results)} windows drift (a p-value below "
        f"{alpha}/3); plots/drift.png</p><table><tr><th>window</th><th>images</th><th>MMD^2</th><th>p features</th>"
        f"<th>p inputs</th><th>p classes</th><th></th></tr>{rows}</table>",
    )
