"""Detection data on disk: Pascal VOC, COCO, YOLO and KITTI annotations, parsed up front; images decoded per batch.

    format: voc    path/Annotations/<id>.xml (pixel corners, 1-based) + path/JPEGImages/<filename>; official
                   split lists path/ImageSets/Main/{train,val,trainval,test}.txt. <difficult>1 objects are kept
                   as boxes that mAP ignores (the devkit's rule) and the loss skips.
    format: coco   data.train_ann / data.val_ann / data.test_ann, or the official layout
                   path/annotations/instances_{train,val}<year>.json with images in path/{train,val}<year>/, or
                   one file to split at random (data.annotations, default path/annotations.json; images in
                   path/images/ or path/). bbox is (x, y, w, h); iscrowd regions are ignored as COCOeval does;
                   category ids map to 0..C-1 in id order, named by the categories.
    format: yolo   path/images/<stem>.<ext> + path/labels/<stem>.txt ("class cx cy w h", normalized to [0, 1]),
                   or the split folders path/images/{train,val,test}/ + path/labels/{train,val,test}/.
                   data.classes, else path/classes.txt (a name per line).
    format: kitti  path/image_2/<stem>.png + path/label_2/<stem>.txt: 15 fields per object, box in fields 5-8;
                   DontCare lines are skipped; split lists path/ImageSets/{train,val,test}.txt of stems.

A set with an official split keeps it (a missing val is carved out of train by data.val_fraction); one without
is split at random by data.split_seed. Every box is checked as it is read: an inverted box, an unknown class, an
annotation file that is empty or cannot be parsed and a line with the wrong number of fields are errors naming
the file and the line (or object). A box reaching outside its image is clipped, an image without boxes is kept
(background) and a YOLO label file without its image is skipped, all counted in one note; `data.strict: true`
refuses them instead.

Images enter the net at `data.size`, resized or (data.letterbox) letterboxed (data/detect.py placement), boxes
moved with them. mAP does not change with that map (IoU is the same at any scale of x and y), but AP by object
size (small < 32^2 px, ...) is measured in the model's pixels: it equals COCO's only at the images' own size.

Only the annotations are held: a set whose decoded images fit in data.in_memory_mb is decoded once into tensors
(a TensorSplit); a larger one is a StreamSplit whose DataLoader workers decode each batch, so memory does not
grow with the number of images. `data.cache: true` keeps the resized images in one raw uint8
file per split, (N, 3, H, W) as `np.memmap(file, np.uint8, "r", shape=...)` reads it, with a byte per image
saying it is written: filled as images are first decoded, reused by later epochs and runs, and replaced when the
files' sizes or times, data.size or data.letterbox change.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

import numpy as np
import torch
from torch.utils.data import Dataset

from deeprecipe.config import ranged
from deeprecipe.data.core import Data, DataError, StreamSplit, pad_targets
from deeprecipe.data.detect import BoxData, box_spec, ignored, placement, to_model_boxes, to_model_image
from deeprecipe.data.image_ops import EXTS, read

Format = Literal["voc", "coco", "yolo", "kitti"]
FORMATS = get_args(Format)
KITTI_CLASSES = ["Car", "Pedestrian", "Cyclist"]
SPLITS = ("train", "val", "test")


@dataclass
class Item:
    """One annotated image: boxes xyxy in its own pixels, labels (ignored(c) for a box mAP ignores)."""

    path: str
    w: int
    h: int
    boxes: list = field(default_factory=list)
    labels: list = field(default_factory=list)


class Tally:
    """What was clipped or skipped while reading, for one note (or, with strict, the first such a refusal)."""

    def __init__(self, strict: bool):
        self.strict, self.clipped, self.empty, self.orphans = strict, 0, 0, []

    def clip(self, box: list[float], w: float, h: float, where: str) -> list[float]:
        x1, y1, x2, y2 = box
        c = [min(max(x1, 0.0), w), min(max(y1, 0.0), h), min(max(x2, 0.0), w), min(max(y2, 0.0), h)]
        if c != [x1, y1, x2, y2]:
            if self.strict:
                raise DataError(f"{where}: box {_fmt(box)} reaches outside the {w:g}x{h:g} image (data.strict)")
            self.clipped += 1
            if c[2] <= c[0] or c[3] <= c[1]:
                raise DataError(f"{where}: box {_fmt(box)} lies entirely outside the {w:g}x{h:g} image")
        return c

    def no_boxes(self, where: str) -> None:
        if self.strict:
            raise DataError(f"{where}: an image without boxes (data.strict refuses it; false keeps it as background)")
        self.empty += 1

    def orphan(self, label: Path, images: Path) -> None:
        if self.strict:
            raise DataError(
                f"{label}: a label file without its image {images / label.stem}.* "
                "(data.strict: add the image or remove the label file)"
            )
        self.orphans.append(label)

    def note(self) -> None:
        if self.clipped or self.empty:
            warnings.warn(
                f"data: {self.clipped} boxes clipped to their image, {self.empty} images without boxes kept "
                "(data.strict=true refuses both)",
                stacklevel=3,
            )
        if self.orphans:
            warnings.warn(
                f"data: {len(self.orphans)} label files without an image skipped (e.g. {self.orphans[0]}; "
                "data.strict=true refuses them)",
                stacklevel=3,
            )


def _fmt(box) -> str:
    return "[" + ", ".join(f"{v:g}" for v in box) + "]"


def _check(box: list[float], where: str) -> None:
    x1, y1, x2, y2 = box
    if x2 < x1 or y2 < y1:
        raise DataError(f"{where}: box {_fmt(box)} has x2 < x1 or y2 < y1 (expected x1, y1, x2, y2 corners)")
    if x2 == x1 or y2 == y1:
        raise DataError(f"{where}: box {_fmt(box)} has no area")


def _class(name: str, classes: list[str], where: str) -> int:
    if name not in classes:
        raise DataError(f"{where}: unknown class {name!r} (data.classes: {', '.join(classes)})")
    return classes.index(name)


def _text(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def _image_size(path: Path) -> tuple[int, int]:
    """(w, h) from the image's header, without decoding it."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.size
    except Exception as e:  # Pillow raises many kinds
        raise DataError(f"{path}: cannot read the image header ({type(e).__name__}; remove or replace it)") from None


