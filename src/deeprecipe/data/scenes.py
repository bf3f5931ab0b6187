"""Driving-scene segmentation data: generated street scenes, Cityscapes, and image + mask folders.

A split is a TensorSplit of (images uint8 (N, 3, H, W), masks uint8 (N, H, W)); mask value 255 means
"ignore" (not counted by the loss or the metrics). Folders on disk (Cityscapes, mask folders) whose decoded pairs
exceed `data.in_memory_mb` are StreamSplits instead: DataLoader workers decode each batch's pairs (MaskPairs),
so memory does not grow with the number of images. Augmentation (flip, scale, crop) runs per batch on the
device in tasks/segment.py, from the options each config puts in `spec.extra`.

`scenes` draws a street seen from a car: sky, a skyline of buildings and trees, a road in perspective with
lane markings, sidewalks, cars, pedestrians and traffic signs, under random light, fog, rain and sensor
noise. Image i of a split is a pure function of its number (train 0.., val 10M.., test 20M.., shifted by
`seed`), so the splits never share an image and any number of images can be made. Randomness is a
counter-based integer hash of (image number, key, ...), so a whole batch of scenes is drawn with tensor ops
and no Python loop over images: thousands of 96 px scenes take a few seconds on one CPU core.
"""

from __future__ import annotations

import functools
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from deeprecipe.config import ranged
from deeprecipe.data.core import Data, DataError, DataSpec, StreamSplit, TensorSplit
from deeprecipe.data.image_ops import EXTS, read

IGNORE = 255
SCENE_CLASSES = ["road", "sidewalk", "building", "vegetation", "sky", "person", "car", "traffic sign"]
# Cityscapes colours for the classes above, so overlays look like the real thing
SCENE_PALETTE = [
    (128, 64, 128),
    (244, 35, 232),
    (70, 70, 70),
    (107, 142, 35),
    (70, 130, 180),
    (220, 20, 60),
    (0, 0, 142),
    (220, 220, 0),
]
CITYSCAPES_CLASSES = [
    "road",
    "sidewalk",
    "building",
    "wall",
    "fence",
    "pole",
    "traffic light",
    "traffic sign",
    "vegetation",
    "terrain",
    "sky",
    "person",
    "rider",
    "car",
    "truck",
    "bus",
    "train",
    "motorcycle",
    "bicycle",
]
CITYSCAPES_PALETTE = [
    (128, 64, 128),
    (244, 35, 232),
    (70, 70, 70),
    (102, 102, 156),
    (190, 153, 153),
    (153, 153, 153),
    (250, 170, 30),
    (220, 220, 0),
    (107, 142, 35),
    (152, 251, 152),
    (70, 130, 180),
    (220, 20, 60),
    (255, 0, 0),
    (0, 0, 142),
    (0, 0, 70),
    (0, 60, 100),
    (0, 80, 100),
    (0, 0, 230),
    (119, 11, 32),
]
# gtFine labelIds -> the 19 train ids (everything else, e.g. ego vehicle or license plate, is ignored)
CITYSCAPES_TRAIN_ID = {
    7: 0,
    8: 1,
    11: 2,
    12: 3,
    13: 4,
    17: 5,
    19: 6,
    20: 7,
    21: 8,
    22: 9,
    23: 10,
    24: 11,
    25: 12,
    26: 13,
    27: 14,
    28: 15,
    31: 16,
    32: 17,
    33: 18,
}
SPLIT_BASE = {"train": 0, "val": 10_000_000, "test": 20_000_000}


