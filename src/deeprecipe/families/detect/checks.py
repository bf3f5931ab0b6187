"""The detection family's own checks and the closed-form loss of an untrained centernet.

- overfit (replaces the built-in): a few images memorized through the loop's step must be detected perfectly,
  mAP@0.5 = 1.0 on those very images (a loss near zero is not the point: a detector's is never 0).
- boxes: the boxes are (x1, y1, x2, y2) in pixels and line up with the image: none inverted or outside it, and
  the edges of the image lie on the boxes' sides more than on the same numbers read as (x, y, w, h) or with x
  and y swapped (the two classic mix-ups of a box reader).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from deeprecipe.checks.core import Ctx, Verdict, batch_stats_eval, fit, labels_of
from deeprecipe.core import DataSpec
from deeprecipe.models.detect import giou


def centernet_init_loss(spec: DataSpec, mcfg) -> tuple[float, str]:
    """The loss of the untrained centernet (models/detect.py): every cell predicts the class prior pi_c
    (objects of class c per image / cells) and a 2 x stride square. Heat: per true centre (1 - pi)^2 ln(1/pi),
    plus pi^2 ln(1/(1 - pi)) per other cell and class; box: the Gaussian-weighted 1 - GIoU of that square
    against boxes of the training sizes (spec.extra["box_wh_sample"]) centred anywhere in a cell."""
    H, W = spec.image_size
    s = mcfg.stride
    cells = (H // s) * (W // s)
    n = torch.tensor(spec.extra.get("objects_per_image") or [1.0] * spec.num_classes, dtype=torch.float64)
    pi = (n / cells).clamp(1e-4, 0.5)
    pos = float((n * (1 - pi) ** 2 * -pi.log()).sum() / n.sum().clamp_min(1e-9))
    neg = float((cells * pi**2 * -(1 - pi).log()).sum() / n.sum().clamp_min(1e-9))
    wh = torch.tensor(spec.extra.get("box_wh_sample") or [[2.0 * s, 2.0 * s]], dtype=torch.float64)
    # each sampled box centred at 4 x 4 positions within a cell; the cells whose centre lies inside it regress it
    off = (torch.arange(4, dtype=torch.float64) + 0.5) / 4
    total, weight = 0.0, 0.0
    g = torch.arange(-40, 41, dtype=torch.float64)
    for w, h in wh.tolist():
        for ox in off.tolist():
            for oy in off.tolist():
                cx, cy = (20 + ox) * s, (20 + oy) * s  # a centre inside cell (20, 20)
                pcx, pcy = (g.view(1, -1) + 20.5) * s, (g.view(-1, 1) + 20.5) * s  # cell centres
                inside = (pcx > cx - w / 2) & (pcx < cx + w / 2) & (pcy > cy - h / 2) & (pcy < cy + h / 2)
                sx, sy = max(w / s * 0.54 / 6, 0.3), max(h / s * 0.54 / 6, 0.3)
                ci, cj = math.floor(cy / s), math.floor(cx / s)
                gauss = torch.exp(-((pcx / s - 0.5 - cj) ** 2) / (2 * sx**2) - (pcy / s - 0.5 - ci) ** 2 / (2 * sy**2))
                wt = gauss * inside * math.log1p(max(w * h, 1.0))
                sq = torch.stack(torch.broadcast_tensors(pcx - s, pcy - s, pcx + s, pcy + s), -1)
                box = torch.tensor([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dtype=torch.float64)
                total += float(((1 - giou(sq, box.expand_as(sq))) * wt).sum())
                weight += float(wt.sum())
    box = total / max(weight, 1e-9)
    value = pos + neg + mcfg.box_weight * box
    return value, f"heat {pos + neg:.2f} at the class priors + box {mcfg.box_weight:g} x {box:.2f} (1 - GIoU)"


def overfit(ctx: Ctx) -> Verdict:
    """A few images, no augmentation or decay: after the short run the detector finds every box of them."""
    from deeprecipe.families.detect.metrics import DetectionMetrics

    b = ctx.train_batch(0, size=ctx.overfit_examples, augment=False)
    model = ctx.model()
    losses = fit(ctx, model, ctx.overfit_steps, lambda s: b, weight_decay=0.0).losses
    m = DetectionMetrics(ctx.spec.num_classes)
    with torch.no_grad(), batch_stats_eval(model):
        m.update(model.detect(b[0]), b[1], b[2])
    r = m.compute()
    measured = f"mAP@.5 {r['map_50']:.3f}, mAP@[.5:.95] {r['map']:.3f} after {len(losses)} steps on {len(b[0])} images"
    if r["map_50"] >= 0.999:
        return Verdict("overfit", "pass", measured, "mAP@.5 = 1.0", "", r["map_50"])
    status = "warn" if r["map_50"] >= 0.9 else "fail"
    advice = (
        "nearly memorized: more steps or a higher lr would finish it"
        if status == "warn"
        else "the detector cannot memorize a few images: look at the box targets (format, stride), the decoding "
        "and the score threshold"
    )
    return Verdict("overfit", status, measured, "mAP@.5 = 1.0", advice, r["map_50"])


def labels(ctx: Ctx) -> Verdict:
    """Box classes in 0..C-1 in every split: -1 is padding, -2 - c a box of class c that mAP ignores."""
    C, problems = ctx.spec.num_classes, []
    for name in ("train", "val", "test"):
        y = labels_of(getattr(ctx.data, name))
        if y is None:
            continue
        y = torch.where(y <= -2, -2 - y, y)
        bad = (y != -1) & ((y < 0) | (y >= C))
        if bad.any():
            problems.append(f"{name}: {int(bad.sum())} (e.g. {int(y[bad][0])})")
    if problems:
        return Verdict(
            "labels", "fail", "; ".join(problems), f"0..{C - 1}", "box classes out of range: fix the class list", 1
        )
    return Verdict("labels", "pass", "all in range", f"0..{C - 1}", "", 0)


def edge_score(images: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor, points: int = 8) -> float:
    """Mean image-edge strength on the sides of the boxes, relative to the image's mean edge strength."""
    x = images.float().mean(1, keepdim=True)
    gx = (x[..., :, 1:] - x[..., :, :-1]).abs()
    gy = (x[..., 1:, :] - x[..., :-1, :]).abs()
    g = F.pad(gx, (0, 1)) + F.pad(gy, (0, 0, 0, 1))
    g = F.max_pool2d(g, 3, 1, 1)
    g = g / g.mean((2, 3), keepdim=True).clamp_min(1e-6)
    N, _, H, W = g.shape
    b = torch.stack(
        [
            boxes[..., [0, 2]].amin(-1),
            boxes[..., [1, 3]].amin(-1),
            boxes[..., [0, 2]].amax(-1),
            boxes[..., [1, 3]].amax(-1),
        ],
        -1,
    )
    t = (torch.arange(points, device=b.device) + 0.5) / points  # (P,)
    x1, y1, x2, y2 = (b[..., i, None] for i in range(4))  # (N, M, 1)
    xs = torch.cat([x1 + (x2 - x1) * t, x1 + (x2 - x1) * t, x1.expand(-1, -1, points), x2.expand(-1, -1, points)], -1)
    ys = torch.cat([y1.expand(-1, -1, points), y2.expand(-1, -1, points), y1 + (y2 - y1) * t, y1 + (y2 - y1) * t], -1)
    # pixel edges -> the pixel just inside the box, in normalized coordinates
    xs = ((xs.clamp(0.5, W - 0.5)) / W) * 2 - 1
    ys = ((ys.clamp(0.5, H - 0.5)) / H) * 2 - 1
    grid = torch.stack([xs, ys], -1).flatten(1, 2)[:, None]  # (N, 1, M * 4P, 2)
    v = F.grid_sample(g, grid.float(), align_corners=False)[:, 0, 0].view(N, -1, 4 * points).mean(-1)  # (N, M)
    valid = labels >= 0
    return float(v[valid].mean()) if valid.any() else float("nan")