def _list(path: Path) -> list[tuple[str, int]]:
    """A split list: (stem, line number) of each non-empty line (its first field)."""
    return [(line.split()[0], i) for i, line in enumerate(_text(path).splitlines(), 1) if line.strip()]


# ------------------------------------------------------------------------------------------------ formats


def read_voc(xml: Path, classes: list[str], tally: Tally) -> tuple[str, float, float, list, list]:
    """One VOC XML -> (image file name, width, height (0: not given), boxes in pixel edges, labels)."""
    text = _text(xml)
    if not text.strip():
        raise DataError(f"{xml}: empty annotation file")
    try:
        root = ET.fromstring(text)
    except ET.ParseError as e:
        raise DataError(f"{xml}: line {e.position[0]}: not valid XML ({e})") from None
    fname = (root.findtext("filename") or xml.stem + ".jpg").strip()
    try:
        w, h = float(root.findtext("size/width") or 0), float(root.findtext("size/height") or 0)
    except ValueError:
        raise DataError(f"{xml}: size/width and size/height must be numbers") from None
    boxes, labels = [], []
    for k, obj in enumerate(root.iter("object"), 1):
        name = (obj.findtext("name") or "").strip()
        where = f"{xml}: object {k} ({name or 'no name'})"
        try:
            b = [float(obj.findtext(f"bndbox/{t}")) for t in ("xmin", "ymin", "xmax", "ymax")]
        except (TypeError, ValueError):
            raise DataError(f"{where}: bndbox needs numeric xmin, ymin, xmax, ymax") from None
        b = [b[0] - 1, b[1] - 1, b[2], b[3]]  # VOC counts pixels from 1, corners inclusive
        _check(b, where)
        c = _class(name, classes, where)
        labels.append(ignored(c) if (obj.findtext("difficult") or "0").strip() == "1" else c)
        boxes.append(tally.clip(b, w, h, where) if w and h else b)
    if not boxes:
        tally.no_boxes(str(xml))
    return fname, w, h, boxes, labels


