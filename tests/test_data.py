"""Every registered data set builds from tiny files the test writes itself; batching and augmentation properties.

A family that registers a data set adds a tiny case to TINY below (a function of a temporary folder that
returns the data set's config); test_every_dataset_has_a_tiny_case fails until it does.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from deeprecipe.common import classes
from deeprecipe.core import DataSpec
from deeprecipe.data import DATASETS, Data, DataError, TensorSplit, data_config_class
from deeprecipe.data.core import Draws, StreamSplit, micro_draws, step_indices, train_batches
from deeprecipe.data.images import FASHION_DIR, read_idx
from deeprecipe.engine.loop import _micro_steps
from deeprecipe.families import classify

# ------------------------------------------------------------------------------------------ tiny files


def write_idx(path: Path, array: np.ndarray) -> None:
    """An IDX file of unsigned bytes (the MNIST format), gzipped when the name ends in .gz."""
    header = bytes([0, 0, 8, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    raw = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if path.suffix == ".gz" else raw)


def write_mnist(
    folder: Path,
    n: int = 40,
    n_test: int = 12,
    size: int = 6,
    bad_label: int | None = None,
    bad_test_label: int | None = None,
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    y, ty = np.arange(n) % 10, np.arange(n_test) % 10
    if bad_label is not None:
        y[n // 2] = bad_label
    if bad_test_label is not None:
        ty[0] = bad_test_label
    write_idx(folder / "train-images-idx3-ubyte.gz", rng.integers(0, 256, (n, size, size)))
    write_idx(folder / "train-labels-idx1-ubyte.gz", y)
    write_idx(folder / "t10k-images-idx3-ubyte", rng.integers(0, 256, (n_test, size, size)))  # not gzipped
    write_idx(folder / "t10k-labels-idx1-ubyte", ty)
    return folder


def write_pngs(
    folder: Path, classes=("cat", "dog", "fox"), per_class: int = 6, size: int = 10, channels: int = 3
) -> list[Path]:
    from torchvision.io import write_png

    g = torch.Generator().manual_seed(0)
    files = []
    for c in classes:
        (folder / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = torch.randint(0, 256, (channels, size, size), generator=g, dtype=torch.uint8)
            write_png(img, str(folder / c / f"{i}.png"))
            files.append(folder / c / f"{i}.png")
    return files


def write_csv(folder: Path) -> Path:
    files = write_pngs(folder / "img", classes=("a", "b"), per_class=5)
    rows = ["path,label"] + [f"{f.relative_to(folder)},{f.parent.name}" for f in files]
    (folder / "list.csv").write_text("\n".join(rows) + "\n")
    return folder / "list.csv"


def fashion(tmp: Path):
    if not Path(FASHION_DIR).is_dir():
        pytest.skip(f"{FASHION_DIR} is absent (apt-get install dataset-fashion-mnist)")
    return DATASETS["fashion-mnist"](limit=64)


def write_text(tmp: Path):
    """A small UTF-8 file: enough characters for windows of 16 in both splits."""
    (tmp / "corpus.txt").write_text(
        "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind.\n" * 6
    )
    return DATASETS["text"](path=str(tmp / "corpus.txt"), block_size=16, val_fraction=0.2)


def write_pairs(tmp: Path):
    """Line-aligned train files (the target gzipped) and a TSV val file."""
    en = ["a small dog runs", "two men talk", "the cat sleeps", "a girl reads a book"] * 3
    de = ["ein kleiner hund rennt", "zwei männer reden", "die katze schläft", "ein mädchen liest ein buch"] * 3
    folder = tmp / "pairs"
    folder.mkdir()
    (folder / "train.en").write_text("\n".join(en) + "\n")
    (folder / "train.de.gz").write_bytes(gzip.compress(("\n".join(de) + "\n").encode()))
    (folder / "val").write_text("".join(f"{a}\t{b}\n" for a, b in zip(en[:3], de[:3])))
    return DATASETS["pairs"](path=str(folder), vocab_size=300)


def write_cityscapes(tmp: Path):
    """Two train images (one becomes val) and one official val image (the test split), gtFine labelIds."""
    from torchvision.io import write_png

    g = torch.Generator().manual_seed(0)
    root = tmp / "cityscapes"
    for split, name in (("train", "aachen_000000_000019"), ("train", "aachen_000001_000019"), ("val", "lindau_0_1")):
        city = name.split("_")[0]
        for kind in ("leftImg8bit", "gtFine"):
            (root / kind / split / city).mkdir(parents=True, exist_ok=True)
        img = torch.randint(0, 256, (3, 8, 16), generator=g, dtype=torch.uint8)
        ids = torch.tensor([0, 7, 26, 33], dtype=torch.uint8)[torch.randint(0, 4, (1, 8, 16), generator=g)]
        write_png(img, str(root / "leftImg8bit" / split / city / f"{name}_leftImg8bit.png"))
        write_png(ids, str(root / "gtFine" / split / city / f"{name}_gtFine_labelIds.png"))
    return DATASETS["cityscapes"](path=str(root), size=(8, 12), val_fraction=0.5)


def write_maskfolder(tmp: Path):
    from test_segmentation import _mask_folder

    _mask_folder(tmp / "seg", n=4, size=(20, 24), classes=3)
    return DATASETS["maskfolder"](path=str(tmp / "seg"), classes=["a", "b", "c"], size=(16, 16))


def write_frame_folders(tmp: Path):
    """Videos as folders of frame images (no codec needed): 2 classes x 3 videos of 6 frames."""
    from torchvision.io import write_png

    g = torch.Generator().manual_seed(0)
    root = tmp / "videos"
    for cls in ("jump", "walk"):
        for v in range(3):
            (root / cls / f"v{v}").mkdir(parents=True)
            for t in range(6):
                frame = torch.randint(0, 256, (3, 10, 12), generator=g, dtype=torch.uint8)
                write_png(frame, str(root / cls / f"v{v}" / f"{t:03d}.png"))
    return DATASETS["videofolder"](
        path=str(root), frames=3, stride=1, size=8, eval_clips=2, val_fraction=0.34, workers=1
    )


def write_textclass(tmp: Path):
    """A CSV of labelled texts, split 6 / 2 / 2 by split_seed."""
    rows = [f"{w} day {i},{lab}" for i in range(5) for lab, w in (("pos", "good"), ("neg", "bad"))]
    (tmp / "texts.csv").write_text("text,label\n" + "\n".join(rows) + "\n")
    return DATASETS["textclass"](path=str(tmp / "texts.csv"), val_fraction=0.2, test_fraction=0.2)


def write_boxfiles(tmp: Path):
    """Four YOLO-labelled images of two classes (one box each), 2 / 1 / 1 by the split fractions."""
    from PIL import Image

    (tmp / "yolo" / "images").mkdir(parents=True)
    (tmp / "yolo" / "labels").mkdir()
    for i in range(4):
        Image.new("RGB", (20, 16), (40 * i, 90, 30)).save(tmp / "yolo" / "images" / f"{i}.png")
        (tmp / "yolo" / "labels" / f"{i}.txt").write_text(f"{i % 2} 0.5 0.5 0.4 0.5\n")
    return DATASETS["boxfiles"](
        path=str(tmp / "yolo"), format="yolo", classes=["a", "b"], size=(16, 20), val_fraction=0.25, test_fraction=0.25
    )


def record_driving(tmp: Path):
    """Three expert episodes of highway-fast-v0 (2 frames of 32x32) recorded into the temporary folder, never
    into $DEEPRECIPE_DATA: seed 0 falls in val, 1 and 2 in train."""
    return DATASETS["driving"](path=str(tmp / "rollouts"), episodes=3, frames=2, size=(32, 32), eval_episodes=1)


# data set name -> (tmp folder) -> its config; the expected number of classes (0: token data)
TINY = {
    "digits": (lambda tmp: DATASETS["digits"](), 10),
    "fashion-mnist": (fashion, 10),
    "mnist": (lambda tmp: DATASETS["mnist"](path=str(write_mnist(tmp / "mnist"))), 10),
    "imagefolder": (
        lambda tmp: DATASETS["imagefolder"](path=str(tmp / "imgs"), image_size=8) if write_pngs(tmp / "imgs") else None,
        3,
    ),
    "csv": (lambda tmp: DATASETS["csv"](path=str(write_csv(tmp / "csv")), image_size=8), 2),
    "text": (write_text, 0),
    "pairs": (write_pairs, 0),
    "scenes": (lambda tmp: DATASETS["scenes"](size=(32, 40), train_size=4, val_size=2, test_size=2), 8),
    "cityscapes": (write_cityscapes, 19),
    "maskfolder": (write_maskfolder, 3),
    "moving-digits": (
        lambda tmp: DATASETS["moving-digits"](frames=4, size=16, sprite=8, train_size=6, val_size=3, test_size=3),
        10,
    ),
    "videofolder": (write_frame_folders, 2),
    "textclass": (write_textclass, 2),
    "scenes-detect": (lambda tmp: DATASETS["scenes-detect"](size=(48, 48), train_size=4, val_size=2, test_size=2), 3),
    "boxfiles": (write_boxfiles, 2),
    "img2img": (
        lambda tmp: DATASETS["img2img"](mode="inpaint", size=(32, 40), train_size=4, val_size=2, test_size=2),
        8,
    ),
    "driving": (record_driving, 5),
}


def test_every_dataset_has_a_tiny_case():
    missing = sorted(set(DATASETS) - set(TINY))
    assert not missing, f"add a tiny case to TINY in tests/test_data.py for: {missing}"


def check_examples(batch: tuple[torch.Tensor, ...], spec, classes: int) -> None:
    """A batch from a split has the layout its spec announces."""
    if spec.vocab_size and spec.num_classes:  # labelled texts: ids (N, L) padded with 0, a class per text
        x, y = batch
        assert x.dtype == torch.long and x.ndim == 2 and 0 <= int(x.min()) and int(x.max()) < spec.vocab_size
        assert y.dtype == torch.long and y.ndim == 1 and 0 <= int(y.min()) and int(y.max()) < classes
        return
    if spec.vocab_size:  # token ids (N, L): (input, next tokens) or (source, target) of their vocabularies
        for t, vocab in zip(batch, (spec.extra.get("src_vocab", spec.vocab_size), spec.vocab_size)):
            assert t.dtype == torch.long and t.ndim == 2
            assert 0 <= int(t.min()) and int(t.max()) < vocab
        return
    if spec.extra.get("boxes"):  # detection: images, boxes (N, M, 4) xyxy pixels, labels (N, M) with -1 padding
        x, b, y = batch
        assert x.dtype == torch.uint8 and x.ndim == 4 and tuple(x.shape[-2:]) == tuple(spec.image_size)
        assert b.is_floating_point() and b.shape == (*y.shape, 4) and y.dtype == torch.long
        real = y >= 0
        assert real.any() and int(y.max()) < classes and int(y.min()) >= -1
        assert (b[real][:, 2:] > b[real][:, :2]).all() and b[real][:, 2].max() <= spec.image_size[1]
        return
    x, y = batch
    assert x.dtype == torch.uint8 and tuple(x.shape[-2:]) == tuple(spec.image_size)
    if "frames" in spec.extra:  # clips (N, C, T, H, W), or K clips per video (N, K, C, T, H, W) to average
        assert x.ndim in (5, 6) and x.shape[-3] == spec.extra["frames"] and x.shape[-4] == spec.in_channels
    else:  # images (N, C, H, W)
        assert x.ndim == 4 and x.shape[1] == spec.in_channels
    if y.ndim == 1:  # a class per example
        assert y.dtype == torch.long
        assert 0 <= int(y.min()) and int(y.max()) < classes
    else:  # a class per pixel (N, H, W); ignore_index marks pixels without one
        assert tuple(y.shape[1:]) == tuple(spec.image_size) and not y.is_floating_point()
        labelled = y[y != spec.extra["ignore_index"]].long()
        assert len(labelled) and int(labelled.max()) < classes


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_dataset_builds(name, tmp_path):
    if name not in TINY:
        pytest.fail(f"data set '{name}' has no tiny case in TINY")
    make, classes = TINY[name]
    cfg = make(tmp_path)
    assert data_config_class(name) is type(cfg) and cfg.name == name
    data = cfg.build()
    assert isinstance(data, Data)
    spec = data.spec
    assert spec.num_classes == classes == len(spec.class_names)
    assert bool(spec.vocab_size) == (classes == 0) or "pad" in spec.extra  # labels or tokens (texts: both)
    import json

    json.dumps(spec.extra)  # saved as spec.json: must stay JSON-serializable
    for split in (data.train, data.val, data.test):
        if split is not None:
            check_examples(split.take(torch.arange(min(5, len(split)))), spec, classes)
    assert len(data.train) > 0 and data.val is not None and len(data.val) > 0
    assert len(spec.mean) == len(spec.std) == spec.in_channels
    # the split is fixed by split_seed: a second build gives the same examples
    again = type(cfg)(**{k: getattr(cfg, k) for k in cfg.__dataclass_fields__}).build()
    idx = torch.arange(min(5, len(data.train)))
    for a, b in zip(data.train.take(idx), again.train.take(idx)):
        assert torch.equal(a, b)


def png_claiming(width: int, height: int) -> bytes:
    """A few dozen bytes of PNG whose header claims width x height pixels (decoding it would need w*h bytes)."""
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    head = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + head + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("claims", [(20000, 20000), (5000, 5000)])  # above Pillow's own limit, and only above ours
@pytest.mark.parametrize("name", ["imagefolder", "csv", "cityscapes", "maskfolder", "videofolder", "streamed"])
def test_every_image_data_path_refuses_a_png_above_the_pixel_limit(tmp_path, name, claims):
    """One pixel limit for training and serving (image_ops.MAX_PIXELS, checked from the header): a PNG that claims
    20000 x 20000 pixels is refused by name, not decoded into 400 MB, on every path a data set reads images by."""
    cfg = TINY["imagefolder" if name == "streamed" else name][0](tmp_path)
    if name == "streamed":  # read by a DataLoader worker, file by file
        cfg.in_memory_mb = 0
    victim = sorted(tmp_path.rglob("*.png"))[1]
    victim.write_bytes(png_claiming(*claims))
    with pytest.raises(DataError) as e:
        data = cfg.build()
        for split in (data.train, data.val, data.test):
            if split is not None:
                split.take(torch.arange(len(split)))
    assert str(victim) in str(e.value) and "the limit is 16777216 pixels" in str(e.value), e.value


def test_as_ink_makes_a_drawing_look_like_the_ink_data_sets():
    """image_ops.as_ink: dark ink on light or light on dark, anywhere on the canvas: the same centred image, the
    ink's long side filling the recorded share of the frame; ink_extent measures that share (MNIST: 20 of 28)."""
    from deeprecipe.data.image_ops import as_ink, for_model, ink_extent, resize

    stroke = torch.zeros(1, 30, 12)
    stroke[:, :, 4:8], stroke[:, 0:4] = 255, 255  # an upside-down T, 30 x 12 pixels
    made = []
    for top, left, dark_on_light in ((0, 0, True), (50, 70, True), (20, 5, False)):
        canvas = torch.zeros(1, 90, 100)
        canvas[:, top : top + 30, left : left + 12] = stroke
        made.append(as_ink((255 - canvas if dark_on_light else canvas).to(torch.uint8), (28, 28), 20 / 28))
    assert all(torch.equal(made[0], m) for m in made[1:])
    rows, cols = (made[0][0] > 64).any(1).nonzero().flatten(), (made[0][0] > 64).any(0).nonzero().flatten()
    assert rows[-1] - rows[0] + 1 == 20 and rows[0] == 4 and abs((cols[0] + cols[-1]) / 2 - 13.5) <= 1
    assert ink_extent(torch.cat([made[0][None]] * 3)) == pytest.approx(20 / 28, abs=0.01)
    digit = made[0]  # already in the data set's form (its size, a dark background): kept as it is
    assert torch.equal(as_ink(digit, (28, 28), 0.5), digit)
    blank = torch.full((1, 40, 40), 255, dtype=torch.uint8)
    assert torch.equal(as_ink(blank, (28, 28), 0.7), resize(blank, 28))
    plain = DataSpec(in_channels=1, image_size=(28, 28))  # a data set that is not ink: a plain resize
    assert torch.equal(for_model(255 - stroke.to(torch.uint8), plain), resize(255 - stroke.to(torch.uint8), 28))


