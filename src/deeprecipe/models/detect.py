"""Object detectors. A detector is an nn.Module with three methods the detection family calls:

    detector.loss(x, boxes, labels, per_image=False) -> (loss: 0-d, or (B,) per image; logs: name -> 0-d)
    detector.detect(x) -> [(boxes (k, 4) xyxy pixels, scores (k,), labels (k,))] per image, after NMS
    detector(x) -> what `deeprecipe export` writes (the net's raw outputs; decoding and NMS stay in Python)

x is a normalized image batch (B, C, H, W); boxes (B, M, 4) xyxy pixels and labels (B, M) with -1 on padding
(data/core.py pad_targets). Score threshold, NMS IoU and the number of boxes kept are config fields.

`centernet`: an anchor-free one-stage detector in the manner of CenterNet and TTFNet. A ResNet or plain CNN
backbone (stride 32; or torchvision's ResNet-18, which loads its published weights: `model.weights`) and a
top-down feature pyramid give one map at stride `stride` (4); per cell the head predicts a heat map per class
(is this cell an object's centre?) and the distances (left, top, right, bottom) from the cell's centre to the
box edges, as stride * exp(t).

    targets: each box puts a Gaussian (sigma = box size / 6 * 0.54 per axis, peak 1 at its centre cell) into
             its class's heat map; the cells inside a box (and its centre cell) regress it, weighted by that
             Gaussian
    loss:    penalty-reduced focal loss on the heat maps (CenterNet: alpha 2, beta 4), per positive centre,
             + box_weight * (1 - GIoU) of the regressed boxes, Gaussian-weighted mean
    init:    the heat bias is the prior log-odds of a centre cell per class (objects per image / cells), the
             box layer starts at zero (a 2 x stride square around each cell): the loss at init is known
             (families/detect expected_init_loss)
    decode:  the best-scoring cells (with `peaks`, only the local maxima of a 3x3 max-pool, as CenterNet), the
             box at each, then torchvision.ops.batched_nms per class and the top `max_det`

`tv-detector`: torchvision's Faster R-CNN (mobilenet_v3_large_320_fpn, resnet50_fpn), RetinaNet, FCOS and
SSDlite through the same interface, from scratch or from a local torchvision weights file (`weights_path`,
read with torch.load(weights_only=True) or safetensors); nothing is ever downloaded.

No classifier API (models/head.py): a detector has several heads (class heat maps and box sizes, or
torchvision's box and class predictors), not one layer that makes the class scores.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from deeprecipe.config import ranged
from deeprecipe.core import ConfigError, DataSpec
from deeprecipe.models.pretrained import torchvision_start
from deeprecipe.models.resnet import BasicBlock


def giou(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Generalized IoU of matching boxes (..., 4) xyxy: IoU - (enclosure - union) / enclosure, in (-1, 1]."""
    iw = (torch.minimum(a[..., 2], b[..., 2]) - torch.maximum(a[..., 0], b[..., 0])).clamp_min(0)
    ih = (torch.minimum(a[..., 3], b[..., 3]) - torch.maximum(a[..., 1], b[..., 1])).clamp_min(0)
    inter = iw * ih
    area = lambda z: (z[..., 2] - z[..., 0]).clamp_min(0) * (z[..., 3] - z[..., 1]).clamp_min(0)  # noqa: E731
    union = area(a) + area(b) - inter
    cw = torch.maximum(a[..., 2], b[..., 2]) - torch.minimum(a[..., 0], b[..., 0])
    ch = torch.maximum(a[..., 3], b[..., 3]) - torch.minimum(a[..., 1], b[..., 1])
    enc = cw * ch
    return inter / (union + eps) - (enc - union) / (enc + eps)


def nms(boxes, scores, labels, iou: float, keep: int, *more):
    """Per-class NMS (torchvision.ops.batched_nms), the best `keep` boxes (and the same rows of each of `more`)."""
    from torchvision.ops import batched_nms

    idx = batched_nms(boxes.float(), scores.float(), labels, iou)[:keep]
    return boxes[idx], scores[idx], labels[idx], *(m[idx] for m in more)


# ------------------------------------------------------------------------------------------------ centernet


