"""Object detection: a batch is (images uint8 (B, 3, H, W), boxes float (B, M, 4) xyxy pixels, labels (B, M)),
label -1 on padding (data/core.py pad_targets; data/detect.py makes such splits), -2 - c on a box of class c that
mAP ignores (VOC difficult, COCO iscrowd; data/detect.py ignored) and the loss skips.

`prepare` normalizes and, when training, flips, zooms and shifts (or crops) each image with one affine map
on the device and moves its boxes by the same map: a box is clipped to the new image, and one with less than
`min_visible` of its area left in view loses its label (-1). The detector (models/detect.py) owns its targets,
loss and decoding; this family owns augmentation, metrics (torchmetrics MeanAveragePrecision, COCO evaluation
by pycocotools: mAP@[.5:.95], mAP@0.5, per class and by object size, precision-recall curves), the report
plots and the checks (checks.py); predict, explain and the /detect and /explain endpoints are in infer.py.
"""

import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from deeprecipe.config import Config
from deeprecipe.core import ConfigError, DataSpec
from deeprecipe.data.core import Data, Draws, eval_batches, trim_targets
from deeprecipe.data.image_ops import denormalize, normalize
from deeprecipe.families.detect import checks as detect_checks
from deeprecipe.families.detect import infer
from deeprecipe.families.detect.infer import DRAW_THRESH, detect_images, explain_detection
from deeprecipe.families.detect.metrics import DetectionMetrics, draw_boxes, match_misses
from deeprecipe.family import ExplainOptions, Family, PredictOptions, ServeContext
from deeprecipe.runtime import Runtime


def augment(x: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor, draws: Draws, spec: DataSpec):
    """Random flip, zoom and shift of images (B, C, H, W) with their boxes (B, M, 4) and labels (B, M)."""
    ex = spec.extra
    flip, (lo, hi), crop = ex.get("flip", False), tuple(ex.get("scale", (1.0, 1.0))), ex.get("crop", 0)
    B, C, H, W = x.shape
    oh, ow = (crop, crop) if crop else (H, W)
    dev = x.device
    s = lo + (hi - lo) * draws.rand(B)
    sy, sx = oh / s / H, ow / s / W  # half-extent of the sampled window, normalized input coordinates
    ty = (draws.rand(B) * 2 - 1) * (1 - sy).abs()
    tx = (draws.rand(B) * 2 - 1) * (1 - sx).abs()
    sign = torch.where(draws.rand(B) < 0.5, -1.0, 1.0) if flip else torch.ones(B, device=dev)
    zero = torch.zeros(B, device=dev)
    theta = torch.stack([torch.stack([sx * sign, zero, tx], 1), torch.stack([zero, sy, ty], 1)], 1)
    grid = F.affine_grid(theta, [B, C, oh, ow], align_corners=False)
    x = F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return x, *move_boxes(boxes, labels, (H, W), (oh, ow), sx * sign, sy, tx, ty, ex.get("min_visible", 0.4))


def move_boxes(boxes, labels, size, out_size, ax, ay, tx, ty, min_visible: float = 0.4):
    """Boxes under the map output -> input `u_in = a * u_out + t` (normalized coordinates, per example):
    corners moved, reordered (a < 0 mirrors), clipped to the output image; a box keeps its label when at least
    `min_visible` of its area (and one pixel per side) stays in view."""
    (H, W), (oh, ow) = size, out_size
    v = lambda z: z.view(-1, 1)  # noqa: E731
    xs = ((boxes[..., 0::2] * 2 / W - 1) - v(tx)[..., None]) / v(ax)[..., None]  # (B, M, 2) normalized output
    ys = ((boxes[..., 1::2] * 2 / H - 1) - v(ty)[..., None]) / v(ay)[..., None]
    xs, ys = (xs + 1) * ow / 2, (ys + 1) * oh / 2
    x1, x2 = xs.amin(-1), xs.amax(-1)
    y1, y2 = ys.amin(-1), ys.amax(-1)
    area = (x2 - x1) * (y2 - y1)
    cx1, cx2, cy1, cy2 = x1.clamp(0, ow), x2.clamp(0, ow), y1.clamp(0, oh), y2.clamp(0, oh)
    kept = (cx2 - cx1) * (cy2 - cy1)
    ok = (labels >= 0) & (kept >= min_visible * area) & (cx2 - cx1 >= 1) & (cy2 - cy1 >= 1)
    out = torch.stack([cx1, cy1, cx2, cy2], -1) * ok[..., None]
    return out, torch.where(ok, labels, -1)