def read_yolo(txt: Path | None, classes: list[str], w: float, h: float, tally: Tally, image: Path) -> tuple[list, list]:
    """One YOLO label file ("class cx cy w h", normalized) -> boxes in pixels of a w x h image, class ids."""
    if txt is None or not txt.is_file():
        tally.no_boxes(f"{image} (no label file)")
        return [], []
    lines = _text(txt).splitlines()
    if not any(line.strip() for line in lines):
        tally.no_boxes(f"{txt}: empty annotation file")
        return [], []
    boxes, labels = [], []
    for i, line in enumerate(lines, 1):
        parts = line.split()
        if not parts:
            continue
        where = f"{txt}:{i}"
        if len(parts) != 5:
            raise DataError(f"{where}: {len(parts)} fields, expected 5 (class cx cy w h)")
        try:
            c, cx, cy, bw, bh = int(parts[0]), *map(float, parts[1:])
        except ValueError:
            raise DataError(f"{where}: expected an integer class and four numbers, got {line.strip()!r}") from None
        if not 0 <= c < len(classes):
            raise DataError(f"{where}: unknown class {c} (data.classes has {len(classes)}: 0..{len(classes) - 1})")
        if bw < 0 or bh < 0:
            raise DataError(f"{where}: negative width or height ({bw:g}, {bh:g})")
        b = [(cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h]
        _check(b, where)
        boxes.append(tally.clip(b, w, h, where))
        labels.append(c)
    return boxes, labels


def read_kitti(txt: Path, classes: list[str], w: float, h: float, tally: Tally) -> tuple[list, list]:
    """One KITTI label file -> boxes (fields 5-8: left, top, right, bottom in pixels), class ids."""
    lines = _text(txt).splitlines()
    if not any(line.strip() for line in lines):
        raise DataError(f"{txt}: empty annotation file (an image without objects has no KITTI label lines)")
    boxes, labels = [], []
    for i, line in enumerate(lines, 1):
        parts = line.split()
        if not parts:
            continue
        where = f"{txt}:{i}"
        if len(parts) not in (15, 16):
            raise DataError(f"{where}: {len(parts)} fields, expected 15 (type ... rotation_y) or 16 (with score)")
        if parts[0] == "DontCare":
            continue
        try:
            b = [float(v) for v in parts[4:8]]
        except ValueError:
            raise DataError(f"{where}: the box (fields 5-8) must be numbers") from None
        _check(b, where)
        labels.append(_class(parts[0], classes, where))
        boxes.append(tally.clip(b, w, h, where))
    if not boxes:
        tally.no_boxes(str(txt))
    return boxes, labels


def read_coco(js: Path, tally: Tally, cat_ids: list | None = None) -> tuple[list[str], list, list[tuple]]:
    """A COCO JSON -> (class names in category-id order, category ids, [(file name, width, height, boxes xyxy
    pixels, labels)] per image). `cat_ids` (another file's categories) must be the same ids."""
    text = _text(js)
    if not text.strip():
        raise DataError(f"{js}: empty annotation file")
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{js}: line {e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(doc, dict):
        raise DataError(f"{js}: not a COCO file (a JSON object with images, annotations and categories)")
    for key in ("images", "annotations", "categories"):
        if not isinstance(doc.get(key), list):
            raise DataError(f"{js}: no '{key}' list (a COCO file has images, annotations and categories)")
    for k, c in enumerate(doc["categories"]):
        if not isinstance(c, dict) or "id" not in c or "name" not in c:
            raise DataError(f"{js}: category {k}: needs an id and a name")
    cats = sorted(doc["categories"], key=lambda c: c["id"])
    ids = [c["id"] for c in cats]
    if cat_ids is not None and ids != cat_ids:
        raise DataError(f"{js}: categories {ids[:5]}... differ from the train file's {cat_ids[:5]}...")
    cat_index = {c: i for i, c in enumerate(ids)}
    images: dict = {}
    for k, im in enumerate(doc["images"]):
        if not isinstance(im, dict) or "id" not in im or not isinstance(im.get("file_name"), str):
            raise DataError(f"{js}: image {k}: needs an id and a file_name")
        images[im["id"]] = (im["file_name"], float(im.get("width") or 0), float(im.get("height") or 0), [], [])
    for k, a in enumerate(doc["annotations"]):
        where = f"{js}: annotation {k} (id {a.get('id', '?') if isinstance(a, dict) else '?'})"
        if not isinstance(a, dict):
            raise DataError(f"{where}: not an object")
        im = images.get(a.get("image_id"))
        if im is None:
            raise DataError(f"{where}: image_id {a.get('image_id')!r} is not in images")
        if a.get("category_id") not in cat_index:
            raise DataError(f"{where}: unknown category_id {a.get('category_id')!r}")
        bb = a.get("bbox")
        try:
            x, y, bw, bh = (float(v) for v in bb)
        except (TypeError, ValueError):
            raise DataError(f"{where}: bbox must be [x, y, width, height] numbers, got {bb!r}") from None
        if bw < 0 or bh < 0:
            raise DataError(f"{where}: bbox {_fmt(bb)} has a negative width or height")
        b = [x, y, x + bw, y + bh]
        _check(b, where)
        b = tally.clip(b, im[1] or b[2], im[2] or b[3], where)
        c = cat_index[a["category_id"]]
        im[3].append(b)
        im[4].append(ignored(c) if a.get("iscrowd") else c)
    for name, *_, b, _ in images.values():
        if not b:
            tally.no_boxes(f"{js}: image {name}")
    return [str(c["name"]) for c in cats], ids, list(images.values())


# ------------------------------------------------------------------------------------------------ images


class ImageCache:
    """Resized images of one split in a raw uint8 file (N, 3, H, W) and a byte per image saying it is written.
    Read and written at offsets (os.pread / os.pwrite), not mapped: a mapping keeps every image it has read
    resident, so the process's memory would grow to the whole file."""

    def __init__(self, file: Path, n: int, shape: tuple[int, int, int]):
        self.file, self.flags, self.shape = file, file.with_suffix(".done"), shape
        self.item = int(np.prod(shape))
        if not (self.file.is_file() and self.flags.is_file() and self.flags.stat().st_size == n):
            for old in file.parent.glob(file.name.split("-")[0] + "-*"):  # a cache of other files or settings
                old.unlink(missing_ok=True)
            for f, size in ((self.file, n * self.item), (self.flags, n)):
                tmp = f.with_name(f.name + ".tmp")
                with open(tmp, "wb") as out:
                    out.truncate(size)  # sparse: zero bytes until written
                os.replace(tmp, f)
        self.fds: tuple[int, int] | None = None
        self.pid = 0

    def _open(self) -> tuple[int, int]:
        if self.fds is None or self.pid != os.getpid():  # each DataLoader worker opens its own
            self.fds, self.pid = (os.open(self.file, os.O_RDWR), os.open(self.flags, os.O_RDWR)), os.getpid()
        return self.fds

    def get(self, i: int) -> torch.Tensor | None:
        data, flags = self._open()
        if os.pread(flags, 1, i) != b"\x01":
            return None
        buf = bytearray(os.pread(data, self.item, i * self.item))
        return torch.frombuffer(buf, dtype=torch.uint8).view(self.shape)

    def put(self, i: int, img: torch.Tensor) -> None:
        data, flags = self._open()
        os.pwrite(data, img.contiguous().numpy().tobytes(), i * self.item)
        os.pwrite(flags, b"\x01", i)  # after the pixels: a marked image is whole

    def __getstate__(self):  # workers started by spawn open their own files
        return {**self.__dict__, "fds": None, "pid": 0}


class BoxImages(Dataset):
    """The annotated images of a split: item i -> (image uint8 (3, H, W) at `size`, boxes float (M, 4) xyxy in
    the model's pixels, labels long (M,)), padded to `width` boxes (label -1), so DataLoader batches stack.
    Holds the annotations as flat arrays (no per-image Python objects to copy into workers)."""

    def __init__(self, items: list[Item], size, letterbox: bool, width: int, cache: ImageCache | None = None):
        self.paths = [it.path for it in items]
        self.wh = np.array([[it.w, it.h] for it in items], dtype=np.float64).reshape(-1, 2)
        self.offsets = np.cumsum([0] + [len(it.labels) for it in items])
        self.boxes = np.array([b for it in items for b in it.boxes], dtype=np.float32).reshape(-1, 4)
        self.box_labels = np.array([y for it in items for y in it.labels], dtype=np.int64)
        self.size, self.letterbox, self.width, self.cache = tuple(size), letterbox, width, cache

    def __len__(self) -> int:
        return len(self.paths)

    def place(self, i: int):
        return placement(*self.wh[i], self.size, self.letterbox)

    def target(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = self.offsets[i], self.offsets[i + 1]
        boxes = to_model_boxes(torch.from_numpy(self.boxes[a:b]), self.place(i))
        return pad_targets([boxes], [torch.from_numpy(self.box_labels[a:b])], self.width)

    def image(self, i: int) -> torch.Tensor:
        img = self.cache.get(i) if self.cache is not None else None
        if img is None:
            img = read(self.paths[i], 3)
            w, h = self.wh[i]
            if tuple(img.shape[-2:]) != (h, w):
                raise DataError(
                    f"{self.paths[i]}: the annotation says {w:g}x{h:g} pixels, the image is "
                    f"{img.shape[2]}x{img.shape[1]}: fix the annotation's size"
                )
            img = to_model_image(img, self.size, self.letterbox)
            if self.cache is not None:
                self.cache.put(i, img)
        return img

    def __getitem__(self, i: int):
        boxes, labels = self.target(i)
        return self.image(i), boxes[0], labels[0]

    def labels(self) -> list[int]:
        """The class of every box (those mAP ignores too), without decoding: what the checks count."""
        y = self.box_labels
        return np.where(y <= -2, -2 - y, y).tolist()

    def sources(self) -> list[tuple[str, int]]:
        """(file, a digest of its boxes and classes) of each image: the duplicates and leakage checks hash the
        files, and two copies of one image with different digests are one image annotated two ways."""
        out = []
        for i, p in enumerate(self.paths):
            a, b = self.offsets[i], self.offsets[i + 1]
            key = self.boxes[a:b].round(1).tobytes() + self.box_labels[a:b].tobytes()
            out.append((p, int.from_bytes(hashlib.blake2b(key, digest_size=7).digest(), "little")))
        return out

    def all_targets(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Boxes (K, 4) in the model's pixels and labels (K,) of every box of the split."""
        sx, sy, px, py = (np.array(v) for v in zip(*[self.place(i) for i in range(len(self))]))
        per = np.repeat(np.arange(len(self)), np.diff(self.offsets))
        scale = np.stack([sx, sy, sx, sy], 1)[per]
        shift = np.stack([px, py, px, py], 1)[per]
        return torch.from_numpy((self.boxes * scale + shift).astype(np.float32)), torch.from_numpy(self.box_labels)


# ------------------------------------------------------------------------------------------------ data set


@dataclass
class BoxFilesData(BoxData):
    """Images with box annotations in one of FORMATS (see the module docstring)."""

    name: str = "boxfiles"
    path: str = ""
    format: Format = "voc"
    classes: list[str] = field(default_factory=list)  # class names in id order (COCO: from its categories)
    annotations: str = ""  # COCO: the one JSON file of a set without splits (default path/annotations.json)
    train_ann: str = ""  # COCO: the train split's JSON (with val_ann / test_ann: an official split)
    val_ann: str = ""
    test_ann: str = ""
    size: tuple[int, int] = ranged((128, 128), ">= 8")  # (H, W) every image enters the net at, with its boxes
    letterbox: bool = False  # keep the aspect ratio (scale to fit, pad) instead of resizing to size
    strict: bool = False  # refuse clipped boxes, images without boxes and label files without an image
    cache: bool = False  # keep the resized images on disk (see the module docstring)
    in_memory_mb: int = ranged(1024, ">= 0")  # decoded sets up to this size are held
    # in memory (a TensorSplit); larger ones are streamed (0: always stream)
    val_fraction: float = ranged(0.1, "[0, 1)")  # of train, for validation, when the set has no val split
    test_fraction: float = ranged(0.1, "[0, 1)")  # for test, when the set has no official split at all
    split_seed: int = 0  # the random split is fixed by this seed, not the training seed

    def build(self) -> Data:
        root = Path(os.path.expanduser(os.path.expandvars(self.path)))
        if not self.path or not root.is_dir():
            raise DataError(f"data.path={self.path!r} is not a folder (set data.path to the {self.format} data set)")
        tally = Tally(self.strict)
        classes = list(self.classes) or (KITTI_CLASSES if self.format == "kitti" else [])
        if not classes and self.format == "yolo" and (root / "classes.txt").is_file():
            classes = [line.strip() for line in _text(root / "classes.txt").splitlines() if line.strip()]
        if not classes and self.format != "coco":
            raise DataError(f"data.classes is empty: list the class names of the {self.format} labels in id order")
        reader = {"voc": self.read_voc, "coco": self.read_coco, "yolo": self.read_yolo, "kitti": self.read_kitti}
        splits, classes = reader[self.format](root, classes, tally)
        tally.note()
        return self.make(self.carve(splits), classes, root)

    # -------------------------------------------------------------------------------------------- layouts

    def read_voc(self, root: Path, classes, tally) -> tuple[dict, list]:
        lists = root / "ImageSets" / "Main"
        named = {k: lists / f"{k}.txt" for k in ("train", "val", "trainval", "test")}
        if named["train"].is_file() or named["trainval"].is_file():
            train = named["train"] if named["train"].is_file() else named["trainval"]
            files = {"train": train, "val": named["val"] if train == named["train"] else None, "test": named["test"]}
            stems = {k: _list(f) if f is not None and f.is_file() else None for k, f in files.items()}
            xmls = {
                k: [(root / "Annotations" / f"{s}.xml", f"{files[k]}:{i}") for s, i in v]
                for k, v in stems.items()
                if v is not None
            }
        else:
            found = sorted((root / "Annotations").glob("*.xml"))
            if not found:
                raise DataError(f"{root}/Annotations: no .xml files (a VOC folder has Annotations/ and JPEGImages/)")
            xmls = {None: [(x, str(x)) for x in found]}
        out = {}
        for k, entries in xmls.items():
            items = []
            for x, where in entries:
                if not x.is_file():
                    raise DataError(f"{where}: no annotation {x} for this id (fix the list or add the file)")
                fname, w, h, b, y = read_voc(x, classes, tally)
                img = root / "JPEGImages" / fname
                if not img.is_file():
                    raise DataError(f"{x}: its image {img} does not exist")
                if not (w and h):
                    w, h = _image_size(img)
                items.append(Item(str(img), int(w), int(h), b, y))
            out[k] = items
        return out, classes

    def read_coco(self, root: Path, classes, tally) -> tuple[dict, list]:
        files: dict = {}
        if self.train_ann or self.val_ann or self.test_ann:  # a relative file name: under data.path, else here
            named = (("train", self.train_ann), ("val", self.val_ann), ("test", self.test_ann))
            files = {k: root / f if (root / f).is_file() else Path(f) for k, f in named if f}
        elif not self.annotations and sorted((root / "annotations").glob("instances_train*.json")):
            for k in ("train", "val", "test"):
                found = sorted((root / "annotations").glob(f"instances_{k}*.json"))
                if found:
                    files[k] = found[-1]  # the latest year
        else:
            files = {None: Path(self.annotations) if self.annotations else root / "annotations.json"}
        out, cat_ids, names = {}, None, []
        for k, js in files.items():
            if not js.is_file():
                raise DataError(
                    f"{js}: no COCO annotation file (set data.annotations, or data.train_ann and data.val_ann)"
                )
            names, cat_ids, images = read_coco(js, tally, cat_ids)
            # images beside the annotations: path/<split dir> (instances_val2017.json -> val2017/), path/images, path
            dirs = [root / js.stem.split("_", 1)[-1], root / "images", root, js.parent]
            items = []
            for fname, w, h, b, y in images:
                img = next((d / fname for d in dirs if (d / fname).is_file()), None)
                if img is None:
                    raise DataError(f"{js}: image {fname} is in none of {', '.join(str(d) for d in dirs[:3])}")
                if not (w and h):
                    w, h = _image_size(img)
                items.append(Item(str(img), int(w), int(h), b, y))
            out[k] = items
        if "train" not in out and None not in out:
            raise DataError("data.val_ann / data.test_ann without data.train_ann: give the train annotations too")
        return out, classes or names

    def read_yolo(self, root: Path, classes, tally) -> tuple[dict, list]:
        layout = {k: k for k in SPLITS if (root / "images" / k).is_dir()} or {None: ""}
        if None not in layout and "train" not in layout:
            raise DataError(f"{root / 'images'}: split folders {sorted(layout)} but no train/")
        out = {}
        for k, sub in layout.items():
            img_dir, lab_dir = root / "images" / sub, root / "labels" / sub
            imgs = sorted(p for p in img_dir.glob("*") if p.suffix.lower() in EXTS)
            if not imgs:
                raise DataError(f"{img_dir}: no images")
            stems = {p.stem for p in imgs}
            for lab in sorted(lab_dir.glob("*.txt")):
                if lab.stem not in stems and lab.name != "classes.txt":
                    tally.orphan(lab, img_dir)
            items = []
            for img in imgs:
                w, h = _image_size(img)
                b, y = read_yolo(lab_dir / f"{img.stem}.txt", classes, w, h, tally, img)
                items.append(Item(str(img), w, h, b, y))
            out[k] = items
        return out, classes

    def read_kitti(self, root: Path, classes, tally) -> tuple[dict, list]:
        img_dir, lab_dir, lists = root / "image_2", root / "label_2", root / "ImageSets"
        if (lists / "train.txt").is_file():
            entries = {
                k: [(s, f"{lists / k}.txt:{i}") for s, i in _list(lists / f"{k}.txt")]
                for k in SPLITS
                if (lists / f"{k}.txt").is_file()
            }
        else:
            imgs = sorted(p for p in img_dir.glob("*") if p.suffix.lower() in EXTS)
            if not imgs:
                raise DataError(f"{img_dir}: no images (a KITTI folder has image_2/ and label_2/)")
            entries = {None: [(p.stem, str(p)) for p in imgs]}
        out = {}
        for k, stems in entries.items():
            items = []
            for stem, where in stems:
                img = next(
                    (img_dir / f"{stem}{e}" for e in (".png", ".jpg", ".jpeg") if (img_dir / f"{stem}{e}").is_file()),
                    None,
                )
                if img is None:
                    raise DataError(f"{where}: no image {img_dir / stem}.png")
                txt = lab_dir / f"{stem}.txt"
                if not txt.is_file():
                    raise DataError(f"{img}: no label file {txt}")
                w, h = _image_size(img)
                b, y = read_kitti(txt, classes, w, h, tally)
                items.append(Item(str(img), w, h, b, y))
            out[k] = items
        return out, classes

    # -------------------------------------------------------------------------------------------- splits

    def carve(self, found: dict) -> dict[str, list[Item]]:
        """Official splits as found (val carved out of train when missing); a set without any: split at random."""
        items = found.get(None) or found.get("train") or []
        official = None not in found
        n = len(items)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.split_seed)).tolist()
        nt = 0 if official or n <= 2 else int(n * self.test_fraction)
        nv = 0 if found.get("val") or n <= 2 else int(n * self.val_fraction)
        return {
            "train": [items[i] for i in sorted(perm[nt + nv :])],
            "val": found.get("val") or [items[i] for i in perm[nt : nt + nv]],
            "test": found.get("test") or [items[i] for i in perm[:nt]],
        }

    def make(self, splits: dict[str, list[Item]], classes: list[str], root: Path) -> Data:
        if not splits["train"]:
            raise DataError(f"data set '{self.name}' at {root}: no training images")
        H, W = self.size
        width = max([len(it.labels) for v in splits.values() for it in v] + [1])
        n = sum(len(v) for v in splits.values())
        mb = n * 3 * H * W / 2**20
        sets = {
            k: BoxImages(v, self.size, self.letterbox, width, self.cache_for(root, k, v))
            for k, v in splits.items()
            if v
        }
        palette = [((53 * i) % 256, (97 * i + 80) % 256, (151 * i + 40) % 256) for i in range(len(classes))]
        if mb <= self.in_memory_mb:
            warnings.warn(f"data: {n} images held in memory ({mb:.0f} MB decoded at {H}x{W})", stacklevel=3)
            tensors = {k: self.decode_all(s) for k, s in sets.items()}
            return self.finish(classes, palette, tensors["train"], tensors.get("val"), tensors.get("test"))
        warnings.warn(
            f"data: {n} images streamed from disk ({mb:.0f} MB decoded at {H}x{W} > data.in_memory_mb)", stacklevel=3
        )
        train = sets["train"]
        sample = torch.stack([train[int(i)][0] for i in np.linspace(0, len(train) - 1, min(64, len(train)))])
        extra = {"flip": self.flip, "scale": list(self.scale), "crop": self.crop, "min_visible": self.min_visible}
        spec = box_spec(classes, palette, sample, *train.all_targets(), extra | self.geometry(), len(train))
        return Data(spec, *(StreamSplit(sets[k]) if k in sets else None for k in SPLITS))

    def finish(self, classes, palette, train, val=None, test=None) -> Data:
        data = super().finish(classes, palette, train, val, test)
        data.spec.extra.update(self.geometry())
        return data

    def geometry(self) -> dict:
        return {"letterbox": self.letterbox}

    def decode_all(self, s: BoxImages) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        H, W = self.size
        x = torch.empty(len(s), 3, H, W, dtype=torch.uint8)

        def one(i):
            x[i] = s.image(i)

        with ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1))) as pool:
            list(pool.map(one, range(len(s))))
        boxes, labels = zip(*(s.target(i) for i in range(len(s))))
        return x, torch.cat(boxes), torch.cat(labels)

    def cache_for(self, root: Path, split: str, items: list[Item]) -> ImageCache | None:
        """The split's on-disk cache (data.cache), keyed by its files' sizes and times and the geometry: under
        path/.deeprecipe-cache, or $DEEPRECIPE_DATA/cache when the data folder is read-only."""
        if not self.cache:
            return None
        h = hashlib.blake2b(digest_size=8)
        h.update(repr((1, tuple(self.size), self.letterbox)).encode())
        for it in items:
            st = os.stat(it.path)
            h.update(f"{it.path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        name = f"{split}-{h.hexdigest()}.u8"
        shape = (3, *self.size)
        for folder in (
            root / ".deeprecipe-cache",
            Path(os.environ.get("DEEPRECIPE_DATA", "data"))
            / "cache"
            / "boxfiles"
            / hashlib.blake2b(str(root.resolve()).encode(), digest_size=6).hexdigest(),
        ):
            try:
                folder.mkdir(parents=True, exist_ok=True)
                return ImageCache(folder / name, len(items), shape)
            except OSError:
                continue
        raise DataError(f"data.cache: neither {root} nor $DEEPRECIPE_DATA/cache can be written (set data.cache=false)")