@dataclass
class CenterNetConfig:
    name: str = "centernet"
    backbone: Literal["resnet", "cnn", "tv-resnet18"] = "resnet"  # basic blocks | conv-BN-ReLU | torchvision's
    weights: str = ""  # tv-resnet18's: a ResNet-18 file (torchvision's layout) or IMAGENET1K_V1 (models/pretrained.py)
    width: int = ranged(16, "> 0")  # channels of the stem; doubled per stage up to max_width
    max_width: int = 128
    blocks: tuple[int, ...] = ranged((1, 1, 2, 1), "> 0")  # blocks per stage (strides 4, 8, 16, 32)
    neck: int = 64  # channels of the feature pyramid and the heads
    stride: Literal[4, 8] = 4  # output stride of the heat maps
    box_weight: float = 1.0  # weight of the GIoU loss against the heat-map focal loss
    score_thresh: float = 0.05  # boxes scoring lower are dropped
    nms_iou: float = 0.5  # per-class NMS IoU
    max_det: int = 50  # boxes kept per image
    peaks: bool = False  # keep only the 3x3 local maxima of the heat maps before NMS (CenterNet); False: every
    # cell is a candidate and NMS alone removes duplicates (two objects in neighbouring cells both survive)

    def build(self, spec: DataSpec) -> nn.Module:
        if len(self.blocks) != 4 or min(self.blocks) < 1:
            raise ConfigError(f"model.blocks={list(self.blocks)}: four stages of at least one block")
        if self.weights and self.backbone != "tv-resnet18":
            raise ConfigError(f"model.weights={self.weights}: pretrained weights need model.backbone=tv-resnet18")
        if self.backbone != "tv-resnet18":
            return CenterNet(spec, self)
        return torchvision_start(CenterNet(spec, self), spec, self.weights, "resnet18")


def _conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def own_backbone(in_channels: int, cfg: CenterNetConfig) -> tuple[nn.Module, nn.ModuleList, list[int]]:
    """(stem to stride 2, four stages at strides 4, 8, 16, 32, their widths) of basic blocks or plain convs."""
    w = cfg.width
    stem = nn.Sequential(_conv(in_channels, w, 2), _conv(w, w))
    widths, cin, stages = [], w, nn.ModuleList()
    for i, n in enumerate(cfg.blocks):
        cout = min(w * 2 ** (i + 1), cfg.max_width)
        if cfg.backbone == "resnet":
            layers = [BasicBlock(cin if j == 0 else cout, cout, 2 if j == 0 else 1) for j in range(n)]
        else:
            layers = [_conv(cin if j == 0 else cout, cout, 2 if j == 0 else 1) for j in range(n)]
        stages.append(nn.Sequential(*layers))
        widths.append(cout)
        cin = cout
    return stem, stages, widths


def tv_resnet18_trunk() -> nn.Module:
    """torchvision's ResNet-18 without its classifier, under its own names (conv1, bn1, layer1..4), so a
    torchvision file, a U-Net's `encoder.` or a pretraining run's trunk loads by name (models/pretrained.py
    best_prefix). RGB input; features at strides 4, 8, 16, 32 with widths 64, 128, 256, 512."""
    from torchvision.models import resnet18

    net = resnet18(weights=None, zero_init_residual=True)
    del net.fc
    return net


