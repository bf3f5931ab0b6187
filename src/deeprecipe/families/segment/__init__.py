"""Semantic segmentation: a batch is (images uint8 (B, 3, H, W), masks uint8 (B, H, W)), 255 = ignore.

`prepare` normalizes and, when training, flips, zooms and crops image and mask together with one affine
grid per example on the device: the image is sampled bilinearly, the mask with nearest (label ids are
copied, never blended), and pixels that fall outside the source image become 255 in the mask.
Metrics: pixel accuracy, per-class IoU and their mean (mIoU) through torchmetrics, over the whole split.
"""

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from deeprecipe.config import Config
from deeprecipe.core import DataSpec, UserError
from deeprecipe.data import image_ops
from deeprecipe.data.core import Data, Draws, eval_batches
from deeprecipe.data.image_ops import denormalize, normalize
from deeprecipe.family import ExplainOptions, Family, PredictOptions, ServeContext, label_score
from deeprecipe.runtime import Runtime

IGNORE = 255


def joint_augment(
    x: torch.Tensor,
    y: torch.Tensor,
    draws: Draws,
    flip: bool = True,
    scale: tuple[float, float] = (1.0, 1.0),
    crop: int = 0,
    image_mode: str = "bilinear",
):
    """Random flip, zoom and shift of images (B, C, H, W) and masks (B, H, W), the same for both.

    Zoom s > 1 magnifies; the output is crop x crop (or H x W) taken at a random position, so a zoom
    below 1 leaves a border that the mask marks 255."""
    B, C, H, W = x.shape
    oh, ow = (crop, crop) if crop else (H, W)
    dev = x.device
    lo, hi = scale
    s = lo + (hi - lo) * draws.rand(B)
    sy, sx = oh / s / H, ow / s / W  # half-extent of the sampled window in normalized input coordinates
    ty = (draws.rand(B) * 2 - 1) * (1 - sy).abs()
    tx = (draws.rand(B) * 2 - 1) * (1 - sx).abs()
    sign = torch.ones(B, device=dev)
    if flip:
        sign = torch.where(draws.rand(B) < 0.5, -1.0, 1.0)
    zero = torch.zeros(B, device=dev)
    theta = torch.stack([torch.stack([sx * sign, zero, tx], 1), torch.stack([zero, sy, ty], 1)], 1)  # (B, 2, 3)
    grid = F.affine_grid(theta, [B, C, oh, ow], align_corners=False)
    x = F.grid_sample(x.float(), grid, mode=image_mode, padding_mode="zeros", align_corners=False)
    # shift ids by one so that the zero padding (outside the image) can be told apart, then mark it 255
    m = F.grid_sample(y[:, None].float() + 1, grid, mode="nearest", padding_mode="zeros", align_corners=False)
    m = m[:, 0].long() - 1
    return x, torch.where(m < 0, IGNORE, m)


def prepare(batch, spec: DataSpec, draws: Draws | None = None):
    x, y = batch
    x, y = normalize(x, spec), y.long()
    ex = spec.extra
    scale = tuple(ex.get("scale", (1.0, 1.0)))
    if draws is not None and (ex.get("flip") or scale != (1.0, 1.0) or ex.get("crop")):
        x, y = joint_augment(x, y, draws, ex.get("flip", False), scale, ex.get("crop", 0))
    return x, y  # the memory format follows the model (train.channels_last)


def dice_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """1 - mean soft Dice over classes; ignored pixels count for nothing."""
    K = logits.shape[1]
    valid = (y != IGNORE)[:, None].float()  # (B, 1, H, W)
    p = logits.float().softmax(1) * valid
    t = F.one_hot(y.clamp(max=K - 1), K).permute(0, 3, 1, 2).float() * valid
    inter, total = (p * t).sum((0, 2, 3)), (p + t).sum((0, 2, 3))
    return 1 - ((2 * inter + 1) / (total + 1)).mean()


