"""Object detection on files and uploads: detect (predict, POST /detect), explain (`deeprecipe explain`, POST
/explain). An image of any size is brought to the model's size as the training images were (resized or
letterboxed), and the boxes go back to the image's own pixels.

explain attributes one detection: centernet scores a box by one heat-map logit (its class at the cell that
regressed it; decode(cells=True) says which), so that logit, the box's score before the sigmoid, is what
Integrated Gradients, Grad-CAM (at the neck's feature map, which both heads read) and occlusion explain.
(No `from __future__ import annotations` here: FastAPI reads the endpoints' annotations at run time.)
"""

import json
from pathlib import Path

import torch
import torch.nn as nn

from deeprecipe.config import Config
from deeprecipe.core import DataSpec, UserError
from deeprecipe.data import image_ops
from deeprecipe.data.detect import placement, to_image_boxes, to_model_image
from deeprecipe.data.image_ops import normalize
from deeprecipe.families.detect.metrics import draw_boxes
from deeprecipe.family import ExplainOptions, PredictOptions, ServeContext
from deeprecipe.models.detect import CenterNet
from deeprecipe.runtime import Runtime

DRAW_THRESH = 0.3  # boxes scoring at least this are drawn and explained (all above score_thresh are returned)
CAM_LAYER = "smooth"  # centernet's neck output (B, neck, H / stride, W / stride), the map both heads read


def at_model_size(img: torch.Tensor, spec: DataSpec) -> torch.Tensor:
    """uint8 (C, h, w) of any size -> (3, H, W) at the model's size (grey repeated to three channels), resized or
    letterboxed as the training images were (spec.extra["letterbox"])."""
    rgb = img[:3] if img.shape[0] >= 3 else img.expand(3, -1, -1)
    return to_model_image(rgb, tuple(spec.image_size), bool(spec.extra.get("letterbox")))


def to_image(boxes: torch.Tensor, spec: DataSpec, w: int, h: int) -> torch.Tensor:
    """Boxes (k, 4) in the model's pixels -> those of the w x h image at_model_size was given."""
    place = placement(w, h, tuple(spec.image_size), bool(spec.extra.get("letterbox")))
    return to_image_boxes(boxes.float().cpu(), place, w, h)


@torch.no_grad()
def detect_images(model: nn.Module, spec: DataSpec, rt: Runtime, images: list[torch.Tensor]) -> list[dict]:
    """uint8 images (C, h, w) of any sizes -> per image {"boxes": [[x1, y1, x2, y2], ...] in the image's own
    pixels, "labels", "scores"}: each is resized to the model's size, all run as one batch."""
    x = normalize(torch.stack([at_model_size(img, spec) for img in images]).to(rt.device), spec)
    with rt.autocast():
        dets = model.detect(x)
    out = []
    for img, (b, s, y) in zip(images, dets):
        b = to_image(b, spec, img.shape[-1], img.shape[-2]).round(decimals=1)
        out.append(
            {
                "boxes": b.tolist(),
                "labels": [spec.class_names[int(c)] for c in y],
                "scores": [round(float(v), 4) for v in s],
            }
        )
    return out


def overlay(img: torch.Tensor, det: dict) -> torch.Tensor:
    """The image (uint8 (C, h, w)) with its detections drawn (those scoring at least DRAW_THRESH)."""
    keep = [i for i, s in enumerate(det["scores"]) if s >= DRAW_THRESH]
    boxes = torch.tensor([det["boxes"][i] for i in keep]).view(-1, 4)
    caps = [f"{det['labels'][i]} {det['scores'][i]:.2f}" for i in keep]
    return draw_boxes(img if img.shape[0] == 3 else img[:1].expand(3, -1, -1), boxes, caps, (230, 0, 0))


def summary(det: dict) -> str:
    keep = [n for n, s in zip(det["labels"], det["scores"]) if s >= DRAW_THRESH]
    counts = {n: keep.count(n) for n in dict.fromkeys(keep)}
    return ", ".join(f"{v} {k}" for k, v in counts.items()) or "nothing found"


def pick_detection(model: nn.Module, spec: DataSpec, rt: Runtime, image: torch.Tensor, target: int | None, name: str):
    """The detection explain_detection explains in uint8 image (C, h, w): the `target`-th by score (None: the
    best) among those scoring at least DRAW_THRESH, as (image at the model's size (3, H, W), its normalized batch
    (1, 3, H, W), class, cell, box (4,) in the model's pixels, score); a one-line error when there is none."""
    if not isinstance(model, CenterNet):
        raise UserError(
            f"explain works for centernet detectors (one heat-map logit per box), not {type(model).__name__}"
        )
    img = at_model_size(image, spec)
    x = normalize(img[None].to(rt.device), spec)
    with torch.no_grad():  # fp32, as the attribution runs: the score reported is the sigmoid of the logit explained
        boxes, scores, labels, cells = model.decode(model(x), cells=True)[0]
    order = scores.argsort(descending=True)
    order = order[scores[order] >= DRAW_THRESH]
    if not len(order):
        best = f" (the best scores {float(scores.max()):.2f})" if len(scores) else ""
        raise UserError(f"explain: {name} has no detection scoring at least {DRAW_THRESH}{best}")
    n = 0 if target is None else target
    if not 0 <= n < len(order):
        raise UserError(
            f"explain --target {n}: {name} has {len(order)} detections scoring at least {DRAW_THRESH} "
            f"(--target 0..{len(order) - 1})"
        )
    k = int(order[n])
    return img, x, int(labels[k]), int(cells[k]), boxes[k].float().cpu(), float(scores[k])


