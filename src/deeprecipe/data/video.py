"""Video classification data: generated moving-digit clips, and folders of videos or frame images.

A training example is a clip uint8 (C, T, H, W) with a label; an evaluation example of a real video set is
`eval_clips` clips (K, C, T, H, W) spread evenly over the video, whose predictions the task averages.

`moving-digits`: one of scikit-learn's 8x8 digits (bundled, no download) moves over a noisy canvas, and the
class is the motion (left, right, up, down, rotate cw/ccw, zoom in/out, bounce, still). Clip i of a split is
a pure function of its number (train 0.., val 10M.., test 20M.., shifted by `seed`); all clips are drawn
at once with affine grids, so thousands take a second or two.

`videofolder`: `path`/<class>/<video file> (decoded with PyAV) or `path`/<class>/<folder of frame images>,
optionally with UCF101-style split lists (classInd.txt, trainlistNN.txt, testlistNN.txt) in `split_dir`.
Every video is probed once when the data set is built: unreadable, empty or undecodable files and videos
shorter than a clip are skipped and counted (or, with `strict`, stop the build naming the file).
Training clips are taken every `clip_step` frames, so the sampled batches depend only on (seed, step).
"""

from __future__ import annotations

import math
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from deeprecipe.config import ranged
from deeprecipe.data.core import Data, DataError, DataSpec, StreamSplit, TensorSplit
from deeprecipe.data.image_ops import EXTS, read
from deeprecipe.data.scenes import SPLIT_BASE, hash_ints, uniform

MOTIONS = ["left", "right", "up", "down", "rotate-cw", "rotate-ccw", "zoom-in", "zoom-out", "bounce", "still"]
SHOW_BAD = 10  # skipped videos named in the note (the rest counted)
VIDEO_EXTS = {".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v", ".mpg", ".mpeg", ".ogv", ".gif"}


# ------------------------------------------------------------------------------------------ moving digits


def render_clips(numbers: torch.Tensor, frames: int, size: int, sprites: torch.Tensor):
    """Clip numbers (N,) -> clips uint8 (N, 1, T, S, S) and motion labels (N,)."""
    N, T, dev = len(numbers), frames, numbers.device
    key = hash_ints(numbers.long()).view(N, 1)

    def r(k, lo=0.0, hi=1.0):  # (N, 1)
        return lo + (hi - lo) * uniform(key, k)

    label = (uniform(key, 0) * len(MOTIONS)).long().clamp(max=len(MOTIONS) - 1).view(N)
    tau = torch.linspace(0, 1, T, device=dev).view(1, T)  # time, 0 -> 1 over the clip
    k = sprites.shape[-1] / size  # sprite half-size in canvas units ([-1, 1] spans the canvas)
    s0 = r(1, 0.8, 1.05)
    dist = r(2, 0.5, 0.9)  # travel of the translations, in canvas units
    turn = r(3, 0.5, 1.0) * math.pi  # rotation over the clip
    zoom = r(4, 1.5, 1.9)
    one = torch.ones(N, T, device=dev)
    is_ = lambda name: (label == MOTIONS.index(name)).view(N, 1)  # noqa: E731
    dx = (is_("right").float() - is_("left").float()) * dist * tau
    dy = (is_("down").float() - is_("up").float()) * dist * tau
    dy = dy - is_("bounce") * 0.45 * (torch.sin(math.pi * 2 * tau + r(5) * 0.5)).abs()
    angle = (is_("rotate-cw").float() - is_("rotate-ccw").float()) * turn * tau
    scale = torch.where(
        is_("zoom-in"), 1 + (zoom - 1) * tau, torch.where(is_("zoom-out"), zoom - (zoom - 1) * tau, one)
    )
    scale = scale * s0 * torch.where(is_("zoom-in") | is_("zoom-out"), 0.7, 1.0)
    # start so that the whole path stays inside the canvas: the path spans [min, max] of dx, dy
    reach = k * s0 * 1.3
    lo_x, hi_x = -1 + reach - dx.amin(1, keepdim=True), 1 - reach - dx.amax(1, keepdim=True)
    lo_y, hi_y = -1 + reach - dy.amin(1, keepdim=True), 1 - reach - dy.amax(1, keepdim=True)
    px = lo_x + (hi_x - lo_x).clamp_min(0) * r(6) + dx
    py = lo_y + (hi_y - lo_y).clamp_min(0) * r(7) + dy
    # canvas point u maps to sprite point R(-angle) (u - p) / (scale * k): one affine grid per frame
    cos, sin = torch.cos(angle) / (scale * k), torch.sin(angle) / (scale * k)
    theta = torch.stack(
        [torch.stack([cos, sin, -(cos * px + sin * py)], -1), torch.stack([-sin, cos, sin * px - cos * py], -1)], -2
    ).view(N * T, 2, 3)
    idx = (hash_ints(key.view(N) + 77) % len(sprites)).long()
    src = sprites[idx].to(dev).repeat_interleave(T, 0)  # (N*T, 1, s, s)
    grid = F.affine_grid(theta, [N * T, 1, size, size], align_corners=False)
    digit = F.grid_sample(src, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    digit = digit.view(N, 1, T, size, size)
    bank = torch.rand(16, 1, 1, size, size, generator=torch.Generator().manual_seed(5)).to(dev)  # noise, per clip
    noise = bank[(key.view(N) % 16).long()] * r(8, 0.0, 0.35).view(N, 1, 1, 1, 1)
    clip = (digit * r(9, 0.6, 1.0).view(N, 1, 1, 1, 1) + noise).clamp(0, 1)
    return (clip * 255).round().to(torch.uint8), label


def digit_sprites(size: int = 14) -> torch.Tensor:
    """scikit-learn's 1,797 8x8 digits, upsampled to size x size floats in [0, 1]: (1797, 1, size, size)."""
    from sklearn.datasets import load_digits

    d = torch.tensor(load_digits().images, dtype=torch.float32)[:, None] / 16
    return F.interpolate(d, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)


@dataclass
class MovingDigitsData:
    """Generated clips where the class is the motion of a digit; see the module docstring."""

    name: str = "moving-digits"
    frames: int = ranged(16, "> 0")  # T
    size: int = ranged(32, "> 0")  # frame side in pixels
    sprite: int = 14  # digit side in pixels
    train_size: int = ranged(6000, "> 0")
    val_size: int = ranged(500, ">= 0")
    test_size: int = ranged(1000, ">= 0")
    seed: int = 0  # shifts every split's range of clip numbers
    chunk: int = 512

    def build(self) -> Data:
        sprites = digit_sprites(self.sprite)
        splits = {}
        for name, n in (("train", self.train_size), ("val", self.val_size), ("test", self.test_size)):
            first = SPLIT_BASE[name] + self.seed * 30_000_000
            nums = torch.arange(first, first + n)
            parts = [
                render_clips(nums[i : i + self.chunk], self.frames, self.size, sprites) for i in range(0, n, self.chunk)
            ]
            splits[name] = (
                TensorSplit(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])) if n else None
            )
        x = splits["train"].tensors[0][:256].float() / 255
        spec = DataSpec(
            num_classes=len(MOTIONS),
            class_names=list(MOTIONS),
            in_channels=1,
            image_size=(self.size, self.size),
            mean=(x.mean().item(),),
            std=(x.std().item(),),
            extra={"frames": self.frames, "flip": False, "crop_pad": 0, "eval_clips": 1},
        )
        return Data(spec, splits["train"], splits["val"], splits["test"])