class SegMetrics:
    """Pixel accuracy, per-class IoU and mIoU accumulated over batches (torchmetrics does the counting)."""

    def __init__(self, num_classes: int, device: torch.device):
        from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

        kw = {"num_classes": num_classes, "ignore_index": IGNORE}
        self.acc = MulticlassAccuracy(average="micro", **kw).to(device)
        self.iou = MulticlassJaccardIndex(average=None, **kw).to(device)
        self.miou = MulticlassJaccardIndex(average="macro", **kw).to(device)  # classes never seen do not count
        self.present = torch.zeros(num_classes, dtype=torch.bool, device=device)

    def update(self, pred: torch.Tensor, y: torch.Tensor) -> None:
        for m in (self.acc, self.iou, self.miou):
            m.update(pred, y)
        k = len(self.present)
        self.present |= torch.bincount(pred.flatten(), minlength=k)[:k] > 0
        self.present |= torch.bincount(y[y != IGNORE], minlength=k)[:k] > 0

    def compute(self) -> dict:
        iou = self.iou.compute().tolist()
        return {
            "pixel_acc": self.acc.compute().item(),
            "miou": self.miou.compute().item(),
            "iou": [v if p else None for v, p in zip(iou, self.present.tolist())],
        }


def run_split(model: nn.Module, data: Data, split: str, cfg: Config, rt: Runtime, keep: int = 0):
    """Metrics over a split, and the first `keep` (image, mask, prediction) triples for overlays."""
    spec = data.spec
    m = SegMetrics(spec.num_classes, rt.device)
    total, pixels, kept = 0.0, 0, []
    for batch in eval_batches(data.split(split), cfg.train.eval_batch_size, rt.device, cfg.train.limit_eval):
        x, y = prepare(batch, spec)
        logits = model(x).float()
        total += F.cross_entropy(logits, y, ignore_index=IGNORE, reduction="sum").item()
        pixels += int((y != IGNORE).sum())
        pred = logits.argmax(1)
        m.update(pred, y)
        if len(kept) < keep:
            kept += [(batch[0][i].cpu(), y[i].cpu(), pred[i].cpu()) for i in range(min(keep - len(kept), len(y)))]
    return {"loss": total / max(pixels, 1), **m.compute()}, kept


def colorize(mask: torch.Tensor, palette: list) -> torch.Tensor:
    """Class ids (H, W) -> RGB floats (3, H, W) in [0, 1]; ignored pixels are black."""
    pal = torch.cat([torch.tensor(palette, dtype=torch.float) / 255, torch.zeros(1, 3)])
    return pal[mask.long().clamp(max=len(palette)).where(mask != IGNORE, len(palette))].permute(2, 0, 1)


@torch.no_grad()
def segment_images(model: nn.Module, spec: DataSpec, rt: Runtime, images: list[torch.Tensor]) -> list[torch.Tensor]:
    """uint8 images (C, h, w) of any sizes -> class ids (h, w) each: resized to the model's size and run as one
    batch, the logits resized back to each image's own size before the argmax."""
    x = torch.stack(
        [
            F.interpolate(
                img[None].float(), size=tuple(spec.image_size), mode="bilinear", antialias=True, align_corners=False
            )[0]
            for img in images
        ]
    ).to(rt.device)
    x, _ = prepare((x, torch.zeros(len(images), 1, 1, device=rt.device)), spec)
    with rt.autocast():
        logits = model(x).float()
    return [
        F.interpolate(lg[None], size=tuple(img.shape[-2:]), mode="bilinear", align_corners=False).argmax(1)[0].cpu()
        for lg, img in zip(logits, images)
    ]


def describe(img: torch.Tensor, pred: torch.Tensor, spec: DataSpec) -> tuple[torch.Tensor, dict, str]:
    """(overlay uint8 (3, h, w): image and class colours half and half, share of each class, a summary line)."""
    rgb = img.float() / 255 if img.shape[0] == 3 else (img.float() / 255).expand(3, -1, -1)
    blend = 0.5 * rgb + 0.5 * colorize(pred, spec.extra["palette"])
    frac = torch.bincount(pred.flatten(), minlength=spec.num_classes).float() / pred.numel()
    top = frac.topk(min(3, spec.num_classes))
    share = ", ".join(f"{spec.class_names[i]} {v:.0%}" for v, i in zip(top.values.tolist(), top.indices.tolist()))
    return (blend * 255).round().to(torch.uint8), dict(zip(spec.class_names, frac.tolist())), share


SERVE_SIDE = 1024  # predict and /segment answer at the image's size, or scaled down to this long side