def prepare(batch, spec: DataSpec, draws: Draws | None = None):
    x, boxes, labels = batch
    boxes, labels = trim_targets(boxes.float(), labels.long())
    if draws is not None:
        ex = spec.extra
        if ex.get("flip") or tuple(ex.get("scale", (1.0, 1.0))) != (1.0, 1.0) or ex.get("crop"):
            x, boxes, labels = augment(x, boxes, labels, draws, spec)
    return normalize(x, spec), boxes, labels


def run_split(
    model: nn.Module, data: Data, split: str, cfg: Config, rt: Runtime, keep: int = 0, extended: bool = False
):
    """mAP and the rest over a split; and the `keep` images with the most missed boxes (image, truth, detections)."""
    spec = data.spec
    metrics = DetectionMetrics(spec.num_classes, extended=extended)
    worst: list[tuple[int, torch.Tensor, tuple, tuple]] = []
    for batch in eval_batches(data.split(split), cfg.train.eval_batch_size, rt.device, cfg.train.limit_eval):
        x, boxes, labels = prepare(batch, spec)
        with rt.autocast():
            dets = model.detect(x)
        metrics.update(dets, boxes, labels)
        if keep:
            for i, (d, b, y) in enumerate(zip(dets, boxes, labels)):
                misses = match_misses(d, b[y >= 0], y[y >= 0], DRAW_THRESH)
                worst.append((misses, batch[0][i].cpu(), (b[y >= 0].cpu(), y[y >= 0].cpu()), tuple(t.cpu() for t in d)))
            worst = sorted(worst, key=lambda w: -w[0])[:keep]
    return metrics.compute(), worst


def _caption_boxes(img: torch.Tensor, truth, dets, spec: DataSpec) -> torch.Tensor:
    names = spec.class_names
    b, y = truth
    out = draw_boxes(img, b, [names[int(c)] for c in y], (0, 200, 0))
    db, ds, dl = dets
    keep = ds >= DRAW_THRESH
    return draw_boxes(
        out, db[keep], [f"{names[int(c)]} {float(s):.2f}" for c, s in zip(dl[keep], ds[keep])], (230, 0, 0)
    )