# ------------------------------------------------------------------------------------------ real videos


def _av():
    try:
        import av
    except ImportError:
        raise DataError("reading video files needs PyAV: pip install av") from None
    return av


def probe(path: str) -> int:
    """Number of frames of a video file or frame folder; raises DataError saying why it cannot be used."""
    p = Path(path)
    if p.is_dir():
        return sum(1 for f in p.iterdir() if f.suffix.lower() in EXTS)
    if not p.is_file():
        raise DataError(f"{path}: file not found")
    if p.stat().st_size == 0:
        raise DataError(f"{path}: empty file")
    av = _av()
    try:
        with av.open(path) as c:
            if not c.streams.video:
                raise DataError(f"{path}: no video stream")
            stream = c.streams.video[0]
            if next(c.decode(stream), None) is None:  # catches missing decoders and broken headers early
                raise DataError(f"{path}: no decodable frame")
            n = stream.frames
            if n <= 0:  # containers without a frame count: count the packets
                c.seek(0)
                n = sum(1 for pkt in c.demux(stream) if pkt.size)
            return n
    except DataError:
        raise
    except Exception as e:  # av.error.* (invalid data, unsupported codec, ...)
        why = str(e).splitlines()[0].replace(f": '{path}'", "") if str(e) else ""  # PyAV repeats the path
        raise DataError(f"{path}: cannot decode ({type(e).__name__}: {why})") from None