def test_mnist_reads_the_files_exactly(tmp_path):
    folder = write_mnist(tmp_path / "m", n=30)
    data = DATASETS["mnist"](path=str(folder), val_fraction=0.0).build()
    raw = read_idx(folder / "train-images-idx3-ubyte.gz")
    assert torch.equal(data.train.tensors[0][:, 0], torch.from_numpy(raw.copy()))
    labels = torch.from_numpy(read_idx(folder / "t10k-labels-idx1-ubyte").copy()).long()
    assert torch.equal(data.test.tensors[1], labels)


def test_val_and_test_carved_disjointly(tmp_path):
    """digits: train/val/test are disjoint and together are the whole set (each image once)."""
    from sklearn.datasets import load_digits

    data = DATASETS["digits"]().build()
    n = len(load_digits().target)
    assert len(data.train) + len(data.val) + len(data.test) == n

    def keys(split):
        return {bytes(x.flatten().tolist()) + bytes([int(y)]) for x, y in zip(*split.tensors)}

    tr, va, te = keys(data.train), keys(data.val), keys(data.test)
    assert not (tr & va) and not (tr & te) and not (va & te)


def test_imagefolder_train_val_test_folders(tmp_path):
    for split, per in (("train", 4), ("val", 2), ("test", 3)):
        write_pngs(tmp_path / "set" / split, per_class=per)
    data = DATASETS["imagefolder"](path=str(tmp_path / "set"), image_size=8).build()
    assert (len(data.train), len(data.val), len(data.test)) == (12, 6, 9)


