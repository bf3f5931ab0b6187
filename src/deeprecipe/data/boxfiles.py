"""Detection data on disk: Pascal VOC, COCO, YOLO and KITTI annotations, read into padded box splits.

    format: voc    path/Annotations/*.xml (one per image; pixel corners, 1-based) + path/JPEGImages/<filename>
    format: coco   path/annotations.json (or data.annotations): images, annotations (bbox x, y, w, h), categories
                   + path/images/<file_name> (or the file name relative to path)
    format: yolo   path/images/<stem>.<ext> + path/labels/<stem>.txt: "class cx cy w h", normalized to [0, 1]
    format: kitti  path/image_2/<stem>.png + path/label_2/<stem>.txt: 15 fields per object, box in fields 5-8;
                   DontCare lines are skipped

Every box is checked as it is read. An inverted box (x2 < x1 or y2 < y1), an unknown class name, an annotation
file that is empty or cannot be parsed and a line with the wrong number of fields are errors naming the file
and the line (or object). A box reaching outside its image is clipped and an image without boxes is kept
(no objects), and both are counted in one note; `data.strict: true` refuses them instead. Images are resized
to `data.size` with their boxes.
"""

from __future__ import annotations

import json
import os
import warnings
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from deeprecipe.data.core import Data, DataError, pad_targets
from deeprecipe.data.detect import BoxData
from deeprecipe.data.image_ops import EXTS, read, resize

FORMATS = ("voc", "coco", "yolo", "kitti")
KITTI_CLASSES = ["Car", "Pedestrian", "Cyclist"]