@dataclass
class SegData:
    """Options shared by the segmentation data sets (augmentation is applied on the device per batch)."""

    name: str = ""
    flip: bool = True  # random horizontal flip of image and mask together
    scale: tuple[float, float] = ranged((0.75, 1.25), "> 0")  # random zoom range; (1, 1) turns it off
    crop: int = 0  # train on random square crops of this size (0: the full image, randomly shifted)

    def build(self) -> Data:
        raise NotImplementedError

    def finish(self, classes: list[str], palette, train, val=None, test=None) -> Data:
        """Splits as (images, masks) tensors, or StreamSplits (statistics from an even sample of 64 images)."""
        if isinstance(train, StreamSplit):
            every = max(1, len(train) // 64)
            x = torch.stack([train.dataset[i][0] for i in range(0, len(train), every)][:64])
        else:
            x = train[0]
        if len(x) == 0:
            raise DataError(f"data set '{self.name}': no training images")
        xf = x[:512].float() / 255
        spec = DataSpec(
            num_classes=len(classes),
            class_names=list(classes),
            in_channels=x.shape[1],
            image_size=(x.shape[2], x.shape[3]),
            mean=tuple(xf.mean((0, 2, 3)).tolist()),
            std=tuple(xf.std((0, 2, 3)).clamp_min(1e-3).tolist()),
            extra={
                "palette": [list(map(int, c)) for c in palette],
                "ignore_index": IGNORE,
                "flip": self.flip,
                "scale": list(self.scale),
                "crop": self.crop,
            },
        )
        wrap = lambda s: s if isinstance(s, StreamSplit) or s is None else TensorSplit(*s)  # noqa: E731
        return Data(spec, wrap(train), wrap(val), wrap(test))


# ------------------------------------------------------------------------------------ generated scenes


def hash_ints(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mixer (lowbias32) on int64 tensors: equal inputs, equal outputs, anywhere."""
    m = 0xFFFFFFFF
    x = x & m
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & m
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & m
    return x ^ (x >> 16)


def uniform(key: torch.Tensor, k: int, *idx: torch.Tensor) -> torch.Tensor:
    """Uniform [0, 1) from the hash of (image key, stream k, integer coordinates...), broadcast together."""
    h = hash_ints(key + k * 0x9E3779B9)
    for i in idx:
        h = hash_ints(h ^ (i.long() * 0x85EBCA6B))
    return h.float() / 2**32


def _field(key: torch.Tensor, k: int, cells: int, H: int, W: int) -> torch.Tensor:
    """Smooth noise in [0, 1): a random cells x cells grid per image, upsampled. (N, H, W)"""
    gy = torch.arange(cells, device=key.device).view(1, cells, 1)
    gx = torch.arange(cells, device=key.device).view(1, 1, cells)
    grid = uniform(key.view(-1, 1, 1), k, gy * 131 + gx)  # (N, cells, cells)
    return F.interpolate(grid[:, None], size=(H, W), mode="bicubic", align_corners=False)[:, 0].clamp(0, 1)


LOOKS = ("any", "day", "night", "fog")


ROAD, SIDEWALK, BUILDING, VEGETATION, SKY, PERSON, CAR, SIGN = range(8)  # label ids, as in SCENE_CLASSES


@dataclass
class _Canvas:
    """N scenes being painted, far to near: what the steps of render_scenes share. Each image's random numbers
    come from its key, so a step draws them with tensor ops over the whole batch."""

    key: torch.Tensor  # (N, 1, 1) the hash of each scene number
    y: torch.Tensor  # (1, H, 1) row centres in [0, 1]
    x: torch.Tensor  # (1, 1, W) column centres in [0, 1]
    label: torch.Tensor  # (N, H, W) uint8 class ids
    img: torch.Tensor  # (N, 3, H, W) float colours
    inst: torch.Tensor | None  # (N, H, W) int8 object ids, -1 elsewhere (None: not asked for)
    painted: torch.Tensor  # (N, 7) pixels each object covered when it was painted

    @property
    def asp(self) -> float:
        return self.x.shape[-1] / self.y.shape[-2]  # converts a width in W units into H units

    def r(self, k: int, lo: float = 0.0, hi: float = 1.0) -> torch.Tensor:
        """One number per image in [lo, hi), (N, 1, 1)."""
        return lo + (hi - lo) * uniform(self.key, k)

    def rgb(self, k: int, lo: tuple, hi: tuple) -> torch.Tensor:
        """One colour per image, (N, 3, 1, 1)."""
        return torch.stack([self.r(k * 8 + 1000 + c, lo[c], hi[c]) for c in range(3)], 1)

    def paint(self, mask: torch.Tensor, cls: int, colour: torch.Tensor, obj: int | torch.Tensor = -1) -> None:
        """Pixels `mask` (N, H, W) become class `cls` in `colour` (broadcast to (N, 3, H, W)) and object `obj`."""
        N = len(self.label)
        self.label.masked_fill_(mask, cls)
        self.img.copy_(torch.where(mask[:, None], colour, self.img))
        if self.inst is not None:
            obj = torch.as_tensor(obj, device=mask.device).expand(N, 1, 1)
            self.inst.copy_(torch.where(mask, obj.to(torch.int8), self.inst))
            if bool((obj >= 0).all()):
                self.painted.scatter_add_(1, obj.view(N, 1).long(), mask.sum((1, 2)).float().view(N, 1))


@dataclass
class _Road:
    """The perspective of a scene, per image (N, 1, 1) or per pixel (N, H, W)."""

    h: torch.Tensor  # the horizon's row
    vx: torch.Tensor  # the vanishing point's column
    bend: torch.Tensor  # how far the road bends towards the horizon
    d: torch.Tensor  # depth: 0 at the horizon, 1 at the bottom row (N, H, 1)
    c: torch.Tensor  # the road's centre line per row
    rw: torch.Tensor  # the road's half width at the bottom row
    sw: torch.Tensor  # the sidewalk's width at the bottom row
    dx: torch.Tensor  # each pixel's distance from the centre line
    ground: torch.Tensor  # below the horizon


def render_scenes(
    numbers: torch.Tensor, size: tuple[int, int], look: str = "any", instances: bool = False
) -> tuple[torch.Tensor, ...]:
    """Scene numbers (N,) int64 -> images uint8 (N, 3, H, W) and labels uint8 (N, H, W); with `instances` also
    an instance map int8 (N, H, W): the object each pixel shows (traffic-sign plates 0 and 1, cars and
    pedestrians 2..6), -1 elsewhere, so the visible part of every object is known after occlusion, and the
    pixels each object covered when it was painted, before nearer ones hid some (N, 7).

    `look` sets the weather and light of every image (the scene itself, its objects and labels, stay the same):
    any (random light, fog in about 30%), day (clear: no fog, no rain), fog (dense fog), night (dark, bluish,
    some windows lit, a haze of street light over the road)."""
    if look not in LOOKS:
        raise DataError(f"look={look!r}: use one of {', '.join(LOOKS)}")
    N, (H, W), dev = len(numbers), size, numbers.device
    key = hash_ints(numbers.long()).view(N, 1, 1)
    cv = _Canvas(
        key=key,
        y=((torch.arange(H, device=dev) + 0.5) / H).view(1, H, 1),
        x=((torch.arange(W, device=dev) + 0.5) / W).view(1, 1, W),
        label=torch.full((N, H, W), SKY, dtype=torch.uint8, device=dev),
        img=torch.zeros(N, 3, H, W, device=dev),
        inst=torch.full((N, H, W), -1, dtype=torch.int8, device=dev) if instances else None,
        painted=torch.zeros(N, 7, device=dev),
    )
    tex = _field(key.view(N), 1, 8, H, W)[:, None]  # low-frequency texture shared by the surfaces
    grain, noise, streaks = _banks(H, W, str(dev))
    pick = (key.view(N) % len(grain)).long()
    grain, noise, streaks = grain[pick][:, None], noise[hash_ints(key.view(N) + 1) % len(noise)], streaks[pick]

    _sky(cv)
    g = _perspective(cv)
    windows, gcol = _skyline(cv, g, tex)
    _road_and_sidewalks(cv, g, tex, grain)
    _trees_and_signs(cv, g, gcol)
    _cars_and_pedestrians(cv, g)
    _light_and_weather(cv, g, look, windows, streaks, noise)
    out = (cv.img.clamp(0, 1) * 255).round().to(torch.uint8), cv.label
    return (*out, cv.inst, cv.painted) if cv.inst is not None else out


def _sky(cv: _Canvas) -> None:
    """A vertical gradient with clouds."""
    top, bottom = cv.rgb(1, (0.25, 0.45, 0.7), (0.5, 0.65, 0.95)), cv.rgb(2, (0.7, 0.75, 0.8), (0.9, 0.92, 0.97))
    N, _, H, W = cv.img.shape
    clouds = (_field(cv.key.view(N), 3, 5, H, W)[:, None] - 0.55).clamp_min(0) * 2
    cv.img.copy_(top + (bottom - top) * cv.y[:, None] + clouds)


def _perspective(cv: _Canvas) -> _Road:
    """Horizon h, vanishing point vx, depth d = 0 at the horizon, 1 at the bottom row."""
    r, y = cv.r, cv.y
    h, vx, bend = r(3, 0.32, 0.5), r(4, 0.38, 0.62), r(5, -0.12, 0.12)
    d = ((y - h) / (1 - h)).clamp_min(0)
    c = vx + bend * (1 - d) ** 2  # road centre line (bends towards the horizon)
    rw, sw = r(6, 0.28, 0.5), r(7, 0.12, 0.25)  # road half width, sidewalk width at the bottom row
    return _Road(h, vx, bend, d, c, rw, sw, dx=(cv.x - c).abs(), ground=y > h)


def _skyline(cv: _Canvas, g: _Road, tex: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """10 blocks across, each a building (with windows) or trees, taller far from the vanishing point. Returns
    (the windows (N, H, W), the trees' colour) that later steps reuse."""
    r, x, y, key, dev = cv.r, cv.x, cv.y, cv.key, cv.key.device
    block = (x * 10 + r(8)).floor().long()
    height = 0.05 + uniform(key, 9, block) * (0.1 + 0.9 * (x - g.vx).abs())
    is_tree = uniform(key, 10, block) < 0.3
    roof = g.h - height - is_tree * 0.03 * torch.sin(x * 90 + r(11) * 6)
    wall = (y > roof) & ~g.ground | g.ground & (g.dx >= (g.rw + g.sw) * g.d)
    bcol = 0.25 + 0.5 * uniform(key.unsqueeze(1), 12, block.unsqueeze(1), torch.arange(3, device=dev).view(1, 3, 1, 1))
    windows = ((x * 60 + r(13) * 3).frac() < 0.45) & ((y * 40 + r(14) * 3).frac() < 0.5) & (y > roof + 0.02)
    bcol = bcol * (1 - 0.45 * windows[:, None]) * (0.85 + 0.3 * tex)
    gcol = torch.tensor([0.2, 0.42, 0.12], device=dev).view(1, 3, 1, 1) * (0.6 + 0.8 * tex)
    cv.paint(wall & ~is_tree, BUILDING, bcol)
    cv.paint(wall & is_tree, VEGETATION, gcol)
    return windows, gcol


def _road_and_sidewalks(cv: _Canvas, g: _Road, tex: torch.Tensor, grain: torch.Tensor) -> None:
    """Road and sidewalks, then lane markings (labelled road, as in Cityscapes)."""
    r, dev, d, dx, rw, ground = cv.r, cv.key.device, g.d, g.dx, g.rw, g.ground
    grey = r(15, 0.25, 0.5).unsqueeze(1)
    cv.paint(ground & (dx < rw * d), ROAD, grey * (0.85 + 0.3 * tex) + 0.05 * grain)
    scol = cv.rgb(3, (0.55, 0.5, 0.5), (0.8, 0.75, 0.75)) * (0.9 + 0.2 * (((d * 30).frac() < 0.9).float()[:, None]))
    cv.paint(ground & (dx >= rw * d) & (dx < (rw + g.sw) * d), SIDEWALK, scol * (0.85 + 0.3 * tex))
    lw = 0.004 + 0.012 * d
    dash = ((2.5 / (d + 0.08) + r(16) * 2).frac() < 0.5) & (r(17) < 0.8)
    edge = (dx < rw * d) & (dx > rw * d - lw) & (r(18) < 0.6)
    lane = ground & ((dx < lw) & dash | edge)
    lcol = torch.where(
        r(19).unsqueeze(1) < 0.7,
        torch.ones(1, 3, 1, 1, device=dev),
        torch.tensor([0.95, 0.8, 0.2], device=dev).view(1, 3, 1, 1),
    )
    cv.paint(lane, ROAD, lcol * 0.9)


def _trees_and_signs(cv: _Canvas, g: _Road, gcol: torch.Tensor) -> None:
    """Trees and traffic signs stand on the outer sidewalk edge; far ones first."""
    r, x, y, asp, dev = cv.r, cv.x, cv.y, cv.asp, cv.key.device
    h, vx, bend, rw, sw = g.h, g.vx, g.bend, g.rw, g.sw
    for k in range(2):
        dt, side_ = r(20 + k, 0.15, 0.9), torch.where(r(22 + k) < 0.5, -1.0, 1.0)
        foot = h + dt * (1 - h)
        tx = g.c.new_zeros(len(g.c), 1, 1) + vx + bend * (1 - dt) ** 2 + side_ * (rw + sw * 0.8) * dt
        crown = 0.18 * dt * (1 - h)
        there = r(24 + k) < 0.6
        trunk = ((x - tx).abs() < 0.01 * dt / asp + 0.004) & (y < foot) & (y > foot - 2.2 * crown)
        leaves = ((x - tx) * asp) ** 2 + (y - foot + 2.6 * crown) ** 2 < crown**2
        cv.paint((trunk | leaves) & there, VEGETATION, gcol * 0.9)
    for k in range(2):
        ds, side_ = r(26 + k, 0.3, 0.95), torch.where(r(28 + k) < 0.5, -1.0, 1.0)
        foot = h + ds * (1 - h)
        sx = vx + bend * (1 - ds) ** 2 + side_ * (rw + sw * 0.6) * ds
        plate = 0.11 * ds * (1 - h) + 0.015
        py = foot - 0.45 * ds * (1 - h) - plate
        pole = ((x - sx).abs() < 0.006 * ds + 0.004) & (y < foot) & (y > py)
        shape = r(30 + k)
        px, pyy = (x - sx) * asp, y - py
        disk = px**2 + pyy**2 < plate**2
        tri = (pyy < plate * 0.8) & (pyy > -plate) & (px.abs() < (pyy + plate) * 0.6)
        square = (px.abs() < plate * 0.8) & (pyy.abs() < plate * 0.8)
        plate_mask = torch.where(shape < 0.4, disk, torch.where(shape < 0.7, tri, square))
        pcol = torch.where(
            shape.unsqueeze(1) < 0.4,
            torch.tensor([0.85, 0.1, 0.1], device=dev).view(1, 3, 1, 1),
            torch.where(
                shape.unsqueeze(1) < 0.7,
                torch.tensor([0.95, 0.85, 0.1], device=dev).view(1, 3, 1, 1),
                torch.tensor([0.1, 0.3, 0.8], device=dev).view(1, 3, 1, 1),
            ),
        )
        there = r(32 + k) < 0.7
        cv.paint(pole & there, SIGN, pcol * 0 + 0.55)
        cv.paint(plate_mask & there, SIGN, pcol, k)


def _cars_and_pedestrians(cv: _Canvas, g: _Road) -> None:
    """Cars (on the road) and pedestrians (on the sidewalks), painted far to near."""
    x, y, asp, key, dev = cv.x, cv.y, cv.asp, cv.key, cv.key.device
    h, vx, bend, rw, sw = g.h, g.vx, g.bend, g.rw, g.sw
    K = 5
    depth = torch.stack([uniform(key, 40 + k) for k in range(K)], 0) * 0.8 + 0.15  # (K, N, 1, 1)
    order = depth.argsort(0)
    for j in range(K):
        k = order[j]  # (N, 1, 1): which object slot is the j-th farthest in each image
        dk = depth.gather(0, k[None])[0]
        u = lambda s, k=k: uniform(key, 60 + 7 * s, k)  # noqa: E731  per-object random numbers
        is_car, there = u(0) < 0.6, u(1) < 0.75
        foot = h + dk * (1 - h)
        ck = vx + bend * (1 - dk) ** 2
        # a car: body + cabin + wheels
        cw = (0.55 + 0.3 * u(2)) * rw * dk  # half width, W units
        cx = ck + (u(3) * 1.2 - 0.6) * rw * dk
        ch = cw * asp  # H units
        body = ((x - cx).abs() < cw) & (y < foot - 0.12 * ch) & (y > foot - 0.75 * ch)
        cabin = ((x - cx).abs() < cw * 0.7) & (y <= foot - 0.7 * ch) & (y > foot - 1.15 * ch)
        wheels = (((x - cx).abs() - cw * 0.65).abs() < cw * 0.2) & (y <= foot) & (y >= foot - 0.2 * ch)
        ccol = torch.stack([u(4 + i) for i in range(3)], 1) * 0.8 + 0.1
        glass = cabin & ((x - cx).abs() < cw * 0.6) & (y > foot - 1.05 * ch)
        car_col = torch.where(glass[:, None], torch.full_like(ccol, 0.15), ccol)
        car_col = torch.where(wheels[:, None], torch.full_like(ccol, 0.05), car_col)
        cv.paint((body | cabin | wheels) & is_car & there, CAR, car_col, 2 + k)
        # a pedestrian: legs, torso, head
        px = ck + torch.where(u(2) < 0.5, -1.0, 1.0) * (rw + sw * (0.3 + 0.4 * u(3))) * dk
        ph = 0.6 * dk * (1 - h) + 0.04
        pw = ph * 0.18 / asp
        legs = (((x - px).abs() - pw * 0.5).abs() < pw * 0.4) & (y <= foot) & (y > foot - 0.45 * ph)
        torso = ((x - px).abs() < pw) & (y <= foot - 0.45 * ph) & (y > foot - 0.85 * ph)
        head = ((x - px) * asp) ** 2 + (y - foot + 0.92 * ph) ** 2 < (0.1 * ph) ** 2
        pcol = torch.where(legs[:, None], ccol * 0.4, ccol)
        pcol = torch.where(head[:, None], torch.tensor([0.85, 0.65, 0.5], device=dev).view(1, 3, 1, 1), pcol)
        cv.paint((legs | torso | head) & ~is_car & there, PERSON, pcol, 2 + k)


def _light_and_weather(
    cv: _Canvas, g: _Road, look: str, windows: torch.Tensor, streaks: torch.Tensor, noise: torch.Tensor
) -> None:
    """Light, weather and the sensor: brightness and tint, fog towards the horizon, rain streaks, noise."""
    r, x, y, img, dev, h = cv.r, cv.x, cv.y, cv.img, cv.key.device, g.h
    if look == "night":  # dark and blue, the sky near black, windows and cars' lights glowing
        cell = uniform(cv.key, 56, (x * 60 + r(13) * 3).floor(), (y * 40 + r(14) * 3).floor())
        lit = windows & (cv.label == BUILDING) & (cell < 0.4)
        glow = torch.exp(-(((y - h - 0.1) / 0.25) ** 2))[:, None] * 0.12  # street light haze over the road
        img.mul_(torch.tensor([0.22, 0.25, 0.4], device=dev).view(1, 3, 1, 1)).add_(glow)
        img.copy_(torch.where((cv.label == SKY)[:, None], img * 0.35, img))
        img.copy_(torch.where(lit[:, None], torch.tensor([1.0, 0.85, 0.45], device=dev).view(1, 3, 1, 1), img))
    else:
        img.mul_(r(50, 0.5, 1.25).unsqueeze(1) * cv.rgb(4, (0.9, 0.9, 0.9), (1.1, 1.1, 1.1)))
    foggy = {"any": r(51) < 0.3, "fog": torch.ones_like(r(51), dtype=torch.bool)}.get(look, r(51) < 0)
    strength = r(52, 0.3, 0.7) if look != "fog" else r(52, 0.75, 0.95)
    fog = foggy * strength * (1 - ((y - h).abs() * (2.5 if look != "fog" else 1.2)).clamp(0, 1))
    img.lerp_(torch.full_like(img, 0.7), fog.unsqueeze(1).expand_as(img))
    rain = (r(54) < 0.25) & (look == "any")
    img.add_((0.25 * rain).unsqueeze(1) * streaks[:, None])
    img.add_(r(55, 0.0, 0.05).unsqueeze(1) * noise)


@functools.lru_cache(maxsize=4)
def _banks(H: int, W: int, device: str, n: int = 32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fixed banks of per-pixel randomness (grain, unit-variance noise, rain streaks) that scenes pick from:
    far cheaper than hashing every pixel of every image, and just as deterministic."""
    g = torch.Generator().manual_seed(1234)
    grain = torch.rand(n, H, W, generator=g)
    noise = torch.randn(n, 3, H, W, generator=g)
    y, x = torch.arange(H).view(H, 1), torch.arange(W).view(1, W)
    col, row = (x + y * 0.35).floor().long(), y // 5  # streaks slanted by 0.35 px per row, 5 rows long
    streaks = torch.stack([(uniform(torch.tensor(i), 53, col * 4099 + row) > 0.96).float() for i in range(n)])
    return grain.to(device), noise.to(device), streaks.to(device)


def render_splits(cfg, render) -> dict:
    """train / val / test of a scenes data config (size, seed, *_size): each split `render(scene numbers)` of its
    own disjoint range of numbers, or None when empty."""
    if min(cfg.size) < 32:
        raise DataError(f"data.size={list(cfg.size)}: scenes need at least 32 pixels per side")
    splits = {}
    for name, n in (("train", cfg.train_size), ("val", cfg.val_size), ("test", cfg.test_size)):
        if n >= 10_000_000:
            raise DataError(f"data.{name}_size={n}: at most 9,999,999 images per split")
        first = SPLIT_BASE[name] + cfg.seed * 30_000_000
        splits[name] = render(torch.arange(first, first + n)) if n else None
    return splits


@dataclass
class ScenesData(SegData):
    """Generated driving scenes with per-pixel labels; see the module docstring."""

    name: str = "scenes"
    size: tuple[int, int] = ranged((96, 96), "> 0")  # (H, W) of every image, 96 to 256 pixels makes sense
    train_size: int = ranged(4000, "> 0")  # number of images per split; each split is a disjoint range of scene numbers
    val_size: int = ranged(400, ">= 0")
    test_size: int = ranged(400, ">= 0")
    seed: int = 0  # shifts every split's range of scene numbers (a different but equally hard data set)
    chunk: int = 64  # images drawn per tensor batch (64 keeps the tensors in cache: fastest on CPU)
    look: Literal["any", "day", "night", "fog"] = "any"  # weather and light of every image (render_scenes)

    def build(self) -> Data:
        splits = render_splits(self, self.render)
        return self.finish(SCENE_CLASSES, SCENE_PALETTE, splits["train"], splits["val"], splits["test"])

    def render(self, numbers: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        step = self.chunk
        parts = [
            render_scenes(numbers[i : i + step], tuple(self.size), self.look) for i in range(0, len(numbers), step)
        ]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


# ------------------------------------------------------------------------------------------ files on disk


def read_mask(path: str | Path) -> torch.Tensor:
    """A label PNG -> uint8 (H, W) (gray), or (3, H, W) when the file is RGB (palette masks)."""
    m = read(path, 0, 0)
    return m[0] if m.shape[0] == 1 else m[:3]


def _resize_pair(img: torch.Tensor, mask: torch.Tensor, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Image with antialiased bilinear, mask with nearest: label ids are never blended."""
    if tuple(img.shape[-2:]) == tuple(size):
        return img, mask
    img = F.interpolate(img[None].float(), size=size, mode="bilinear", antialias=True, align_corners=False)[0]
    mask = F.interpolate(mask[None, None].float(), size=size, mode="nearest-exact")[0, 0]
    return img.round().clamp(0, 255).to(torch.uint8), mask.to(torch.uint8)


def load_pair(pair: tuple[str, str], size: tuple[int, int], to_ids) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode an (image, mask) pair of files, check them, map mask values to class ids, resize: uint8 tensors."""
    ip, mp = pair
    img, raw = read(ip, 3, 0), read_mask(mp)
    if tuple(img.shape[-2:]) != tuple(raw.shape[-2:]):
        raise DataError(
            f"mask {mp} is {raw.shape[-1]}x{raw.shape[-2]} but its image {ip} is "
            f"{img.shape[-1]}x{img.shape[-2]}: masks must have their image's size"
        )
    return _resize_pair(img, to_ids(raw, mp), size)


def load_pairs(pairs: list[tuple[str, str]], size: tuple[int, int], to_ids) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode every pair (load_pair) into uint8 tensors (N, 3, H, W) and (N, H, W)."""
    with ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1))) as pool:
        items = list(pool.map(lambda p: load_pair(p, size, to_ids), pairs))
    return torch.stack([i for i, _ in items]), torch.stack([m for _, m in items])


class MaskPairs(Dataset):
    """(image, mask) files decoded one pair at a time by DataLoader workers: item i -> (uint8 (3, H, W), class
    ids uint8 (H, W))."""

    def __init__(self, pairs: list[tuple[str, str]], size: tuple[int, int], to_ids):
        self.pairs, self.size, self.to_ids = pairs, size, to_ids

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int):
        return load_pair(self.pairs[i], self.size, self.to_ids)