def test_streamed_folder_matches_in_memory(tmp_path):
    """A folder too big for memory streams through a DataLoader; its batches equal the in-memory ones."""
    write_pngs(tmp_path / "imgs", per_class=5, size=8)
    mem = DATASETS["imagefolder"](path=str(tmp_path / "imgs"), image_size=8, val_fraction=0.2).build()
    streamed = DATASETS["imagefolder"](
        path=str(tmp_path / "imgs"), image_size=8, val_fraction=0.2, in_memory_mb=0
    ).build()
    assert isinstance(streamed.train, StreamSplit) and isinstance(mem.train, TensorSplit)
    assert len(streamed.train) == len(mem.train)
    cpu = torch.device("cpu")
    a = list(train_batches(mem.train, 3, range(4), 5, cpu))
    b = list(train_batches(streamed.train, 3, range(4), 5, cpu, workers=0))
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_streamed_folder_honours_test_fraction_class_ids_and_per_class(tmp_path):
    """A streamed folder carves test and val out of the files as the in-memory path does, and keeps the asked
    classes (renumbered) and at most per_class training files of each."""
    write_pngs(tmp_path / "imgs", per_class=10, size=8)
    kw = dict(path=str(tmp_path / "imgs"), image_size=8, val_fraction=0.2, test_fraction=0.1, in_memory_mb=0)
    data = DATASETS["imagefolder"](**kw).build()
    assert (len(data.train), len(data.val), len(data.test)) == (21, 6, 3)
    files = [f for s in (data.train, data.val, data.test) for f, _ in s.dataset.items]
    assert len(set(files)) == 30  # no file in two splits
    some = DATASETS["imagefolder"](**kw, class_ids=[2, 0], per_class=3).build()
    assert some.spec.class_names == ["fox", "cat"]
    labels = [y for _, y in some.train.dataset.items]
    assert sorted(labels) == [0, 0, 0, 1, 1, 1]
    assert all(("fox" in f) == (y == 0) for f, y in some.train.dataset.items + some.test.dataset.items)