def boxes(ctx: Ctx) -> Verdict:
    """Box format: valid xyxy inside the image, and better aligned with the image's edges than the same numbers
    read as xywh or with x and y swapped."""
    split = ctx.data.train
    n = min(len(split), 256)
    x, b, y = (t.cpu() for t in split.take(torch.arange(n))[:3])
    H, W = x.shape[-2:]
    valid = y >= 0
    if not valid.any():
        return Verdict("boxes", "fail", "no boxes in the first images", "boxes", "the data set holds no boxes")
    bv = b[valid]
    inverted = int(((bv[:, 2] <= bv[:, 0]) | (bv[:, 3] <= bv[:, 1])).sum())
    outside = int(((bv[:, :2] < -0.5).any(1) | (bv[:, 2] > W + 0.5) | (bv[:, 3] > H + 0.5)).sum())
    given = edge_score(x, b, y)
    alts = {
        "read as (x, y, w, h)": torch.cat([b[..., :2], b[..., :2] + b[..., 2:]], -1),
        "x and y swapped": b[..., [1, 0, 3, 2]],
    }
    scores = {k: edge_score(x, v, y) for k, v in alts.items()}
    best = max(scores, key=lambda k: scores[k])
    measured = (
        f"{inverted} inverted, {outside} outside of {len(bv)}; edge strength on the sides {given:.2f} "
        f"(as {best}: {scores[best]:.2f})"
    )
    expected = "0 inverted, 0 outside, xyxy aligns best"
    if inverted or outside:
        return Verdict(
            "boxes",
            "fail",
            measured,
            expected,
            "boxes with x2 <= x1 or y2 <= y1, or outside the image: a reader giving (x, y, w, h) or (y, x) order, "
            "or coordinates of another image size",
            inverted + outside,
        )
    if not given > max(scores.values()):
        return Verdict(
            "boxes",
            "fail",
            measured,
            expected,
            f"the image's edges fit the boxes better {best}: fix the box order in the reader",
            given,
        )
    return Verdict("boxes", "pass", measured, expected, "", given)