def pair_splits(name: str, splits: list, size: tuple[int, int], to_ids, in_memory_mb: int) -> list:
    """Each split's pairs decoded into tensors when all of them fit in `in_memory_mb` decoded, else StreamSplits
    of MaskPairs (a note says so); an empty split is None."""
    n = sum(len(s) for s in splits)
    mb = n * 4 * size[0] * size[1] / 2**20
    if mb <= in_memory_mb:
        return [load_pairs(s, size, to_ids) if s else None for s in splits]
    warnings.warn(
        f"data: {n} {name} image pairs streamed from disk ({mb:.0f} MB decoded > data.in_memory_mb)", stacklevel=3
    )
    return [StreamSplit(MaskPairs(s, size, to_ids)) if s else None for s in splits]


@dataclass
class CityscapesData(SegData):
    """Cityscapes: `path`/leftImg8bit/{train,val}/CITY/*_leftImg8bit.png and gtFine/.../*_gtFine_labelIds.png.

    labelIds are mapped to the 19 train ids; everything else becomes 255 (ignored). The official val split
    is used as test, and `val_fraction` of train is held out for validation."""

    name: str = "cityscapes"
    path: str = ""
    size: tuple[int, int] = ranged((128, 256), "> 0")  # (H, W) images are resized to (the originals are 1024 x 2048)
    val_fraction: float = ranged(0.1, "[0, 1)")
    limit: int = ranged(0, ">= 0")  # use at most N training images (0: all)
    in_memory_mb: int = ranged(1024, ">= 0")  # decoded pairs up to this are held in
    # memory; more are streamed from disk (0: always stream)

    def build(self) -> Data:
        root = Path(self.path)
        if not (root / "leftImg8bit").is_dir() or not (root / "gtFine").is_dir():
            raise DataError(f"data.path={self.path!r}: expected the Cityscapes folders leftImg8bit/ and gtFine/ there")
        lut = torch.full((256,), IGNORE, dtype=torch.uint8)
        for k, v in CITYSCAPES_TRAIN_ID.items():
            lut[k] = v

        def to_ids(raw, mp):
            if raw.ndim != 2:
                raise DataError(f"{mp}: expected a one-channel labelIds PNG")
            return lut[raw.long()]

        def pairs(split):
            out = []
            for img in sorted((root / "leftImg8bit" / split).glob("*/*_leftImg8bit.png")):
                stem = img.name[: -len("_leftImg8bit.png")]
                mask = root / "gtFine" / split / img.parent.name / f"{stem}_gtFine_labelIds.png"
                if not mask.is_file():
                    raise DataError(f"image {img} has no mask {mask}")
                out.append((str(img), str(mask)))
            return out

        train, test = pairs("train"), pairs("val")
        if not train:
            raise DataError(f"{root}/leftImg8bit/train: no *_leftImg8bit.png files found")
        perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(0)).tolist()
        k = max(1, int(len(train) * self.val_fraction)) if len(train) > 1 and self.val_fraction > 0 else 0
        val = [train[i] for i in perm[:k]]
        train = [train[i] for i in sorted(perm[k:])][: self.limit or None]
        splits = pair_splits("cityscapes", [train, val, test], tuple(self.size), to_ids, self.in_memory_mb)
        return self.finish(CITYSCAPES_CLASSES, CITYSCAPES_PALETTE, *splits)


