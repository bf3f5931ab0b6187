"""Image-to-image data: the images a translation net learns to make, and what it is given to make them from.

A split is a TensorSplit of (images uint8 (N, C, H, W), labels) like every image data set, so the data checks,
the batch grid and the registries' tests read it as they read the others; `spec.extra["mode"]` says what the
img2img family makes of it (the degradations run on the batch, on the device, in families/img2img/degrade.py):

    sr           x is the sharp image; the family shrinks it by `scale` (blur and noise optional) as the input
    inpaint      x is the image; the family cuts holes (boxes, strokes) as the input, the mask given to the net
    label2image  x is the scene, y its per-pixel labels: the input is the one-hot label map (scenes only)
    paired       x is A and B stacked on the channels (C = Ca + Cb, `spec.extra["channels_a"]` = Ca): A -> B
    unpaired     the same layout, but in train A and B come from different images (the scenes: disjoint halves
                 of the scene numbers; two folders: unrelated files), so only a CycleGAN can learn from it

Sources: `scenes` (the renderer of data/scenes.py; `look_a` / `look_b` for paired and unpaired: day, night,
fog), `fashion-mnist`, `folder` (any images under data.path, resized and centre-cropped to data.size) and
`pairs` (data.path/A/x.png with data.path/B/x.png; for unpaired, any two folders A/ and B/).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

import torch
import torch.nn.functional as F

from deeprecipe.config import ranged
from deeprecipe.data.core import Data, DataError, DataSpec, TensorSplit
from deeprecipe.data.image_ops import EXTS, read
from deeprecipe.data.scenes import IGNORE, SCENE_CLASSES, SCENE_PALETTE, SPLIT_BASE, render_scenes

Mode = Literal["sr", "inpaint", "label2image", "paired", "unpaired"]
MODES = get_args(Mode)


@dataclass
class Img2ImgData:
    """What an img2img run learns from; see the module docstring."""

    name: str = "img2img"
    mode: Mode = "sr"
    source: Literal["scenes", "fashion-mnist", "folder", "pairs"] = "scenes"  # folder: data.path; pairs: its A/, B/
    path: str = ""  # folder of images (folder), or of A/ and B/ (pairs); fashion-mnist: its IDX files (optional)
    size: tuple[int, int] = ranged((128, 128), "> 0")  # (H, W) of scenes and folder images (fashion-mnist: 28 x 28)
    train_size: int = ranged(2000, ">= 0")  # scenes per split; fashion-mnist, folders: at most this many (0: all)
    val_size: int = ranged(100, ">= 0")
    test_size: int = ranged(200, ">= 0")
    val_fraction: float = ranged(0.1, "[0, 1)")  # folders, pairs: of the files, for validation (as much for test)
    seed: int = 0  # scenes: shifts the scene numbers (as data.seed of the scenes data set)
    look_a: Literal["day", "night", "fog"] = "day"  # scenes, paired / unpaired: the look of A and of B
    look_b: Literal["day", "night", "fog"] = "night"
    scale: Literal[2, 3, 4, 8] = 4  # sr: the shrink factor
    blur: float = ranged(0.0, ">= 0")  # sr: blur before shrinking, Gaussian sigma in [0, blur] px per image (high-res)
    noise: float = ranged(0.0, ">= 0")  # sr: noise on the low-res image, std (of [0, 1] pixels) in [0, noise] per image
    holes: Literal["box", "strokes", "both"] = "box"  # inpaint: each image draws one
    hole_fraction: float = ranged(0.25, "[0.01, 0.75]")  # inpaint: area of a box hole (strokes cover about as much)
    crop: int = 0  # train on random square crops of this many pixels a side (0, or a side at least the image's:
    #                whole images); evaluation, predict and serve see whole images. sr: a multiple of the scale

    def build(self) -> Data:
        if self.mode == "label2image" and self.source != "scenes":
            raise DataError("data.mode=label2image needs data.source=scenes (the renderer's per-pixel labels)")
        two = self.mode in ("paired", "unpaired")
        if self.source == "pairs" and not two:
            raise DataError("data.source=pairs holds A/ and B/ folders: use data.mode=paired or unpaired")
        if two and self.source not in ("scenes", "pairs"):
            raise DataError(f"data.mode={self.mode} needs data.source=scenes or pairs (A/ and B/ folders)")
        if self.source == "scenes":
            splits, classes, extra = self._scenes(two)
        elif self.source == "fashion-mnist":
            splits, classes, extra = self._fashion()
        elif self.source == "folder":
            splits, classes, extra = self._folder(), ["image"], {}
        else:
            splits, classes, extra = self._pairs(), ["pair"], {"channels_a": 3, "paired_eval": self.mode == "paired"}
        return self._finish(splits, classes, extra)

    # ---------------------------------------------------------------------------------- sources
    def _scenes(self, two: bool):
        H, W = self.size
        if min(H, W) < 32:
            raise DataError(f"data.size={list(self.size)}: scenes need at least 32 pixels per side")
        out = {}
        for split, n in (("train", self.train_size), ("val", self.val_size), ("test", self.test_size)):
            if not n:
                out[split] = None
                continue
            first = SPLIT_BASE[split] + self.seed * 30_000_000
            numbers = torch.arange(first, first + n)
            if not two:
                out[split] = _render(numbers, (H, W), "any")
                continue
            a_numbers = numbers
            b_numbers = numbers
            if self.mode == "unpaired" and split == "train":  # disjoint halves: no scene is seen in both looks
                a_numbers, b_numbers = numbers[: (n + 1) // 2], numbers[(n + 1) // 2 :]
                b_numbers = torch.cat([b_numbers, b_numbers[: len(a_numbers) - len(b_numbers)]])
            a = _render(a_numbers, (H, W), self.look_a)[0]
            b = _render(b_numbers, (H, W), self.look_b)[0]
            out[split] = (torch.cat([a, b], 1), torch.zeros(len(a), dtype=torch.long))
        if two:
            return out, [f"{self.look_a}->{self.look_b}"], {"channels_a": 3, "paired_eval": True}
        extra = {"palette": [list(map(int, c)) for c in SCENE_PALETTE], "ignore_index": IGNORE}
        return out, list(SCENE_CLASSES), extra

    def _fashion(self):
        from deeprecipe.data.images import FASHION_DIR, FashionMNISTData

        d = FashionMNISTData(path=self.path or FASHION_DIR, val_fraction=0.0).build()
        x, y = d.train.tensors
        tx, ty = d.test.tensors
        n_val, n_test = self.val_size or 0, self.test_size or len(tx)
        train = (x[: self.train_size or None], y[: self.train_size or None])
        val = (tx[:n_val], ty[:n_val]) if n_val else None
        test = (tx[n_val : n_val + n_test], ty[n_val : n_val + n_test])
        return {"train": train, "val": val, "test": test}, d.spec.class_names, {}

    def _folder(self):
        root = Path(self.path)
        if not root.is_dir():
            raise DataError(f"data.path={self.path!r}: not a folder of images")
        files = sorted(str(p) for p in root.rglob("*") if p.suffix.lower() in EXTS)
        if not files:
            raise DataError(f"{root}: no images found (png, jpg, ...)")
        images = _load(files, 3, tuple(self.size), self._least())
        splits = self._carve(images)
        return {k: (v, torch.zeros(len(v), dtype=torch.long)) if v is not None else None for k, v in splits.items()}

    def _pairs(self):
        root = Path(self.path)
        a_dir, b_dir = root / "A", root / "B"
        if not a_dir.is_dir() or not b_dir.is_dir():
            raise DataError(f"data.path={self.path!r}: expected the folders A/ and B/ there (A/x.png -> B/x.png)")
        a_files = {p.stem: p for p in sorted(a_dir.iterdir()) if p.suffix.lower() in EXTS}
        b_files = {p.stem: p for p in sorted(b_dir.iterdir()) if p.suffix.lower() in EXTS}
        if not a_files or not b_files:
            raise DataError(f"{a_dir if not a_files else b_dir}: no images found (png, jpg, ...)")
        size = tuple(self.size)
        if self.mode == "paired":
            for stem, p in a_files.items():
                if stem not in b_files:
                    raise DataError(f"{p} has no partner {b_dir / stem}.png: paired folders need the same file names")
            for stem, p in b_files.items():
                if stem not in a_files:
                    raise DataError(f"{p} has no partner {a_dir / stem}.png: paired folders need the same file names")
            stems = sorted(a_files)
            for stem in stems:  # a pair must show the same picture: the same size
                ha, wa = _size_of(a_files[stem])
                hb, wb = _size_of(b_files[stem])
                if (ha, wa) != (hb, wb):
                    raise DataError(
                        f"{b_files[stem]} is {wb}x{hb} but its partner {a_files[stem]} is {wa}x{ha}: "
                        "paired images must have the same size"
                    )
            a = _load([str(a_files[s]) for s in stems], 3, size, 1)
            b = _load([str(b_files[s]) for s in stems], 3, size, 1)
        else:  # two unrelated folders: as many of each, the shorter one cycled
            a = _load([str(p) for p in a_files.values()], 3, size, 1)
            b = _load([str(p) for p in b_files.values()], 3, size, 1)
            n = max(len(a), len(b))
            a, b = a[torch.arange(n) % len(a)], b[torch.arange(n) % len(b)]
        splits = self._carve(torch.cat([a, b], 1))
        return {k: (v, torch.zeros(len(v), dtype=torch.long)) if v is not None else None for k, v in splits.items()}

    # ---------------------------------------------------------------------------------- helpers
    def _least(self) -> int:
        """The smallest side a source image may have: sr needs 4 low-res pixels a side."""
        return 4 * self.scale if self.mode == "sr" else 1

    def _carve(self, x: torch.Tensor) -> dict:
        """Fixed val and test carve-outs (val_fraction each) of a folder's images, by a seeded permutation."""
        n = len(x)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))
        k = max(1, int(n * self.val_fraction)) if n >= 3 and self.val_fraction > 0 else 0
        val, test, train = perm[:k], perm[k : 2 * k], perm[2 * k :].sort().values
        train = train[: self.train_size or None]
        return {"train": x[train], "val": x[val] if k else None, "test": x[test] if k else None}

    def _finish(self, splits: dict, classes: list[str], extra: dict) -> Data:
        train = splits["train"]
        if train is None or len(train[0]) == 0:
            raise DataError("data set 'img2img': no training images")
        x = train[0]
        H, W = x.shape[-2:]
        if self.mode == "sr" and (H % self.scale or W % self.scale or min(H, W) < 4 * self.scale):
            raise DataError(
                f"data.size={H}x{W} with data.scale={self.scale}: the sides must be multiples of the scale and "
                f"at least {4 * self.scale} pixels"
            )
        least = 4 * (self.scale if self.mode == "sr" else 1)
        if self.crop and self.crop < least:
            raise DataError(f"data.crop={self.crop}: use 0 (whole images) or a side of at least {least} pixels")
        if self.crop and self.mode == "sr" and self.crop % self.scale:
            raise DataError(
                f"data.crop={self.crop}: with data.scale={self.scale} a crop must be a multiple of the scale"
            )
        xf = x[:512].float() / 255
        extra = {
            **extra,
            "mode": self.mode,
            "source": self.source,
            "scale": self.scale,
            "blur": self.blur,
            "noise": self.noise,
            "holes": self.holes,
            "hole_fraction": self.hole_fraction,
            "crop": self.crop,
        }
        spec = DataSpec(
            num_classes=len(classes),
            class_names=list(classes),
            in_channels=x.shape[1],
            image_size=(H, W),
            mean=tuple(xf.mean((0, 2, 3)).tolist()),
            std=tuple(xf.std((0, 2, 3)).clamp_min(1e-3).tolist()),
            extra=extra,
        )
        parts = [
            TensorSplit(*s) if s is not None and len(s[0]) else None for s in (train, splits["val"], splits["test"])
        ]
        return Data(spec, *parts)