__all__ = ["Segment", "prepare", "joint_augment", "segment_images", "describe", "colorize", "denormalize"]


class Segment(Family):
    """Semantic segmentation (see the module docstring)."""

    prepare = staticmethod(prepare)

    METRIC = ("miou", "max")

    # deeprecipe check (checks/core.py): losses count per labelled pixel (ln C at init, mean over pixels per
    # example for the dependency check and the prediction dynamics); 255 is not out of range
    IGNORE_INDEX = IGNORE

    CHECK_DEFAULTS = {"overfit_examples": 2}  # memorizing is per pixel: two images are thousands of labels

    def saliency_score(self, model: nn.Module, batch, cfg: Config) -> torch.Tensor:
        """The saliency check's score: the mean of the true class's logit over the labelled pixels."""
        return label_score(model(batch[0]).float(), batch[1], IGNORE)

    def show_batch(self, batch, spec: DataSpec) -> tuple[torch.Tensor, list[str]]:
        """Images de-normalized next to their masks in colour (black: ignored), as the net sees them."""
        x, y = batch[0][:16], batch[1][:16]
        pal = spec.extra.get("palette") or [[(37 * i) % 256, (91 * i) % 256, (173 * i) % 256] for i in range(256)]
        tiles = [
            t for img, m in zip(denormalize(x, spec).cpu(), y.cpu()) for t in (img.expand(3, -1, -1), colorize(m, pal))
        ]
        caps = [c for m in y for c in ("image", f"mask ({float((m == IGNORE).float().mean()):.0%} ignored)")]
        return torch.stack(tiles), caps

    def loss(self, model: nn.Module, batch, cfg: Config, part: str):
        x, y = batch
        logits = model(x)  # (B, classes, H, W)
        ce = F.cross_entropy(logits.float(), y, ignore_index=IGNORE, label_smoothing=cfg.optim.label_smoothing)
        w = getattr(cfg.model, "dice", 0.0)
        if not w:
            return ce, {}
        d = dice_loss(logits, y)
        return ce + w * d, {"ce": ce.detach(), "dice": d.detach()}

    def evaluate(self, model: nn.Module, data: Data, split: str, cfg: Config, rt: Runtime, final: bool) -> dict:
        return run_split(model, data, split, cfg, rt)[0]

    def finish(self, model: nn.Module, data: Data, cfg: Config, rt: Runtime, run_dir: Path, results: dict) -> dict:
        """Test metrics, a table of per-class IoU, and overlays: image, truth, prediction side by side."""
        from deeprecipe.engine import drift, plots

        split = data.final_split()
        model.eval()
        with torch.no_grad(), rt.autocast():
            m, kept = run_split(model, data, split, cfg, rt, keep=8)
        spec, pal = data.spec, data.spec.extra["palette"]
        tiles, caps = [], []
        for img, y, p in kept:
            acc = float((p == y)[y != IGNORE].float().mean()) if (y != IGNORE).any() else float("nan")
            tiles += [
                img.float() / 255 if img.shape[0] == 3 else (img.float() / 255).expand(3, -1, -1),
                colorize(y, pal),
                colorize(p, pal),
            ]
            caps += ["image", "truth", f"prediction ({acc:.0%} px)"]
        plots_dir = Path(run_dir) / "plots"
        plots.image_grid(
            torch.stack(tiles),
            caps,
            plots_dir / "segmentation.png",
            f"{split}: image / truth / prediction (mIoU {m['miou']:.3f})",
            cols=6,
        )
        lines = [f"{split} per-class IoU (mIoU {m['miou']:.4f}, pixel accuracy {m['pixel_acc']:.4f})"]
        lines += [f"{n:<16} {'-' if v is None else f'{v:.4f}'}" for n, v in zip(spec.class_names, m["iou"])]
        plots_dir.mkdir(parents=True, exist_ok=True)
        (plots_dir / "iou.txt").write_text("\n".join(lines) + "\n")
        drift.save_reference(self, model, data, cfg, rt, run_dir)  # for `deeprecipe monitor`
        return {f"{split}_{k}": v for k, v in m.items()}

    def predict(
        self, model: nn.Module, spec: DataSpec, cfg: Config, rt: Runtime, files: list[str], opts: PredictOptions
    ) -> list[dict]:
        """Each image -> OUT/<stem>_labels.png (class ids, at the image's own size up to SERVE_SIDE) and
        OUT/<stem>_overlay.png."""
        from torchvision.io import write_png

        out_dir = Path(opts.out or "predictions")
        out_dir.mkdir(parents=True, exist_ok=True)
        results = []
        for f in files:
            img = image_ops.fit_long_side(image_ops.read(f, spec.in_channels), SERVE_SIDE)  # (C, h, w) as /segment
            pred = segment_images(model, spec, rt, [img])[0]
            labels, overlay = out_dir / f"{Path(f).stem}_labels.png", out_dir / f"{Path(f).stem}_overlay.png"
            write_png(pred.to(torch.uint8)[None], str(labels))
            blend, fractions, share = describe(img, pred, spec)
            write_png(blend, str(overlay))
            results.append(
                {
                    "file": f,
                    "labels": str(labels),
                    "overlay": str(overlay),
                    "fractions": fractions,
                    "text": f"{f}: {share} -> {labels}, {overlay}",
                }
            )
        return results

    def explain(
        self, model: nn.Module, spec: DataSpec, cfg: Config, rt: Runtime, files: list[str], opts: ExplainOptions
    ) -> list[dict]:
        """Each image (at the model's size) -> the attribution of the mean logit of one class over the pixels
        predicted as that class: --target, else the class predicted on most pixels; an overlay PNG per file."""
        from deeprecipe.engine import explain as ex

        method = ex.check_method(opts.method, what="a segmenter")
        if opts.target is not None and not 0 <= opts.target < spec.num_classes:
            raise UserError(f"explain --target {opts.target}: the model has classes 0..{spec.num_classes - 1}")
        images = [image_ops.resize(image_ops.read(f, spec.in_channels), tuple(spec.image_size)) for f in files]
        preds = segment_images(model, spec, rt, images)  # (H, W) each, at the model's size
        baseline = prepare((torch.zeros(1, *images[0].shape), torch.zeros(1, 1, 1)), spec)[0]  # black
        results = []
        for f, img, pred in zip(files, images, preds):
            c = (
                int(pred.flatten().bincount(minlength=spec.num_classes).argmax())
                if opts.target is None
                else opts.target
            )
            mask = (pred == c).float().to(rt.device)
            mask = mask if mask.sum() > 0 else torch.ones_like(mask)  # a class predicted nowhere: all pixels
            share = float((pred == c).float().mean())

            def forward_of(net, mask=mask, c=c):
                return lambda z: (net(z).float()[:, c] * mask).sum((1, 2)) / mask.sum()  # (B,)

            x = prepare((img[None].float(), torch.zeros(1, 1, 1)), spec)[0]
            r = ex.image_explanation(model, img, x, baseline, forward_of, None, method, opts.sanity)
            r = ex.save_explanation(r, f, opts.out)
            label = spec.class_names[c]
            r |= {"file": f, "label": label, "target": c, "score": round(share, 4)}
            r["text"] = f"{f}: {label} ({share:.0%} of the pixels) {method} -> {r['out']}"
            results.append(r)
        return results

    def serve(self, ctx: ServeContext) -> None:
        """POST /segment: an image -> its class map and an overlay (PNGs as base64, at the image's own size up to a
        long side of SERVE_SIDE) and the share of each class; concurrent requests run as one batch."""
        from fastapi import File, UploadFile

        spec = ctx.spec
        batch = ctx.batcher("segment", lambda images: segment_images(ctx.model, spec, ctx.rt, images))

        @ctx.router.post("/segment", summary="Segment an image (PNG, JPEG, ...)")
        async def segment(image: UploadFile = File(..., description="the image file")):
            # its own size, so the overlay matches the upload, up to SERVE_SIDE (full-size logits: GBs)
            img = await ctx.read_image(image, size=(0, 0), max_side=SERVE_SIDE)
            pred = await batch(img)
            blend, fractions, share = describe(img, pred, spec)
            return {
                "text": share,
                "fractions": {k: round(v, 5) for k, v in fractions.items()},
                "overlay": image_ops.png_base64(blend),
                "labels": image_ops.png_base64(pred.to(torch.uint8)[None]),
            }

        ctx.widget("/segment", "image", "Segment an image")
