"""Image classification data: digits, Fashion-MNIST, MNIST files, class-per-folder images, CSV lists.

Images are kept as uint8 (N, C, H, W) tensors; normalization and augmentation run per batch on the device
(see tasks/classify.py). A folder set that fits in `in_memory_mb` is decoded once into a tensor; a larger
one streams through a DataLoader with workers.
"""

from __future__ import annotations

import csv
import gzip
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from deeprecipe.config import ranged
from deeprecipe.data.core import Data, DataError, DataSpec, StreamSplit, TensorSplit
from deeprecipe.data.image_ops import EXTS, ink_extent, read, resize

FASHION_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]


@dataclass
class ImageData:
    """Options shared by the image data sets (each data set below sets its own defaults)."""

    name: str = ""
    path: str = ""  # where the files are (file, folder or CSV, depending on the data set)
    val_fraction: float = ranged(0.1, "[0, 1)")  # of train, held out for validation when the set has no val split
    test_fraction: float = ranged(0.0, "[0, 1)")  # of train, held out for test when the set has no test split
    split_seed: int = 0  # the train/val/test split is fixed by this seed, not the training seed
    image_size: int = ranged(0, ">= 0")  # resize to this square size (0: keep; folders need it when sizes differ)
    channels: int = 0  # 1 (gray) or 3 (RGB); 0: as the files are
    crop_pad: int = ranged(0, ">= 0")  # augmentation: random crop after zero padding by this many pixels (0: off)
    flip: bool = False  # augmentation: random horizontal flip (off for digits and text-like images)
    erase: float = ranged(0.0, "[0, 1]")  # augmentation: chance per example of blanking one random rectangle (2-33%
    # of the image, aspect 1/3 to 3) to the mean colour, "random erasing" (0: off)
    limit: int = ranged(0, ">= 0")  # use at most N training examples (0: all); for quick runs and few-label studies
    per_class: int = ranged(0, ">= 0")  # keep N training examples per class, drawn by split_seed (0: all)
    class_ids: list[int] = field(
        default_factory=list
    )  # keep only these class ids, numbered 0.. in this order ([]: all)
    in_memory_mb: int = 2048  # folder sets smaller than this are decoded once into memory
    strict: bool = False  # a class folder without images is an error (else a note)
    ink: bool = False  # light strokes on black filling a centred box (digits, MNIST): predict and serve turn a
    # user's image into that form (invert a light background, crop to the ink, centre, resize: image_ops.as_ink)

    def build(self) -> Data:
        raise NotImplementedError

    # shared finishing: val/test carve-out, limit, spec with mean/std
    def finish(self, x: torch.Tensor, y: torch.Tensor, classes: list[str], val=None, test=None) -> Data:
        if self.class_ids:  # a subset of the classes (transfer studies: pretrain on some, fine-tune on the others)
            bad = [c for c in self.class_ids if not 0 <= c < len(classes)]
            if bad or len(set(self.class_ids)) != len(self.class_ids):
                raise DataError(f"data.class_ids={self.class_ids}: give distinct class ids in 0..{len(classes) - 1}")
            new = torch.full((len(classes),), -1, dtype=torch.long)
            new[torch.tensor(self.class_ids)] = torch.arange(len(self.class_ids))

            def keep(part):
                return None if part is None else (part[0][new[part[1]] >= 0], new[part[1]][new[part[1]] >= 0])

            (x, y), val, test = keep((x, y)), keep(val), keep(test)
            classes = [classes[c] for c in self.class_ids]
        if len(x) == 0:
            raise DataError(f"data set '{self.name}' {self.path}: no training examples found")
        for split, labels in (("train", y), ("val", val and val[1]), ("test", test and test[1])):
            if labels is not None and len(labels) and (labels.min() < 0 or labels.max() >= len(classes)):
                bad = int(labels[(labels < 0) | (labels >= len(classes))][0])
                raise DataError(
                    f"data set '{self.name}' {self.path}: {split} label {bad} is outside "
                    f"0..{len(classes) - 1} (fix the labels or the class list)"
                )
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(self.split_seed))
        cut, held = 0, []
        if test is None and self.test_fraction > 0:
            k = max(1, int(len(x) * self.test_fraction))
            test, cut, held = (x[perm[:k]], y[perm[:k]]), k, ["test"]
        if val is None and self.val_fraction > 0:
            k = max(1, int(len(x) * self.val_fraction))
            val, cut, held = (x[perm[cut : cut + k]], y[perm[cut : cut + k]]), cut + k, ["val", *held]
        if cut >= len(x):  # each held-out split takes at least one example: nothing would be left to train on
            raise DataError(
                f"data set '{self.name}' {self.path}: {len(x)} examples are too few to hold out {' and '.join(held)} "
                f"and still train (each split needs at least 1 example: give at least {cut + 1}, "
                f"or set {' and '.join(f'data.{k}_fraction' for k in held)} to 0)"
            )
        keep = perm[cut:].sort().values if cut else torch.arange(len(x))
        if self.per_class:  # the first N of each class in split-seed order: a random, balanced few-label set
            rest = perm[cut:]
            keep = torch.cat([rest[y[rest] == c][: self.per_class] for c in range(len(classes))]).sort().values
        if self.limit:
            keep = keep[: self.limit]
        x, y = x[keep], y[keep]
        xf = x.float() / 255
        spec = DataSpec(
            num_classes=len(classes),
            class_names=classes,
            in_channels=x.shape[1],
            image_size=(x.shape[2], x.shape[3]),
            mean=tuple(xf.mean((0, 2, 3)).tolist()),
            std=tuple(xf.std((0, 2, 3)).clamp_min(1e-3).tolist()),
            extra={"crop_pad": self.crop_pad, "flip": self.flip, "erase": self.erase}
            | ({"ink_extent": ink_extent(x)} if self.ink else {}),
        )
        return Data(spec, TensorSplit(x, y), TensorSplit(*val) if val else None, TensorSplit(*test) if test else None)