def _render(numbers: torch.Tensor, size: tuple[int, int], look: str, chunk: int = 64):
    parts = [render_scenes(numbers[i : i + chunk], size, look=look) for i in range(0, len(numbers), chunk)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def _size_of(path: Path) -> tuple[int, int]:
    """(H, W) of an image file from its header."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.height, im.width
    except Exception as e:
        raise DataError(f"{path}: cannot read this image ({type(e).__name__}: {e})") from None


def _load(files: list[str], channels: int, size: tuple[int, int], least: int) -> torch.Tensor:
    """Decode, check, resize the short side and centre-crop to `size`: uint8 (N, C, H, W)."""

    def one(f):
        img = read(f, channels, 0)
        h, w = img.shape[-2:]
        if min(h, w) < least:
            raise DataError(f"{f} is {w}x{h}: smaller than the scale factor allows (at least {least} pixels a side)")
        return fit_crop(img, size)

    with ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1))) as pool:
        return torch.stack(list(pool.map(one, files)))


def fit_crop(img: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize (antialiased bicubic) so the image covers `size`, then take its centre: uint8 (C, H, W)."""
    H, W = size
    h, w = img.shape[-2:]
    if (h, w) == (H, W):
        return img
    k = max(H / h, W / w)
    nh, nw = max(H, round(h * k)), max(W, round(w * k))
    x = F.interpolate(img[None].float(), size=(nh, nw), mode="bicubic", antialias=True, align_corners=False)[0]
    top, left = (nh - H) // 2, (nw - W) // 2
    return x[:, top : top + H, left : left + W].round().clamp(0, 255).to(torch.uint8)