def test_user_dataset_file(tmp_path):
    f = tmp_path / "mine.py"
    f.write_text(
        "import torch\nfrom deeprecipe.data import Data, DataSpec, TensorSplit\n"
        "def Make(n=6):\n"
        "    x, y = torch.zeros(n, 1, 4, 4, dtype=torch.uint8), torch.arange(n) % 2\n"
        "    spec = DataSpec(num_classes=2, class_names=['a', 'b'], in_channels=1, image_size=(4, 4),"
        " mean=(0.0,), std=(1.0,))\n"
        "    return Data(spec, TensorSplit(x, y), TensorSplit(x, y))\n"
    )
    cfg = data_config_class(f"{f}:Make")(name=f"{f}:Make", args={"n": 8})
    assert len(cfg.build().train) == 8
    bad = tmp_path / "bad.py"
    bad.write_text("def Make():\n    return 5\n")
    with pytest.raises(DataError, match="must return a deeprecipe.data.Data"):
        data_config_class(f"{bad}:Make")(name=f"{bad}:Make").build()


# ------------------------------------------------------------------------------------------ batching


def test_each_epoch_is_a_permutation():
    n, batch, epochs = 10, 3, 4  # batches straddle epoch boundaries
    stream = torch.cat([step_indices(n, 7, s, batch) for s in range(n * epochs // batch)])
    for e in range(len(stream) // n):
        assert sorted(stream[e * n : (e + 1) * n].tolist()) == list(range(n))
    assert not torch.equal(stream[:n], stream[n : 2 * n])  # a new order each epoch
    assert not torch.equal(step_indices(n, 7, 0, n), step_indices(n, 8, 0, n))  # and per seed


@pytest.mark.parametrize("accum", [1, 2, 4])
def test_micro_batches_concatenate_to_the_big_batch(accum):
    n, batch = 13, 8
    for step in range(5):
        big = step_indices(n, 1, step, batch)
        micro = [step_indices(n, 1, m, batch // accum) for m in _micro_steps(step, step + 1, accum)]
        assert torch.equal(torch.cat(micro), big)


@pytest.mark.parametrize("world", [2, 3])
def test_rank_slices_partition_the_batch(world):
    n, batch = 50, 12
    split = TensorSplit(torch.arange(n), torch.arange(n))
    cpu = torch.device("cpu")
    for step in range(4):
        full = step_indices(n, 0, step, batch)
        parts = [
            next(train_batches(split, 0, range(step, step + 1), batch, cpu, rank=r, world=world))[0]
            for r in range(world)
        ]
        assert sum(len(p) for p in parts) == batch
        assert sorted(torch.cat(parts).tolist()) == sorted(full.tolist())


# ------------------------------------------------------------------------------------------ augmentation


def crop_reference(x: torch.Tensor, pad: int, gen: torch.Generator) -> torch.Tensor:
    """One example at a time: zero-pad, then slice a window at the offsets classes.random_crop draws."""
    B, C, H, W = x.shape
    dy = Draws(gen).randint(2 * pad + 1, B).view(B, 1)
    dx = Draws(gen).randint(2 * pad + 1, B).view(B, 1)
    out = torch.empty_like(x)
    for i in range(B):
        padded = torch.zeros(C, H + 2 * pad, W + 2 * pad, dtype=x.dtype)
        padded[:, pad : pad + H, pad : pad + W] = x[i]
        out[i] = padded[:, dy[i, 0] : dy[i, 0] + H, dx[i, 0] : dx[i, 0] + W]
    return out


@pytest.mark.parametrize("pad,shape", [(1, (16, 1, 8, 8)), (2, (16, 3, 7, 9)), (4, (8, 2, 5, 5))])
def test_random_crop_matches_per_example_reference(pad, shape):
    x = torch.randn(shape)
    got = classes.random_crop(x, pad, Draws(torch.Generator().manual_seed(3)))
    want = crop_reference(x, pad, torch.Generator().manual_seed(3))
    assert torch.equal(got, want)


def test_draws_do_not_depend_on_how_a_step_is_split():
    """An example's augmentation depends on its place in the step's batch only: any split over micro-batches
    and processes gives every example the draws that one big batch gives it."""
    whole = Draws(torch.Generator().manual_seed(7))
    want = (whole.rand(24), whole.randint(5, 24))
    for micro, world in [(24, 1), (8, 1), (12, 2), (6, 3)]:
        for k in range(24 // micro):
            for rank in range(world):
                d = micro_draws(torch.Generator().manual_seed(7), 24, micro, k, rank, world)
                places = torch.arange(k * micro + rank, (k + 1) * micro, world)
                assert torch.equal(d.rand(len(places)), want[0][places])
                assert torch.equal(d.randint(5, len(places)), want[1][places])
    assert set(want[1].tolist()) == set(range(5))  # randint covers [0, high)


def test_random_crop_is_a_window_of_the_padded_image():
    """Independent of how offsets are drawn: every output is some window of the padded input, and offsets vary."""
    pad, x = 2, torch.rand(64, 1, 6, 6) + 1  # > 0 everywhere, so the zero padding is recognisable
    got = classes.random_crop(x, pad, Draws(torch.Generator().manual_seed(0)))
    padded = torch.nn.functional.pad(x, (pad,) * 4)
    offsets = set()
    for i in range(len(x)):
        hits = [
            (dy, dx)
            for dy in range(2 * pad + 1)
            for dx in range(2 * pad + 1)
            if torch.equal(padded[i, :, dy : dy + 6, dx : dx + 6], got[i])
        ]
        assert len(hits) == 1
        offsets.add(hits[0])
    assert len(offsets) > 10  # of 25 possible


def test_flip_gives_the_image_or_its_mirror():
    spec = DataSpec(extra={"flip": True, "crop_pad": 0})
    x = torch.randn(64, 1, 4, 5)
    got = classes.augment(x, spec, Draws(torch.Generator().manual_seed(0)))
    same = [torch.equal(got[i], x[i]) for i in range(64)]
    mirrored = [torch.equal(got[i], x[i].flip(-1)) for i in range(64)]
    assert all(s or m for s, m in zip(same, mirrored))
    assert 10 < sum(mirrored) < 54


def test_random_erasing_blanks_one_rectangle_of_the_drawn_size_in_a_share_of_the_examples():
    """Each erased example differs from its input in exactly one solid rectangle set to 0 (the mean colour after
    normalization), whose area is 2-33% of the image (rounding aside) and aspect within [1/3, 3]; about p of the
    examples are erased; a micro-batch of the step erases its examples as the whole batch does."""
    n, H, W, p = 400, 20, 24, 0.5
    spec = DataSpec(extra={"erase": p})
    x = torch.rand(n, 3, H, W) + 1  # > 0 everywhere, so the blanked pixels are recognisable
    got = classes.augment(x, spec, Draws(torch.Generator().manual_seed(5)))
    erased = 0
    for i in range(n):
        hole = (got[i] == 0).all(0)
        assert torch.equal(got[i][:, ~hole], x[i][:, ~hole])
        if not hole.any():
            continue
        erased += 1
        rows, cols = hole.any(1).nonzero().flatten(), hole.any(0).nonzero().flatten()
        h, w = len(rows), len(cols)
        assert rows[-1] - rows[0] + 1 == h and cols[-1] - cols[0] + 1 == w and hole.sum() == h * w  # one solid box
        assert 0.02 * H * W * 0.7 <= h * w <= 0.33 * H * W * 1.3
        assert 1 / 3 / 1.5 <= h / w <= 3 * 1.5
    assert 0.4 * n < erased < 0.6 * n
    whole = classes.erase_boxes(n, (H, W), p, Draws(torch.Generator().manual_seed(9)))
    for micro, world in [(100, 1), (50, 2)]:
        for k in range(n // micro):
            for rank in range(world):
                d = micro_draws(torch.Generator().manual_seed(9), n, micro, k, rank, world)
                places = torch.arange(k * micro + rank, (k + 1) * micro, world)
                assert torch.equal(classes.erase_boxes(len(places), (H, W), p, d), whole[places])
    assert not classes.erase_boxes(n, (H, W), 0.0, Draws(torch.Generator().manual_seed(1))).any()


def test_prepare_normalizes_and_eval_does_not_augment():
    spec = DataSpec(mean=(0.5,), std=(0.25,), extra={"crop_pad": 2, "flip": True})
    x = torch.randint(0, 256, (8, 1, 6, 6), dtype=torch.uint8)
    y = torch.arange(8)
    family = classify.Classify()
    xe, ye = family.prepare((x, y), spec, None)
    assert torch.allclose(xe, (x.float() / 255 - 0.5) / 0.25)
    assert torch.equal(ye, y)
    xt, _ = family.prepare((x, y), spec, Draws(torch.Generator().manual_seed(0)))
    assert not torch.equal(xt, xe)


def test_a_finished_run_is_scored_on_test_else_val_else_train():
    spec = DataSpec()
    assert Data(spec, "train", "val", "test").final_split() == "test"
    assert Data(spec, "train", "val").final_split() == "val"
    assert Data(spec, "train", None, "test").final_split() == "test"
    assert Data(spec, "train").final_split() == "train"


def test_scenes_look_renders_the_same_scenes_in_that_weather_and_light():
    from deeprecipe.data.scenes import ScenesData

    sizes = dict(size=(32, 32), train_size=4, val_size=0, test_size=0)
    day, night = (ScenesData(look=look, **sizes).build().train.tensors for look in ("day", "night"))
    assert torch.equal(day[1], night[1])  # the same scenes: the same label maps
    assert night[0].float().mean() < 0.6 * day[0].float().mean()  # night is darker than day, image for image