class Tally:
    """What was clipped or skipped while reading, for one note (or, with strict, the first such a refusal)."""

    def __init__(self, strict: bool):
        self.strict, self.clipped, self.empty = strict, 0, 0

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

    def note(self) -> None:
        if self.clipped or self.empty:
            warnings.warn(
                f"data: {self.clipped} boxes clipped to their image, {self.empty} images without boxes kept "
                "(data.strict=true refuses both)",
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
    text = path.read_text(encoding="utf-8", errors="replace")
    return text


# ------------------------------------------------------------------------------------------------ formats


def read_voc(xml: Path, classes: list[str], tally: Tally) -> tuple[str, list, list]:
    """One VOC XML -> (image file name, boxes in pixel edges, class ids)."""
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
        labels.append(_class(name, classes, where))
        boxes.append(tally.clip(b, w, h, where) if w and h else b)
    if not boxes:
        tally.no_boxes(str(xml))
    return fname, boxes, labels


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


def read_coco(js: Path, tally: Tally) -> tuple[list[str], dict[str, tuple[list, list]]]:
    """A COCO JSON -> (class names in category order, file name -> (boxes xyxy pixels, class ids))."""
    text = _text(js)
    if not text.strip():
        raise DataError(f"{js}: empty annotation file")
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{js}: line {e.lineno}: not valid JSON ({e.msg})") from None
    for key in ("images", "annotations", "categories"):
        if not isinstance(doc.get(key), list):
            raise DataError(f"{js}: no '{key}' list (a COCO file has images, annotations and categories)")
    cats = sorted(doc["categories"], key=lambda c: c["id"])
    cat_index = {c["id"]: i for i, c in enumerate(cats)}
    images = {im["id"]: im for im in doc["images"]}
    out: dict[str, tuple[list, list]] = {im["file_name"]: ([], []) for im in doc["images"]}
    for k, a in enumerate(doc["annotations"]):
        where = f"{js}: annotation {k} (id {a.get('id', '?')})"
        im = images.get(a.get("image_id"))
        if im is None:
            raise DataError(f"{where}: image_id {a.get('image_id')!r} is not in images")
        if a.get("category_id") not in cat_index:
            raise DataError(f"{where}: unknown category_id {a.get('category_id')!r}")
        bb = a.get("bbox")
        if not isinstance(bb, list) or len(bb) != 4:
            raise DataError(f"{where}: bbox must be [x, y, width, height]")
        x, y, bw, bh = map(float, bb)
        if bw < 0 or bh < 0:
            raise DataError(f"{where}: bbox {_fmt(bb)} has a negative width or height")
        b = [x, y, x + bw, y + bh]
        _check(b, where)
        b = tally.clip(b, float(im.get("width", 0)) or b[2], float(im.get("height", 0)) or b[3], where)
        out[im["file_name"]][0].append(b)
        out[im["file_name"]][1].append(cat_index[a["category_id"]])
    for name, (b, _) in out.items():
        if not b:
            tally.no_boxes(f"{js}: image {name}")
    return [c["name"] for c in cats], out


# ------------------------------------------------------------------------------------------------ data set


@dataclass
class BoxFilesData(BoxData):
    """Images with box annotations in one of FORMATS (see the module docstring)."""

    name: str = "boxfiles"
    path: str = ""
    format: str = "voc"  # voc | coco | yolo | kitti
    classes: list[str] = field(default_factory=list)  # class names in id order (COCO: from its categories)
    annotations: str = ""  # COCO: the JSON file (default path/annotations.json)
    size: tuple[int, int] = (128, 128)  # (H, W) every image is resized to, with its boxes
    strict: bool = False  # refuse boxes reaching outside their image and images without boxes
    val_fraction: float = 0.1
    test_fraction: float = 0.1

    def build(self) -> Data:
        if self.format not in FORMATS:
            raise DataError(f"data.format={self.format!r}: use one of {', '.join(FORMATS)}")
        root = Path(self.path)
        if not root.is_dir():
            raise DataError(f"data.path={self.path!r} is not a folder")
        tally = Tally(self.strict)
        classes = list(self.classes) or (KITTI_CLASSES if self.format == "kitti" else [])
        if not classes and self.format != "coco":
            raise DataError(f"data.classes is empty: list the class names of the {self.format} labels in id order")
        items: list[tuple[Path, list, list]] = []
        if self.format == "voc":
            xmls = sorted((root / "Annotations").glob("*.xml"))
            if not xmls:
                raise DataError(f"{root}/Annotations: no .xml files")
            for x in xmls:
                fname, b, y = read_voc(x, classes, tally)
                img = root / "JPEGImages" / fname
                if not img.is_file():
                    raise DataError(f"{x}: its image {img} does not exist")
                items.append((img, b, y))
        elif self.format == "coco":
            js = Path(self.annotations) if self.annotations else root / "annotations.json"
            if not js.is_file():
                raise DataError(f"{js}: no COCO annotation file (set data.annotations)")
            names, per = read_coco(js, tally)
            classes = classes or names
            for fname, (b, y) in sorted(per.items()):
                img = root / "images" / fname if (root / "images" / fname).is_file() else root / fname
                if not img.is_file():
                    raise DataError(f"{js}: image {fname} is neither in {root / 'images'} nor in {root}")
                items.append((img, b, y))
        else:
            img_dir, lab_dir = ("images", "labels") if self.format == "yolo" else ("image_2", "label_2")
            imgs = sorted(p for p in (root / img_dir).glob("*") if p.suffix.lower() in EXTS)
            if not imgs:
                raise DataError(f"{root / img_dir}: no images")
            for img in imgs:
                from PIL import Image

                with Image.open(img) as im:
                    w, h = im.size
                txt = root / lab_dir / f"{img.stem}.txt"
                if self.format == "yolo":
                    b, y = read_yolo(txt, classes, w, h, tally, img)
                else:
                    if not txt.is_file():
                        raise DataError(f"{img}: no label file {txt}")
                    b, y = read_kitti(txt, classes, w, h, tally)
                items.append((img, b, y))
        tally.note()
        return self._splits(items, classes)

    def _splits(self, items, classes) -> Data:
        H, W = self.size

        def load(item):
            path, b, y = item
            img = read(path, 3)
            h, w = img.shape[-2:]
            scale = torch.tensor([W / w, H / h, W / w, H / h])
            return resize(img, (H, W)), torch.tensor(b, dtype=torch.float).view(-1, 4) * scale, torch.tensor(y)

        with ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1))) as pool:
            loaded = list(pool.map(load, items))
        n = len(loaded)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(0)).tolist()
        nt = int(n * self.test_fraction) if n > 2 else 0
        nv = int(n * self.val_fraction) if n > 2 else 0
        groups = {"test": perm[:nt], "val": perm[nt : nt + nv], "train": sorted(perm[nt + nv :])}
        width = max([len(b) for _, b, _ in loaded] + [1])

        def stack(idx):
            if not idx:
                return None
            boxes, labels = pad_targets([loaded[i][1] for i in idx], [loaded[i][2] for i in idx], width)
            return torch.stack([loaded[i][0] for i in idx]), boxes, labels

        palette = [((53 * i) % 256, (97 * i + 80) % 256, (151 * i + 40) % 256) for i in range(len(classes))]
        return self.finish(classes, palette, stack(groups["train"]), stack(groups["val"]), stack(groups["test"]))