def read_frames(path: str, indices: list[int], channels: int, size: int) -> torch.Tensor:
    """The frames at `indices` (ascending may repeat) -> uint8 (C, len, size, size)."""
    p, want = Path(path), sorted(set(indices))
    got: dict[int, torch.Tensor] = {}
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix.lower() in EXTS)
        for i in want:
            if i < len(files):
                got[i] = read(files[i], channels, 0)
    else:
        av = _av()
        fmt = "gray" if channels == 1 else "rgb24"
        try:
            with av.open(path) as c:
                stream = c.streams.video[0]
                stream.thread_type = "AUTO"
                last, needed = want[-1], set(want)
                for i, frame in enumerate(c.decode(stream)):
                    if i in needed:
                        a = torch.from_numpy(frame.to_ndarray(format=fmt))
                        got[i] = a[None] if a.ndim == 2 else a.permute(2, 0, 1)
                    if i >= last:
                        break
        except Exception as e:
            if not got:
                raise DataError(f"{path}: decoding failed ({type(e).__name__}: {e})") from None
    if not got:
        raise DataError(f"{path}: no frames could be read")
    have = sorted(got)
    # a frame count from the container can be a little off: use the nearest frame that was read
    frames = [got[i] if i in got else got[min(have, key=lambda h: abs(h - i))] for i in indices]
    x = torch.stack(frames).float()  # (T, C, h, w)
    if tuple(x.shape[-2:]) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8).permute(1, 0, 2, 3).contiguous()


def clip_indices(start: int, frames: int, stride: int, length: int) -> list[int]:
    """Frame numbers of a clip; a video shorter than the clip loops back to its start."""
    return [(start + t * stride) % length for t in range(frames)]


def eval_starts(length: int, span: int, k: int) -> list[int]:
    """k clip starts spread evenly over a video (all 0 when the video is no longer than a clip)."""
    room = max(length - span, 0)
    return [round(room * (i + 0.5) / k) for i in range(k)] if room else [0] * k


class VideoClips(Dataset):
    """Items are (clip (C, T, S, S), label) for training, or (clips (K, C, T, S, S), label) for evaluation."""

    def __init__(
        self,
        videos: list[tuple[str, int, int]],
        frames: int,
        stride: int,
        size: int,
        channels: int,
        clip_step: int = 0,
        eval_clips: int = 0,
    ):
        self.videos, self.frames, self.stride, self.size, self.channels = videos, frames, stride, size, channels
        self.eval_clips = eval_clips
        span = (frames - 1) * stride + 1
        step = clip_step or span
        # training: every clip start of every video, so an index names one clip exactly
        self.items = [(v, s) for v, (_, _, n) in enumerate(videos) for s in range(0, max(n - span, 0) + 1, step)]
        if eval_clips:
            self.items = [(v, -1) for v in range(len(videos))]

    def __len__(self) -> int:
        return len(self.items)

    def labels(self) -> list[int]:
        """The label of every item (a clip, or a video's K clips) without decoding."""
        return [self.videos[v][1] for v, _ in self.items]

    def sources(self) -> list[tuple[str, int]]:
        """(video file or frame folder, label) of each video, once however many clips it gives."""
        return [(path, label) for path, label, _ in self.videos]

    def __getitem__(self, i: int):
        v, start = self.items[i]
        path, label, n = self.videos[v]
        span = (self.frames - 1) * self.stride + 1
        if self.eval_clips:
            starts = eval_starts(n, span, self.eval_clips)
            idx = [j for s in starts for j in clip_indices(s, self.frames, self.stride, n)]
            x = read_frames(path, idx, self.channels, self.size)  # (C, K*T, S, S)
            x = x.view(x.shape[0], self.eval_clips, self.frames, self.size, self.size).transpose(0, 1)
            return x.contiguous(), torch.tensor(label)
        return read_frames(
            path, clip_indices(start, self.frames, self.stride, n), self.channels, self.size
        ), torch.tensor(label)