@dataclass
class MaskFolderData(SegData):
    """Images and masks with the same file stem: `path`/images + `path`/masks, or `path`/{train,val,test}/
    {images,masks}. Masks hold class ids (0..len(classes)-1, 255 ignored) or, with `palette`, RGB colours."""

    name: str = "maskfolder"
    path: str = ""
    classes: list[str] = field(default_factory=list)  # class names in id order (required)
    palette: list[list[int]] = field(default_factory=list)  # RGB colour per class: masks are colour images
    size: tuple[int, int] = ranged((128, 128), "> 0")  # (H, W) every pair is resized to
    val_fraction: float = ranged(0.1, "[0, 1)")  # of train, when there is no val folder
    in_memory_mb: int = ranged(1024, ">= 0")  # decoded pairs up to this are held in
    # memory; more are streamed from disk (0: always stream)

    def build(self) -> Data:
        root = Path(self.path)
        if not root.is_dir():
            raise DataError(f"data.path={self.path!r} is not a folder of images/ and masks/")
        if not self.classes:
            raise DataError("data.classes is empty: list the class names in mask-id order")
        if self.palette and len(self.palette) != len(self.classes):
            raise DataError(f"data.palette has {len(self.palette)} colours for {len(self.classes)} classes")
        n = len(self.classes)
        colours = torch.tensor(self.palette, dtype=torch.long) if self.palette else None

        def to_ids(raw, mp):
            if colours is not None:
                if raw.ndim != 3:
                    raise DataError(f"{mp}: data.palette is set, so masks must be RGB images")
                code = (raw.long() * torch.tensor([65536, 256, 1]).view(3, 1, 1)).sum(0)
                ids = torch.full(code.shape, IGNORE, dtype=torch.uint8)
                for i, c in enumerate((colours * torch.tensor([65536, 256, 1])).sum(1).tolist()):
                    ids[code == c] = i
                if (ids == IGNORE).any():
                    bad = raw[:, (ids == IGNORE)][:, 0].tolist()
                    raise DataError(f"{mp}: colour {bad} is not in data.palette")
                return ids
            if raw.ndim != 2:
                raise DataError(f"{mp}: masks must be one-channel images of class ids (or set data.palette)")
            bad = (raw >= n) & (raw != IGNORE)
            if bad.any():
                raise DataError(
                    f"{mp}: label id {int(raw[bad][0])} is outside the {n} classes of data.classes "
                    f"(0..{n - 1}, 255 = ignore)"
                )
            return raw

        def pairs(folder: Path):
            if not (folder / "images").is_dir():
                return []
            masks = {p.stem: p for p in (folder / "masks").glob("*") if p.suffix.lower() in EXTS}
            out = []
            for img in sorted(p for p in (folder / "images").glob("*") if p.suffix.lower() in EXTS):
                if img.stem not in masks:
                    raise DataError(f"image {img} has no mask {folder / 'masks' / img.stem}.png")
                out.append((str(img), str(masks[img.stem])))
            return out

        split_root = root if (root / "images").is_dir() else root / "train"
        train, val, test = pairs(split_root), pairs(root / "val"), pairs(root / "test")
        if not train:
            raise DataError(f"{root}: no images found (expected {root}/images and {root}/masks)")
        if not val and self.val_fraction > 0:
            perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(0)).tolist()
            k = max(1, int(len(train) * self.val_fraction)) if len(train) > 1 else 0
            val, train = [train[i] for i in perm[:k]], [train[i] for i in sorted(perm[k:])]
        palette = self.palette or [SCENE_PALETTE[i % 8] if i < 8 else _colour(i) for i in range(n)]
        splits = pair_splits("mask-folder", [train, val, test], tuple(self.size), to_ids, self.in_memory_mb)
        return self.finish(self.classes, palette, *splits)


def _colour(i: int) -> tuple[int, int, int]:
    h = int(hash_ints(torch.tensor(i + 7)))
    return (h & 255, (h >> 8) & 255, (h >> 16) & 255)