class Detect(Family):
    """Object detection (see the module docstring)."""

    prepare = staticmethod(prepare)

    METRIC = ("map", "max")

    IGNORE_INDEX = -1  # the padding of the label tensor (images have different numbers of boxes)
    CHECKS_SKIP = {
        "init_prior": "the heat maps are one sigmoid per class and cell, started at the prior (init_loss checks it)"
    }
    EXTRA_CHECKS = {"overfit": detect_checks.overfit, "boxes": detect_checks.boxes, "labels": detect_checks.labels}
    CHECK_DEFAULTS = {"overfit_examples": 4, "overfit_steps": 150}

    def check_config(self, cfg: Config) -> None:
        if cfg.model.name not in ("centernet", "tv-detector") and ":" not in cfg.model.name:
            raise ConfigError(f"model.name={cfg.model.name}: task detect needs a detector (centernet or tv-detector)")

    def loss(self, model: nn.Module, batch, cfg: Config, part: str):
        x, boxes, labels = batch
        return model.loss(x, boxes, labels)

    def per_example_loss(self, model: nn.Module, batch, cfg: Config) -> torch.Tensor:
        x, boxes, labels = batch
        return model.loss(x, boxes, labels, per_image=True)[0]

    def expected_init_loss(self, spec: DataSpec, cfg: Config) -> tuple[float, str] | None:
        if cfg.model.name != "centernet":
            return None
        return detect_checks.centernet_init_loss(spec, cfg.model)

    def show_batch(self, batch, spec: DataSpec) -> tuple[torch.Tensor, list[str]]:
        """The images de-normalized with their boxes drawn and named, as the net sees them."""
        x, boxes, labels = batch[0][:16], batch[1][:16], batch[2][:16]
        imgs = (denormalize(x, spec).clamp(0, 1) * 255).round().to(torch.uint8).cpu()
        tiles, caps = [], []
        for img, b, y in zip(imgs, boxes.cpu(), labels.cpu()):
            names = [spec.class_names[int(c)] for c in y[y >= 0]]
            tiles.append(draw_boxes(img, b[y >= 0], names, (255, 255, 0)).float() / 255)
            caps.append(f"{len(names)} boxes")
        return torch.stack(tiles), caps

    def evaluate(self, model: nn.Module, data: Data, split: str, cfg: Config, rt: Runtime, final: bool) -> dict:
        m, _ = run_split(model, data, split, cfg, rt)
        return {k: v for k, v in m.items() if not isinstance(v, (list, dict))}

    def finish(self, model: nn.Module, data: Data, cfg: Config, rt: Runtime, run_dir: Path, results: dict) -> dict:
        """Test metrics; detections against truth on held-out images, the worst misses, per-class AP and PR curves."""
        from deeprecipe.engine import plots
        from deeprecipe.families.detect.metrics import pr_plot

        split = data.final_split()
        model.eval()
        with torch.no_grad():
            m, worst = run_split(model, data, split, cfg, rt, keep=8, extended=True)
            firsts = next(iter(eval_batches(data.split(split), 8, rt.device)))
            x, b, y = prepare(firsts, data.spec)
            dets = model.detect(x)
        spec = data.spec
        plots_dir = Path(run_dir) / "plots"
        plots_dir.mkdir(parents=True, exist_ok=True)
        tiles = [
            _caption_boxes(img.cpu(), (bb[yy >= 0].cpu(), yy[yy >= 0].cpu()), tuple(t.cpu() for t in d), spec).float()
            / 255
            for img, bb, yy, d in zip(firsts[0], b, y, dets)
        ]
        plots.image_grid(
            torch.stack(tiles),
            ["green: truth, red: detected"] * len(tiles),
            plots_dir / "detections.png",
            f"{split}: truth and detections (mAP@.5 {m['map_50']:.3f}, mAP@[.5:.95] {m['map']:.3f})",
            cols=4,
        )
        if worst:
            tiles = [_caption_boxes(img, truth, dets, spec).float() / 255 for _, img, truth, dets in worst]
            plots.image_grid(
                torch.stack(tiles),
                [f"{n} missed" for n, *_ in worst],
                plots_dir / "worst_misses.png",
                f"{split}: the images with the most missed boxes (score >= {DRAW_THRESH}, IoU >= 0.5)",
                cols=4,
            )
        if m.get("pr_curves"):
            pr_plot(m["pr_curves"], spec.class_names, plots_dir / "pr_curves.png")
        lines = [f"{split}: mAP@[.5:.95] {m['map']:.4f}, mAP@.5 {m['map_50']:.4f}, mAP@.75 {m['map_75']:.4f}"]
        lines += [f"by size: small {m['map_small']:.4f}, medium {m['map_medium']:.4f}, large {m['map_large']:.4f}"]
        absent = [n for n, v in zip(spec.class_names, m["ap_per_class"]) if v is None]
        lines += [
            f"{n:<16} AP {v:.4f}" if v is not None else f"{n:<16} AP n/a (no boxes of class {n} in {split})"
            for n, v in zip(spec.class_names, m["ap_per_class"])
        ]
        if absent:
            warnings.warn(
                f"no boxes of class {', '.join(absent)} in {split}: AP n/a (mAP averages the other classes)",
                stacklevel=2,
            )
        (plots_dir / "ap.txt").write_text("\n".join(lines) + "\n")
        out = {f"{split}_{k}": v for k, v in m.items() if k != "pr_curves"}
        out[f"{split}_ap_per_class"] = dict(zip(spec.class_names, m["ap_per_class"]))
        return out

    def predict(
        self, model: nn.Module, spec: DataSpec, cfg: Config, rt: Runtime, files: list[str], opts: PredictOptions
    ) -> list[dict]:
        return infer.predict(model, spec, cfg, rt, files, opts)

    def explain(
        self, model: nn.Module, spec: DataSpec, cfg: Config, rt: Runtime, files: list[str], opts: ExplainOptions
    ) -> list[dict]:
        return infer.explain(model, spec, cfg, rt, files, opts)

    def export_example(self, model: nn.Module, spec: DataSpec, batch: int) -> dict:
        """The net's raw maps (centernet: heat-map logits and box distances per cell); decoding and NMS stay in
        Python (models/detect.py decode). A torchvision detector exports its backbone's features."""
        g = torch.Generator().manual_seed(batch)
        x = torch.randn(batch, spec.in_channels, *spec.image_size, generator=g)
        return {"inputs": {"image": x}, "outputs": ["maps"]}

    def serve(self, ctx: ServeContext) -> None:
        infer.serve(ctx)


__all__ = ["Detect", "prepare", "augment", "move_boxes", "detect_images", "explain_detection"]