@dataclass
class DigitsData(ImageData):
    """scikit-learn's bundled 8x8 handwritten digits (1,797 images): needs nothing but scikit-learn."""

    name: str = "digits"
    test_fraction: float = ranged(0.2, "[0, 1)")
    val_fraction: float = ranged(0.1, "[0, 1)")
    ink: bool = True

    def build(self) -> Data:
        from sklearn.datasets import load_digits

        d = load_digits()
        x = torch.from_numpy((d.images * 16).clip(0, 255).astype(np.uint8))[:, None]  # (N, 1, 8, 8), 0..16 -> 0..255
        y = torch.from_numpy(d.target).long()
        return self.finish(resize(x, self.image_size), y, [str(i) for i in range(10)])


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (the MNIST format), gzipped or not."""
    path = Path(path)
    try:
        raw = (gzip.open if path.suffix == ".gz" else open)(path, "rb").read()
    except (OSError, EOFError) as e:
        raise DataError(f"cannot read IDX file {path}: {e}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 8:
        raise DataError(f"{path} is not an IDX file of unsigned bytes (bad magic number)")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    body = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise DataError(f"{path} is truncated: header says {dims}, found {body.size} bytes of data")
    return body.reshape(dims)


def _find_idx(folder: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    raise DataError(f"{folder}: missing {stem}[.gz]")


@dataclass
class MNISTData(ImageData):
    """MNIST-format IDX files in `path` (train-images-idx3-ubyte[.gz], t10k-..., labels likewise)."""

    name: str = "mnist"
    val_fraction: float = ranged(1 / 12, "[0, 1)")  # 5,000 of 60,000
    ink: bool = True

    def build(self) -> Data:
        folder = Path(self.path)
        if not self.path or not folder.is_dir():
            raise DataError(f"data.path={self.path!r} is not a folder: point it at the MNIST IDX files")
        x = torch.from_numpy(read_idx(_find_idx(folder, "train-images-idx3-ubyte")).copy())[:, None]
        y = torch.from_numpy(read_idx(_find_idx(folder, "train-labels-idx1-ubyte")).astype(np.int64))
        tx = torch.from_numpy(read_idx(_find_idx(folder, "t10k-images-idx3-ubyte")).copy())[:, None]
        ty = torch.from_numpy(read_idx(_find_idx(folder, "t10k-labels-idx1-ubyte")).astype(np.int64))
        if len(x) != len(y) or len(tx) != len(ty):
            raise DataError(f"{folder}: image and label counts differ ({len(x)} vs {len(y)}, {len(tx)} vs {len(ty)})")
        return self.finish(resize(x, self.image_size), y, self.classes(), test=(resize(tx, self.image_size), ty))

    def classes(self) -> list[str]:
        return [str(i) for i in range(10)]


@dataclass
class FashionMNISTData(MNISTData):
    """Fashion-MNIST (60k/10k, 28x28 gray) from the Debian package dataset-fashion-mnist."""

    name: str = "fashion-mnist"
    path: str = FASHION_DIR
    ink: bool = False  # photos of clothes, not drawings

    def build(self) -> Data:
        if not Path(self.path).is_dir():
            raise DataError(
                f"Fashion-MNIST not found at {self.path}: install it with "
                "'sudo apt-get install dataset-fashion-mnist' or set data.path to its IDX files"
            )
        return super().build()

    def classes(self) -> list[str]:
        return list(FASHION_CLASSES)


# ------------------------------------------------------------------------------------------ files on disk


class FileImages(Dataset):
    """(path, label) pairs decoded on access: the streaming path for large folders."""

    def __init__(self, items: list[tuple[str, int]], channels: int, size: int):
        self.items, self.channels, self.size = items, channels, size

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        path, label = self.items[i]
        return read(path, self.channels, self.size), torch.tensor(label)

    def labels(self) -> list[int]:
        return [lab for _, lab in self.items]

    def sources(self) -> list[tuple[str, int]]:
        return list(self.items)


def _scan_classes(root: Path, strict: bool = False) -> tuple[list[tuple[str, int]], list[str]]:
    """(file, class id) of every image under root/<class>/, and the class names. A class folder without images
    is a class the net can never learn: a note (warnings.warn), or with `strict` an error, names it."""
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    items = [
        (str(f), i) for i, c in enumerate(classes) for f in sorted((root / c).rglob("*")) if f.suffix.lower() in EXTS
    ]
    empty = [str(root / c) for i, c in enumerate(classes) if not any(lab == i for _, lab in items)]
    if empty and items:
        what = f"class folder{'s' if len(empty) > 1 else ''} without images: {', '.join(empty)}"
        if strict:
            raise DataError(f"{what} (data.strict is set: add images or remove the folder)")
        warnings.warn(f"{what} (the class is kept but never seen; data.strict=true makes this an error)", stacklevel=2)
    return items, classes


class _FileSet:
    """Turns a list of files into a split: decoded into memory when small, streamed otherwise."""

    def __init__(self, cfg: ImageData):
        self.cfg = cfg

    def probe(self, items: list[tuple[str, int]]) -> tuple[int, int]:
        first = read(items[0][0], self.cfg.channels, self.cfg.image_size)
        return first.shape[0], first.numel()

    def load(self, items: list[tuple[str, int]], channels: int):
        size = self.cfg.image_size
        with ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1))) as pool:
            imgs = list(pool.map(lambda it: read(it[0], channels, size), items))
        shapes = {tuple(i.shape) for i in imgs}
        if len(shapes) > 1:
            raise DataError(
                f"images in {self.cfg.path} have different sizes {sorted(shapes)[:3]}...: "
                "set data.image_size to resize them"
            )
        return torch.stack(imgs), torch.tensor([lab for _, lab in items])


def _folder_data(cfg: ImageData, splits: dict[str, list[tuple[str, int]]], classes: list[str]) -> Data:
    train = splits.get("train", [])
    if not train:
        raise DataError(f"data set '{cfg.name}' at {cfg.path}: no image files found")
    fs = _FileSet(cfg)
    channels, numel = fs.probe(train)
    channels = cfg.channels or channels
    total_mb = numel * sum(len(v) for v in splits.values()) / 2**20
    if total_mb <= cfg.in_memory_mb:
        x, y = fs.load(train, channels)
        val = fs.load(splits["val"], channels) if splits.get("val") else None
        test = fs.load(splits["test"], channels) if splits.get("test") else None
        return cfg.finish(x, y, classes, val=val, test=test)
    # streamed: carve test and val out of the file list by the split seed (as finish does), no pixel statistics pass
    if cfg.class_ids:  # a subset of the classes, numbered 0.. in the order given
        new = {c: i for i, c in enumerate(cfg.class_ids)}
        splits = {k: [(f, new[y]) for f, y in v if y in new] for k, v in splits.items()}
        classes, train = [classes[c] for c in cfg.class_ids], [(f, new[y]) for f, y in train if y in new]
    perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.split_seed)).tolist()
    held = {}
    for name, fraction in (("test", cfg.test_fraction), ("val", cfg.val_fraction)):
        k = int(len(train) * fraction) if not splits.get(name) else 0
        held[name], perm = splits.get(name) or [train[i] for i in perm[:k]], perm[k:]
    if cfg.per_class:  # the first N of each class in split-seed order, as finish does
        perm = [i for c in range(len(classes)) for i in [j for j in perm if train[j][1] == c][: cfg.per_class]]
    train = [train[i] for i in sorted(perm)][: cfg.limit or None]
    if not train:
        raise DataError(f"data set '{cfg.name}' at {cfg.path}: no training images left after the val/test carve-out")
    val = held["val"]
    first = read(train[0][0], channels, cfg.image_size)
    spec = DataSpec(
        num_classes=len(classes),
        class_names=classes,
        in_channels=channels,
        image_size=tuple(first.shape[1:]),
        mean=(0.5,) * channels,
        std=(0.25,) * channels,
        extra={"crop_pad": cfg.crop_pad, "flip": cfg.flip, "erase": cfg.erase},
    )
    if cfg.ink:  # measured on the first files (no pass over all of them)
        spec.extra["ink_extent"] = ink_extent(torch.stack([read(f, channels, cfg.image_size) for f, _ in train[:256]]))
    s = cfg.image_size

    def mk(items):
        return StreamSplit(FileImages(items, channels, s)) if items else None

    return Data(spec, mk(train), mk(val), mk(held["test"]))


@dataclass
class ImageFolderData(ImageData):
    """One folder per class under `path`; or `path`/train, `path`/val, `path`/test each laid out that way."""

    name: str = "imagefolder"
    image_size: int = ranged(32, ">= 0")

    def build(self) -> Data:
        root = Path(self.path)
        if not self.path or not root.is_dir():
            raise DataError(f"data.path={self.path!r} is not a folder of class folders")
        if (root / "train").is_dir():
            splits, classes = {}, None
            for name in ("train", "val", "test"):
                if (root / name).is_dir():
                    items, cls = _scan_classes(root / name, self.strict)
                    if classes is not None and cls != classes:
                        raise DataError(f"{root / name}: class folders {cls} differ from train's {classes}")
                    classes, splits[name] = classes or cls, items
        else:
            items, classes = _scan_classes(root, self.strict)
            splits = {"train": items}
        if not classes:
            raise DataError(f"{root}: no class folders found (expected {root}/<class>/<image files>)")
        return _folder_data(self, splits, classes)


@dataclass
class CSVData(ImageData):
    """A CSV with columns path,label (a header row is optional); paths are relative to the CSV's folder."""

    name: str = "csv"
    image_size: int = ranged(32, ">= 0")
    test_fraction: float = ranged(0.1, "[0, 1)")

    def build(self) -> Data:
        p = Path(self.path)
        if not p.is_file():
            raise DataError(f"data.path={self.path!r} is not a CSV file of path,label rows")
        rows = []
        with open(p, newline="", encoding="utf-8") as f:
            for lineno, row in enumerate(csv.reader(f), 1):
                if not row or (lineno == 1 and row[0].strip().lower() in ("path", "file", "filename")):
                    continue
                if len(row) < 2:
                    raise DataError(f"{p}:{lineno}: expected 'path,label', got {row}")
                rows.append((row[0].strip(), row[1].strip(), lineno))
        labels = sorted({lab for _, lab, _ in rows}, key=lambda s: (not s.isdigit(), int(s) if s.isdigit() else s))
        index = {lab: i for i, lab in enumerate(labels)}
        items = []
        for path, lab, lineno in rows:
            full = (p.parent / path) if not os.path.isabs(path) else Path(path)
            if not full.is_file():
                raise DataError(f"{p}:{lineno}: image {full} not found")
            items.append((str(full), index[lab]))
        return _folder_data(self, {"train": items}, labels)
