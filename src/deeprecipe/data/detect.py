"""Object detection data: generated driving scenes with a box and a class per object.

A split is a TensorSplit of (images uint8 (N, 3, H, W), boxes float (N, M, 4), labels long (N, M)): boxes are
(x1, y1, x2, y2) in pixels of the image (edges: a box over pixel columns 3..5 is x1=3, x2=6), label -1 marks
padding (data/core.py pad_targets), so images with different numbers of objects batch by indexing. The spec
says so with `extra["boxes"] = "xyxy"`.

`scenes-detect` renders the scenes of `scenes` (data/scenes.py) with their instance map, and each car,
pedestrian and traffic-sign plate gets the box of its visible pixels: objects far away are small, cars hide one
another and the pedestrians behind them. An object showing fewer than `min_pixels` pixels (or narrower than
`min_side` pixels), or less than `min_share` of itself (the rest hidden by nearer objects; KITTI's "largely
occluded"), is not labelled. Image i of a split is a pure function of its number, as in `scenes`.

Augmentation (flip, zoom, shift, crop) is applied per batch on the device by families/detect, moving and
clipping the boxes with the image.

A box that evaluation ignores (a VOC `difficult` object, a COCO `iscrowd` region) has label -2 - c for its class
c (`ignored`, `ignored_class`): it is neither padding nor a target of the loss, and mAP neither counts it missed
nor counts a detection on it a false alarm (COCOeval's crowd rule). An image enters the net at `data.size` either
resized (squashed) or letterboxed (its aspect kept, padded): `placement` gives the map from the image's pixels to
the model's, `to_model_boxes` / `to_image_boxes` move boxes along it and back.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from deeprecipe.config import ranged
from deeprecipe.data.core import Data, DataError, DataSpec, TensorSplit
from deeprecipe.data.image_ops import resize
from deeprecipe.data.scenes import render_scenes, render_splits

DETECT_CLASSES = ["car", "person", "traffic sign"]
DETECT_PALETTE = [(0, 0, 142), (220, 20, 60), (220, 220, 0)]
_SEG_TO_DETECT = {6: 0, 5: 1, 7: 2}  # scenes' segmentation ids of car, person, traffic sign
OBJECTS = 7  # instance ids the renderer gives: 2 sign plates, 5 cars or pedestrians


def boxes_from_instances(
    inst: torch.Tensor,
    label: torch.Tensor,
    min_pixels: int = 8,
    min_side: int = 2,
    painted: torch.Tensor | None = None,
    min_share: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Instance maps (N, H, W) (-1 background) and segmentation labels (N, H, W) -> the box of each object's
    visible pixels (N, OBJECTS, 4) and its detection class (N, OBJECTS), -1 where the object is absent, too
    small to see, or (given the pixels each object `painted` covered before occlusion, (N, OBJECTS)) hidden
    but for less than `min_share` of itself. All images at once, no loop over images."""
    N, H, W = inst.shape
    ids = torch.arange(OBJECTS, device=inst.device).view(1, -1, 1, 1)
    m = inst.unsqueeze(1) == ids  # (N, O, H, W)
    count = m.sum((2, 3))
    rows, cols = m.any(3), m.any(2)  # (N, O, H), (N, O, W)
    y1 = rows.float().argmax(2)
    y2 = H - rows.flip(2).float().argmax(2)
    x1 = cols.float().argmax(2)
    x2 = W - cols.flip(2).float().argmax(2)
    boxes = torch.stack([x1, y1, x2, y2], 2).float()
    seg = (m * label.unsqueeze(1).long()).sum((2, 3)) // count.clamp_min(1)  # one class per instance
    lut = torch.full((256,), -1, dtype=torch.long, device=inst.device)
    for k, v in _SEG_TO_DETECT.items():
        lut[k] = v
    cls = lut[seg]
    keep = (count >= min_pixels) & (x2 - x1 >= min_side) & (y2 - y1 >= min_side) & (cls >= 0)
    if painted is not None:
        keep &= count >= min_share * painted
    cls = torch.where(keep, cls, -1)
    # real boxes first in each row (padding last), in a stable order
    order = (~keep).long().argsort(dim=1, stable=True)
    return boxes.gather(1, order[..., None].expand(-1, -1, 4)) * keep.gather(1, order)[..., None], cls.gather(1, order)


PAD_VALUE = 114  # letterbox padding: YOLO's grey, near the mean of natural images (normalizes to about 0)


def ignored(c: int) -> int:
    """The label of a box of class c that evaluation ignores (VOC difficult, COCO iscrowd)."""
    return -2 - c


def ignored_class(labels: torch.Tensor) -> torch.Tensor:
    """Labels (any shape) -> the class of each ignored box (label <= -2), -1 elsewhere."""
    return torch.where(labels <= -2, -2 - labels, -1)