class CenterNet(nn.Module):
    def __init__(self, spec: DataSpec, cfg: CenterNetConfig):
        super().__init__()
        self.cfg, self.num_classes = cfg, spec.num_classes
        if cfg.backbone == "tv-resnet18":
            self.backbone, widths = tv_resnet18_trunk(), [64, 128, 256, 512]
        else:
            self.stem, self.stages, widths = own_backbone(spec.in_channels, cfg)
        levels = 4 if cfg.stride == 4 else 3  # pyramid levels from stride 32 down to the output stride
        self.lateral = nn.ModuleList(nn.Conv2d(c, cfg.neck, 1) for c in widths[-levels:])
        self.smooth = _conv(cfg.neck, cfg.neck)
        self.heat = nn.Sequential(_conv(cfg.neck, cfg.neck), nn.Conv2d(cfg.neck, self.num_classes, 1))
        self.box = nn.Sequential(_conv(cfg.neck, cfg.neck), nn.Conv2d(cfg.neck, 4, 1))
        self.levels = levels
        # init: the heat maps predict the prior of a centre cell, the boxes a 2 x stride square (see module doc)
        H, W = spec.image_size or (128, 128)
        cells = max(1, (H // cfg.stride) * (W // cfg.stride))
        per_image = spec.extra.get("objects_per_image") or [1.0] * self.num_classes
        prior = torch.tensor([min(max(n / cells, 1e-4), 0.5) for n in per_image])
        nn.init.normal_(self.heat[-1].weight, std=0.001)
        with torch.no_grad():
            self.heat[-1].bias.copy_((prior / (1 - prior)).log())
        nn.init.zeros_(self.box[-1].weight), nn.init.zeros_(self.box[-1].bias)

    @property
    def head(self) -> nn.Conv2d:
        return self.heat[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, classes + 4, H / stride, W / stride): heat-map logits, then t of (l, t, r, b)."""
        if hasattr(self, "backbone"):  # torchvision's ResNet-18, stem to stride 4
            b = self.backbone
            x, stages = b.maxpool(b.relu(b.bn1(b.conv1(x)))), [b.layer1, b.layer2, b.layer3, b.layer4]
        else:
            x, stages = self.stem(x), self.stages
        feats = []
        for stage in stages:
            x = stage(x)
            feats.append(x)
        feats = feats[-self.levels :]
        top = self.lateral[-1](feats[-1])
        for f, lat in zip(reversed(feats[:-1]), reversed(list(self.lateral[:-1]))):
            top = F.interpolate(top, size=f.shape[-2:], mode="nearest") + lat(f)
        f = self.smooth(top)
        return torch.cat([self.heat(f), self.box(f)], 1)

    # ---------------------------------------------------------------- targets, loss, decoding
    def cell_boxes(self, t: torch.Tensor) -> torch.Tensor:
        """t (B, 4, h, w) -> boxes (B, h, w, 4) xyxy pixels around each cell's centre."""
        s = self.cfg.stride
        h, w = t.shape[-2:]
        cy = (torch.arange(h, device=t.device, dtype=torch.float32) + 0.5) * s
        cx = (torch.arange(w, device=t.device, dtype=torch.float32) + 0.5) * s
        d = s * t.float().clamp(max=8).exp()  # (B, 4, h, w)
        return torch.stack([cx - d[:, 0], cy[:, None] - d[:, 1], cx + d[:, 2], cy[:, None] + d[:, 3]], -1)

    def targets(self, boxes: torch.Tensor, labels: torch.Tensor, h: int, w: int):
        """Heat maps (B, classes, h, w), and per cell the box it regresses (B, h, w, 4) with its weight (B, h, w)."""
        s, B, dev = self.cfg.stride, boxes.shape[0], boxes.device
        valid = labels >= 0
        b = boxes.float() / s  # in cells
        cx, cy = (b[..., 0] + b[..., 2]) / 2, (b[..., 1] + b[..., 3]) / 2  # (B, M)
        ci, cj = cy.floor().clamp(0, h - 1), cx.floor().clamp(0, w - 1)
        sx = ((b[..., 2] - b[..., 0]) * 0.54 / 6).clamp_min(0.3)
        sy = ((b[..., 3] - b[..., 1]) * 0.54 / 6).clamp_min(0.3)
        ii = torch.arange(h, device=dev, dtype=torch.float32).view(1, 1, h, 1)
        jj = torch.arange(w, device=dev, dtype=torch.float32).view(1, 1, 1, w)
        v = lambda z: z[..., None, None]  # noqa: E731
        g = torch.exp(-((jj - v(cj)) ** 2) / (2 * v(sx) ** 2) - (ii - v(ci)) ** 2 / (2 * v(sy) ** 2))
        g = g * v(valid.float())  # (B, M, h, w)
        onehot = F.one_hot(labels.clamp_min(0), self.num_classes).float() * valid[..., None]  # (B, M, C)
        heat = (g[:, :, None] * onehot[..., None, None]).amax(1) if labels.shape[1] else g.new_zeros(B, 0, h, w)
        # regression: cells whose centre lies inside a box; the box with the highest Gaussian there wins
        pc = (jj + 0.5) * s, (ii + 0.5) * s
        inside_x = (pc[0] > v(boxes[..., 0])) & (pc[0] < v(boxes[..., 2]))
        inside = inside_x & (pc[1] > v(boxes[..., 1])) & (pc[1] < v(boxes[..., 3]))
        inside |= (ii == v(ci)) & (jj == v(cj))  # a box narrower than a cell still has its centre cell
        gi = torch.where(inside, g, torch.zeros_like(g))
        area = ((boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])).clamp_min(1)
        weight_box, which = gi.max(1) if labels.shape[1] else (g.new_zeros(B, h, w), None)
        if which is None:
            return heat, boxes.new_zeros(B, h, w, 4), weight_box
        tbox = boxes.gather(1, which.flatten(1)[..., None].expand(-1, -1, 4)).view(B, h, w, 4)
        # bigger boxes count more, but less than their area (TTFNet's log-area weighting)
        weight = weight_box * area.log1p().gather(1, which.flatten(1)).view(B, h, w)
        return heat, tbox, weight

    def loss(self, x: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor, per_image: bool = False):
        out = self(x)
        return self.loss_of(out, boxes, labels, per_image)

    def loss_of(self, out: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor, per_image: bool = False):
        C = self.num_classes
        logits, t = out[:, :C].float(), out[:, C:].float()
        h, w = out.shape[-2:]
        heat, tbox, weight = self.targets(boxes, labels, h, w)
        pos = heat >= 1 - 1e-6
        logp, log1mp = F.logsigmoid(logits), F.logsigmoid(-logits)
        p = logits.sigmoid()
        focal = torch.where(pos, -((1 - p) ** 2) * logp, -((1 - heat) ** 4) * p**2 * log1mp)
        npos = pos.flatten(1).sum(1).float()
        g = giou(self.cell_boxes(t), tbox)
        box = (1 - g) * weight
        if per_image:
            hl = focal.flatten(1).sum(1) / npos.clamp_min(1)
            bl = box.flatten(1).sum(1) / weight.flatten(1).sum(1).clamp_min(1e-6)
            return hl + self.cfg.box_weight * bl, {}
        hl = focal.sum() / npos.sum().clamp_min(1)
        bl = box.sum() / weight.sum().clamp_min(1e-6)
        return hl + self.cfg.box_weight * bl, {"heat": hl.detach(), "box": bl.detach()}

    @torch.no_grad()
    def decode(self, out: torch.Tensor, cells: bool = False) -> list[tuple[torch.Tensor, ...]]:
        """Raw maps (B, classes + 4, h, w) -> (boxes, scores, labels) per image; with `cells` also, per box, the
        flat index (into h * w) of the cell that made it: its score is sigmoid(out[i, label].flatten()[cell]), the
        one logit that stands for the box (what families/detect explain attributes)."""
        C, cfg = self.num_classes, self.cfg
        heat = out[:, :C].float().sigmoid()
        peaks = heat * (F.max_pool2d(heat, 3, 1, 1) == heat) if cfg.peaks else heat
        boxes = self.cell_boxes(out[:, C:])  # (B, h, w, 4)
        B, _, h, w = heat.shape
        k = min(cfg.max_det * (2 if cfg.peaks else 4), C * h * w)
        scores, idx = peaks.flatten(1).topk(k, 1)
        cls, cell = idx // (h * w), idx % (h * w)
        bx = boxes.flatten(1, 2).gather(1, cell[..., None].expand(-1, -1, 4))
        H, W = h * cfg.stride, w * cfg.stride
        bx = torch.stack(
            [bx[..., 0].clamp(0, W), bx[..., 1].clamp(0, H), bx[..., 2].clamp(0, W), bx[..., 3].clamp(0, H)], -1
        )
        results = []
        for i in range(B):
            keep = scores[i] >= cfg.score_thresh
            more = (cell[i][keep],) if cells else ()
            results.append(nms(bx[i][keep], scores[i][keep], cls[i][keep], cfg.nms_iou, cfg.max_det, *more))
        return results

    def detect(self, x: torch.Tensor):
        return self.decode(self(x))


# ------------------------------------------------------------------------------------------------ torchvision

TVArch = Literal[  # torchvision.models.detection builders
    "fasterrcnn_mobilenet_v3_large_320_fpn",
    "fasterrcnn_mobilenet_v3_large_fpn",
    "fasterrcnn_resnet50_fpn",
    "retinanet_resnet50_fpn",
    "fcos_resnet50_fpn",
    "ssdlite320_mobilenet_v3_large",
]


@dataclass
class TVDetectorConfig:
    name: str = "tv-detector"
    arch: TVArch = "fasterrcnn_mobilenet_v3_large_320_fpn"
    weights_path: str = ""  # a local torchvision state dict (.pth read weights-only, or .safetensors)
    min_size: int = 0  # the image side torchvision resizes to (0: the image's own size)
    score_thresh: float = 0.05
    nms_iou: float = 0.5
    max_det: int = 50

    def build(self, spec: DataSpec) -> nn.Module:
        return TVDetector(spec, self)


class TVDetector(nn.Module):
    """A torchvision detector on normalized images (its own normalization is turned off), classes + background."""

    def __init__(self, spec: DataSpec, cfg: TVDetectorConfig):
        super().__init__()
        import torchvision.models.detection as tvd

        self.cfg, self.num_classes = cfg, spec.num_classes
        side = cfg.min_size or max(spec.image_size or (128, 128))
        kw = dict(weights=None, weights_backbone=None, num_classes=spec.num_classes + 1)
        kw |= dict(image_mean=[0.0] * 3, image_std=[1.0] * 3)
        kw |= dict(min_size=side, max_size=side) if not cfg.arch.startswith("ssd") else dict(size=(side, side))
        if cfg.arch.startswith("fasterrcnn"):
            kw |= dict(
                box_score_thresh=cfg.score_thresh, box_nms_thresh=cfg.nms_iou, box_detections_per_img=cfg.max_det
            )
        elif cfg.arch.startswith("ssd"):
            kw |= dict(score_thresh=cfg.score_thresh, nms_thresh=cfg.nms_iou, detections_per_img=cfg.max_det)
        else:
            kw |= dict(score_thresh=cfg.score_thresh, nms_thresh=cfg.nms_iou, detections_per_img=cfg.max_det)
        self.net = getattr(tvd, cfg.arch)(**kw)
        if cfg.weights_path:
            self.load_local(cfg.weights_path)

    def load_local(self, path: str) -> None:
        """Tensors of a local torchvision state dict that match by name and shape (a new class head stays fresh)."""
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"model.weights_path={path!r}: no such file")
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(p))
        else:
            state = torch.load(str(p), map_location="cpu", weights_only=True)
        own = self.net.state_dict()
        fit = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
        if not fit:
            raise ConfigError(f"model.weights_path={path!r}: no tensor matches {self.cfg.arch} by name and shape")
        self.net.load_state_dict(fit, strict=False)

    def _targets(self, boxes, labels):
        out = []
        for b, y in zip(boxes, labels):
            keep = y >= 0
            out.append({"boxes": b[keep].float(), "labels": y[keep].long() + 1})  # 0 is torchvision's background
        return out

    def _heads_training(self, on: bool) -> list[tuple[nn.Module, bool]]:
        """Switch the detection heads' train flag (losses vs detections) leaving normalization layers as they are."""
        was = []
        for m in self.net.modules():
            if not isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.Dropout)):
                was.append((m, m.training))
                m.training = on
        return was

    def loss(self, x, boxes, labels, per_image: bool = False):
        was = self._heads_training(True)
        try:
            if per_image:
                return torch.stack(
                    [self._loss_sum(x[i : i + 1], boxes[i : i + 1], labels[i : i + 1])[0] for i in range(len(x))]
                ), {}
            return self._loss_sum(x, boxes, labels)
        finally:
            for m, t in was:
                m.training = t

    def _loss_sum(self, x, boxes, labels):
        parts = self.net(list(x), self._targets(boxes, labels))
        return sum(parts.values()), {k: v.detach() for k, v in parts.items()}

    @torch.no_grad()
    def detect(self, x):
        was = self._heads_training(False)
        try:
            out = self.net(list(x))
        finally:
            for m, t in was:
                m.training = t
        return [(o["boxes"], o["scores"], o["labels"] - 1) for o in out]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The backbone's feature maps, finest level (what `export` writes for a torchvision detector)."""
        f = self.net.backbone(x)
        return next(iter(f.values())) if isinstance(f, dict) else f