def explain_detection(
    model: nn.Module,
    spec: DataSpec,
    rt: Runtime,
    image: torch.Tensor,
    method: str,
    target: int | None = None,
    sanity: bool = False,
    name: str = "the image",
) -> dict:
    """One uint8 image (C, h, w) of any size -> the attribution of one detection's logit (see the module
    docstring; pick_detection says which) over the image at the model's size: engine/explain.py
    image_explanation's result ("map", "png": the overlay with the box drawn, "delta", "sanity") with "target",
    "label", "score" and "box" (xyxy in the image's own pixels). What `explain` and the served /explain run."""
    from deeprecipe.engine import explain as ex

    img, x, c, cell, box, score = pick_detection(model, spec, rt, image, target, name)

    def forward_of(net):
        return lambda z: net(z).float()[:, c].flatten(1)[:, cell]  # (B,) the logit that scored the box

    label = spec.class_names[c]
    shown = draw_boxes(img, box[None], None, (255, 255, 255))  # no caption over the heat; the text names it
    baseline = torch.zeros_like(x)  # the data's mean colour (a grey like the road); black boxes look like tyres
    r = ex.image_explanation(model, shown, x, baseline, forward_of, None, method, sanity, CAM_LAYER)
    own = [round(v, 1) for v in to_image(box[None], spec, image.shape[-1], image.shape[-2])[0].tolist()]
    return r | {"target": target or 0, "label": label, "score": round(score, 4), "box": own}


def serve_explain(ctx: ServeContext) -> None:
    """POST /explain?method=ig|gradcam|occlusion: an image file -> its best detection (label, score, box in the
    upload's pixels) and the overlay of its attribution (explain_detection, as `deeprecipe explain` runs it),
    one request at a time in a worker thread; an image with nothing detected is a 422 that says so."""
    import base64
    from typing import Literal

    from fastapi import File, Query, UploadFile

    @ctx.router.post("/explain", summary="Explain an image's best detection (attribution overlay)")
    async def explain(
        image: UploadFile = File(..., description="the image file"),
        method: Literal["ig", "gradcam", "occlusion"] = Query("ig", description="attribution method"),
    ):
        img = await ctx.read_image(image, size=(0, 0), max_side=1024)  # as /detect reads it
        # 422: nothing detected, or not a centernet
        r = await ctx.locked(explain_detection, ctx.model, ctx.spec, ctx.rt, img, method, bad=422)
        overlay = base64.b64encode(r["png"]).decode()
        return {k: r[k] for k in ("label", "score", "box", "method")} | {"prob": r["score"], "overlay": overlay}

    ctx.widget("/explain", "image", "Explain the best detection", methods=["ig", "gradcam", "occlusion"])


def predict(
    model: nn.Module, spec: DataSpec, cfg: Config, rt: Runtime, files: list[str], opts: PredictOptions
) -> list[dict]:
    """Each image -> its boxes (JSON: OUT/<stem>.json, in the image's own pixels) and OUT/<stem>_boxes.png."""
    from torchvision.io import write_png

    out_dir = Path(opts.out or "predictions")
    out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for f in files:
        img = image_ops.read(f, 3)
        det = detect_images(model, spec, rt, [img])[0]
        js, png = out_dir / f"{Path(f).stem}.json", out_dir / f"{Path(f).stem}_boxes.png"
        js.write_text(json.dumps({"file": f, **det}) + "\n")
        write_png(overlay(img, det), str(png))
        results.append(
            {"file": f, **det, "json": str(js), "overlay": str(png), "text": f"{f}: {summary(det)} -> {js}, {png}"}
        )
    return results


def explain(
    model: nn.Module, spec: DataSpec, cfg: Config, rt: Runtime, files: list[str], opts: ExplainOptions
) -> list[dict]:
    """Each image -> the attribution of one detection's logit (explain_detection): --target N is the N-th by
    score (0: the best, the default); an overlay PNG per file with the explained box drawn."""
    from deeprecipe.engine import explain as ex

    method = ex.check_method(opts.method, what="a detector")
    images = [image_ops.read(f, 3) for f in files]
    for f, img in zip(files, images):  # a bad file, or one with nothing to explain, fails before any work
        pick_detection(model, spec, rt, img, opts.target, f)
    results = []
    for f, img in zip(files, images):
        r = explain_detection(model, spec, rt, img, method, opts.target, opts.sanity, name=f)
        r = ex.save_explanation(r, f, opts.out) | {"file": f}
        box = ", ".join(f"{v:g}" for v in r["box"])
        r["text"] = f"{f}: {r['label']} ({r['score']:.3f}) at [{box}] {method} -> {r['out']}"
        results.append(r)
    return results


def serve(ctx: ServeContext) -> None:
    """POST /detect: an image -> boxes (in the upload's pixels), classes, scores and the image with the boxes
    drawn (PNG as base64); concurrent requests run as one batch."""
    from fastapi import File, UploadFile

    spec = ctx.spec
    batch = ctx.batcher("detect", lambda images: detect_images(ctx.model, spec, ctx.rt, images))

    @ctx.router.post("/detect", summary="Detect cars, people and signs in an image (PNG, JPEG, ...)")
    async def detect(image: UploadFile = File(..., description="the image file")):
        img = await ctx.read_image(image, size=(0, 0), max_side=1024)
        det = await batch(img)
        return {"text": summary(det), **det, "overlay": image_ops.png_base64(overlay(img, det))}

    ctx.widget("/detect", "image", "Detect objects")
    if isinstance(ctx.model, CenterNet):  # a torchvision detector has no one logit per box to explain
        serve_explain(ctx)