def placement(w: float, h: float, size: tuple[int, int], letterbox: bool) -> tuple[float, float, float, float]:
    """(sx, sy, px, py): a point (u, v) of a w x h image lies at (u * sx + px, v * sy + py) in the model's H x W
    image. Resize: sx = W / w, sy = H / h. Letterbox: one scale, the image centred, the rest padded."""
    H, W = size
    if not letterbox:
        return W / w, H / h, 0.0, 0.0
    nw, nh = letterbox_size(w, h, size)
    return nw / w, nh / h, float((W - nw) // 2), float((H - nh) // 2)


def letterbox_size(w: float, h: float, size: tuple[int, int]) -> tuple[int, int]:
    """(width, height) of a w x h image scaled to fit H x W with its aspect kept."""
    H, W = size
    s = min(W / w, H / h)
    return max(1, min(W, round(w * s))), max(1, min(H, round(h * s)))


def to_model_image(img: torch.Tensor, size: tuple[int, int], letterbox: bool) -> torch.Tensor:
    """uint8 (C, h, w) -> (C, H, W) as `placement` says: resized, or letterboxed (padded with PAD_VALUE)."""
    if not letterbox:
        return resize(img, tuple(size))
    H, W = size
    h, w = img.shape[-2:]
    nw, nh = letterbox_size(w, h, size)
    _, _, px, py = placement(w, h, size, True)
    out = torch.full((img.shape[0], H, W), PAD_VALUE, dtype=torch.uint8)
    out[:, int(py) : int(py) + nh, int(px) : int(px) + nw] = resize(img, (nh, nw))
    return out


def to_model_boxes(boxes: torch.Tensor, place) -> torch.Tensor:
    """Boxes (..., 4) xyxy in an image's pixels -> the model's pixels (place: `placement`)."""
    sx, sy, px, py = place
    return boxes * boxes.new_tensor([sx, sy, sx, sy]) + boxes.new_tensor([px, py, px, py])


def to_image_boxes(boxes: torch.Tensor, place, w: float, h: float) -> torch.Tensor:
    """Boxes (..., 4) in the model's pixels -> the w x h image's pixels, clipped to it (inverse of to_model_boxes)."""
    sx, sy, px, py = place
    out = (boxes - boxes.new_tensor([px, py, px, py])) / boxes.new_tensor([sx, sy, sx, sy])
    return torch.stack(
        [out[..., 0].clamp(0, w), out[..., 1].clamp(0, h), out[..., 2].clamp(0, w), out[..., 3].clamp(0, h)], -1
    )


def box_spec(
    classes: list[str], palette, images: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor, extra, n_images=0
):
    """The DataSpec of a detection data set (statistics from its train split): `images` all of it or a sample
    (n, 3, H, W), boxes (..., 4) and labels (...) of the whole split (-1 padding), n_images its size (default
    len(images))."""
    n_images = n_images or len(images)
    xf = images[:512].float() / 255
    valid = labels >= 0
    counts = torch.bincount(labels[valid], minlength=len(classes))[: len(classes)]
    wh = (boxes[..., 2:] - boxes[..., :2])[valid]
    g = torch.Generator().manual_seed(0)
    sample = wh[torch.randperm(len(wh), generator=g)[:256]] if len(wh) else wh
    return DataSpec(
        num_classes=len(classes),
        class_names=list(classes),
        in_channels=images.shape[1],
        image_size=(images.shape[2], images.shape[3]),
        mean=tuple(xf.mean((0, 2, 3)).tolist()),
        std=tuple(xf.std((0, 2, 3)).clamp_min(1e-3).tolist()),
        extra={
            "boxes": "xyxy",
            "palette": [list(map(int, c)) for c in palette],
            # objects of each class per training image (the detector's heat-map prior at init)
            "objects_per_image": [float(c) / max(n_images, 1) for c in counts.tolist()],
            "box_wh_sample": [[round(float(a), 2), round(float(b), 2)] for a, b in sample.tolist()],
            **extra,
        },
    )


@dataclass
class BoxData:
    """Options shared by the detection data sets (augmentation runs on the device per batch)."""

    name: str = ""
    flip: bool = True  # random horizontal flip of the image and its boxes
    scale: tuple[float, float] = ranged((0.8, 1.25), "> 0")  # random zoom range; (1, 1) turns it off
    crop: int = 0  # train on random square crops of this size (0: the full image, randomly shifted)
    min_visible: float = 0.4  # a box cut by the crop keeps its label when this share of it stays in view

    def build(self) -> Data:
        raise NotImplementedError

    def finish(self, classes, palette, train, val=None, test=None) -> Data:
        if len(train[0]) == 0:
            raise DataError(f"data set '{self.name}': no training images")
        extra = {"flip": self.flip, "scale": list(self.scale), "crop": self.crop, "min_visible": self.min_visible}
        spec = box_spec(classes, palette, *train, extra)
        wrap = lambda s: TensorSplit(*s) if s is not None and len(s[0]) else None  # noqa: E731
        return Data(spec, TensorSplit(*train), wrap(val), wrap(test))


@dataclass
class ScenesDetectData(BoxData):
    """Generated driving scenes with boxes; see the module docstring."""

    name: str = "scenes-detect"
    size: tuple[int, int] = ranged((128, 128), "> 0")  # (H, W) of every image
    train_size: int = ranged(4000, "> 0")
    val_size: int = ranged(200, ">= 0")
    test_size: int = ranged(500, ">= 0")
    seed: int = 0  # shifts every split's range of scene numbers
    min_pixels: int = 8  # an object showing fewer pixels is not labelled
    min_side: int = 2  # nor one whose visible box is narrower or lower than this (pixels)
    min_share: float = 0.3  # nor one hidden by nearer objects but for less than this share of its pixels
    chunk: int = 64

    def build(self) -> Data:
        splits = render_splits(self, self.render)
        return self.finish(DETECT_CLASSES, DETECT_PALETTE, splits["train"], splits["val"], splits["test"])

    def render(self, numbers: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        imgs, boxes, labels = [], [], []
        for i in range(0, len(numbers), self.chunk):
            img, seg, inst, painted = render_scenes(numbers[i : i + self.chunk], tuple(self.size), instances=True)
            b, y = boxes_from_instances(inst, seg, self.min_pixels, self.min_side, painted, self.min_share)
            imgs.append(img), boxes.append(b), labels.append(y)
        return torch.cat(imgs), torch.cat(boxes), torch.cat(labels)