@dataclass
class VideoFolderData:
    """Class-per-folder videos or frame folders, optionally with UCF101 split lists; see the module docstring."""

    name: str = "videofolder"
    path: str = ""
    split_dir: str = ""  # folder with classInd.txt, trainlist0N.txt, testlist0N.txt (UCF101 layout); "" = none
    split: int = 1  # which of the split lists
    frames: int = ranged(16, "> 0")  # T frames per clip
    stride: int = ranged(2, "> 0")  # take every stride-th frame
    clip_step: int = 0  # frames between training clip starts (0: one clip length, no overlap)
    eval_clips: int = ranged(5, "> 0")  # clips per video averaged at evaluation
    size: int = ranged(112, "> 0")  # frames are resized to size x size
    channels: int = 3
    short: Literal["skip", "loop", "error"] = "skip"  # videos shorter than a clip: skip (counted) | loop frames | error
    strict: bool = False  # stop at the first unreadable video instead of skipping it
    val_fraction: float = ranged(0.1, "[0, 1)")  # of the training videos, held out for validation
    flip: bool = True  # augmentation: random horizontal flip (the same for every frame of a clip)
    crop_pad: int = ranged(8, ">= 0")  # augmentation: random shift by up to this many pixels
    workers: int = 8  # threads probing the videos

    def listing(self) -> tuple[list[str], list[tuple[str, int]], list[tuple[str, int]]]:
        """(classes, train videos, test videos) as (path, label): the class folders or the split lists."""
        root = Path(self.path)
        if not self.path or not root.is_dir():
            raise DataError(f"data.path={self.path!r} is not a folder of class folders of videos")
        if self.split_dir:
            return self.read_lists(root, Path(self.split_dir))
        classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
        train = [
            (str(f), i)
            for i, c in enumerate(classes)
            for f in sorted((root / c).iterdir())
            if f.suffix.lower() in VIDEO_EXTS or (f.is_dir() and any(g.suffix.lower() in EXTS for g in f.iterdir()))
        ]
        return classes, train, []

    def files(self) -> list[str]:
        """Every video the data set lists (the `files` check probes each with check_file)."""
        _, train, test = self.listing()
        return [p for p, _ in train + test]

    def check_file(self, path: str) -> None:
        probe(path)

    def build(self) -> Data:
        classes, train, test = self.listing()
        if not train:
            root = Path(self.path)
            raise DataError(f"{root}: no videos found (expected {root}/<class>/<video files or frame folders>)")
        train, test = self.check(train), self.check(test)
        perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(0)).tolist()
        k = max(1, int(len(train) * self.val_fraction)) if len(train) > 1 and self.val_fraction > 0 else 0
        val, train = [train[i] for i in perm[:k]], [train[i] for i in sorted(perm[k:])]
        args = (self.frames, self.stride, self.size, self.channels)
        spec = DataSpec(
            num_classes=len(classes),
            class_names=classes,
            in_channels=self.channels,
            image_size=(self.size, self.size),
            mean=(0.45,) * self.channels,
            std=(0.225,) * self.channels,
            extra={
                "frames": self.frames,
                "stride": self.stride,
                "flip": self.flip,
                "crop_pad": self.crop_pad,
                "eval_clips": self.eval_clips,
            },
        )

        def mk(videos, eval_clips):
            return StreamSplit(VideoClips(videos, *args, self.clip_step, eval_clips)) if videos else None

        return Data(spec, mk(train, 0), mk(val, self.eval_clips), mk(test, self.eval_clips))

    def read_lists(self, root: Path, folder: Path):
        def lines(name):
            p = folder / name
            if not p.is_file():
                raise DataError(f"{p} not found (data.split_dir needs classInd.txt, trainlist0N.txt, testlist0N.txt)")
            return [ln.split() for ln in p.read_text().splitlines() if ln.strip()]

        ind = {c: int(i) - 1 for i, c in lines("classInd.txt")}
        classes = [c for c, _ in sorted(ind.items(), key=lambda kv: kv[1])]

        def items(name):
            out = []
            for row in lines(name):
                cls = row[0].split("/")[0]
                if cls not in ind:
                    raise DataError(f"{folder / name}: class '{cls}' of {row[0]} is not in classInd.txt")
                out.append((str(root / row[0]), ind[cls]))
            return out

        return classes, items(f"trainlist{self.split:02d}.txt"), items(f"testlist{self.split:02d}.txt")

    def check(self, items: list[tuple[str, int]]) -> list[tuple[str, int, int]]:
        """(path, label) -> (path, label, frames) for the usable videos; the rest skipped and counted."""
        span = (self.frames - 1) * self.stride + 1

        def one(item):
            try:
                if not os.path.exists(item[0]):
                    raise DataError(f"{item[0]}: file not found")
                n = probe(item[0])
                if n == 0:
                    raise DataError(f"{item[0]}: no frames")
                if n < span and self.short != "loop":
                    raise DataError(
                        f"{item[0]}: {n} frames, shorter than a clip of {self.frames} frames at "
                        f"stride {self.stride} ({span}); set data.short=loop to use it"
                    )
                return (item[0], item[1], n), None
            except DataError as e:
                return None, e

        with ThreadPoolExecutor(max(1, self.workers)) as pool:
            results = list(pool.map(one, items))
        bad = [e for _, e in results if e is not None]
        short = [e for e in bad if "shorter than a clip" in str(e)]
        if self.strict and bad:
            raise bad[0]
        if self.short == "error" and short:
            raise short[0]
        ok = [r for r, _ in results if r is not None]
        if items and not ok:
            raise DataError(f"none of the {len(items)} videos could be used; first problem: {bad[0]}")
        if bad:  # every skipped file by name (the first few, then a count), with why
            shown = "; ".join(str(e) for e in bad[:SHOW_BAD]) + (
                f"; and {len(bad) - SHOW_BAD} more" if len(bad) > SHOW_BAD else ""
            )
            warnings.warn(f"skipped {len(bad)} of {len(items)} videos: {shown}", stacklevel=2)
        return ok
