"""Stage 1 of the recipe, become one with the data: files, labels, balance, duplicates, leakage, the batch.

Exact duplicates are found by hashing every example (or every file's bytes for data streamed from disk).
Near duplicates are images whose mean-centred pixels have cosine similarity >= NEAR (0.995) at full
resolution; candidates come from 16x16 thumbnails, on an even sample of the splits so the scan stays fast
on 60,000 images. At 0.995, digits and Fashion-MNIST have no near duplicate across train/test, while a test
image copied into train with a little noise or a brightness shift is found.
"""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import torch
import torch.nn.functional as F

from deeprecipe.checks.core import Ctx, Verdict, labels_of
from deeprecipe.data.core import StreamSplit, TensorSplit

NEAR = 0.995
SAMPLE_TRAIN, SAMPLE_EVAL = 10_000, 1_000


# ---------------------------------------------------------------------------------------------- files


def list_files(data_cfg) -> list[str] | None:
    """The files a data set reads, when it reads files: `files()` on the data config (a family's hook), else
    the image folder / CSV layouts of data/images.py. None: the data set is not made of files."""
    from deeprecipe.data.image_ops import EXTS
    from deeprecipe.data.images import CSVData

    if hasattr(data_cfg, "files"):
        return [str(p) for p in data_cfg.files()]
    path = getattr(data_cfg, "path", "")
    if isinstance(path, str) and path and Path(path).is_dir():  # class folders, Cityscapes, mask folders, ...
        found = [str(f) for f in sorted(Path(path).rglob("*")) if f.is_file() and f.suffix.lower() in EXTS]
        return found or None
    if isinstance(data_cfg, CSVData):
        p = Path(data_cfg.path)
        if not p.is_file():
            return None
        with open(p, newline="", encoding="utf-8") as f:
            rows = [r for r in csv.reader(f) if r and r[0].strip().lower() not in ("path", "file", "filename")]
        return [str(p.parent / r[0].strip()) for r in rows]
    return None


def files(ctx: Ctx) -> Verdict:
    """Every file decodes (an even sample of up to max_files of them)."""
    from deeprecipe.data.image_ops import read

    paths = list_files(ctx.cfg.data)
    if paths is None:
        return Verdict("files", "skip", advice="the data set is not read from files (or data.path is missing)")
    step = max(1, len(paths) // ctx.max_files)
    sample = paths[::step]
    check = getattr(ctx.cfg.data, "check_file", None) or read
    bad = []
    for p in sample:
        try:
            check(p)
        except Exception as e:  # a missing, empty, truncated or foreign file
            bad.append(f"{p} ({str(e).split(':')[0] if str(e) else type(e).__name__})")
    scanned = f"{len(sample)} of {len(paths)} files" if step > 1 else f"{len(paths)} files"
    if bad:
        return Verdict(
            "files",
            "fail",
            f"{len(bad)} unreadable in {scanned}: {', '.join(bad[:3])}",
            "0",
            "remove or replace these files",
            len(bad),
        )
    return Verdict("files", "pass", f"0 unreadable in {scanned}", "0", "", 0)


# ---------------------------------------------------------------------------------------------- labels


def _num_labels(ctx: Ctx) -> int:
    return ctx.spec.num_classes or ctx.spec.vocab_size


def labels(ctx: Ctx) -> Verdict:
    """Every label id lies in 0..C-1 (or is the family's IGNORE_INDEX), in every split."""
    C, ignore = _num_labels(ctx), ctx.family.IGNORE_INDEX
    if not C:
        return Verdict("labels", "skip", advice="the data spec names no classes or vocabulary")
    found, problems = False, []
    for name in ("train", "val", "test"):
        y = labels_of(getattr(ctx.data, name))
        if y is None:
            continue
        found = True
        bad = ((y < 0) | (y >= C)) & (y != ignore if ignore is not None else True)
        if bad.any():
            problems.append(f"{name}: {int(bad.sum())} (e.g. {int(y[bad][0])})")
    if not found:
        return Verdict("labels", "skip", advice="the splits hold no integer labels the scan can read")
    if problems:
        return Verdict(
            "labels",
            "fail",
            "; ".join(problems),
            f"0..{C - 1}",
            "label ids out of range: fix the label mapping (or the number of classes)",
            len(problems),
        )
    return Verdict("labels", "pass", "all in range", f"0..{C - 1}", "", 0)


def balance(ctx: Ctx) -> Verdict:
    """Class counts of the training split (pixels for dense labels); a bar chart in plots/class_balance.png."""
    C = ctx.spec.num_classes
    y = labels_of(ctx.data.train)
    if not C or y is None:
        return Verdict("balance", "skip", advice="no class labels to count")
    per_example = y.ndim == 1  # a class per example, not per pixel (before the mask below flattens y)
    y = y[(y >= 0) & (y < C)]
    counts = torch.bincount(y.flatten(), minlength=C)[:C].float()
    from deeprecipe.checks.plots import bars

    path = ctx.plot_path("class_balance.png")
    bars(counts.tolist(), ctx.spec.class_names or [str(i) for i in range(C)], path, "training examples per class")
    missing = [ctx.spec.class_names[i] if ctx.spec.class_names else str(i) for i in (counts == 0).nonzero().flatten()]
    ratio = float(counts.max() / counts.clamp_min(1).min())
    v = Verdict("balance", "pass", f"max/min = {ratio:.2f}", "<= 3", "", ratio, [str(path.relative_to(ctx.out))])
    if missing:
        v.status = "fail" if per_example else "warn"
        v.measured = f"{len(missing)} classes never seen in train ({', '.join(missing[:5])})"
        v.advice = "a class the net never sees cannot be learned: check the label mapping and the split"
    elif ratio > 3:
        v.status, v.advice = (
            "warn",
            (
                "imbalanced: set the head bias from the priors (init_prior), weight the loss "
                "or resample, and watch per-class recall"
            ),
        )
    return v


# ---------------------------------------------------------------------------------------------- duplicates


def _file_hash(path: str) -> bytes:
    """A file's bytes, or a frame folder's frames in order, hashed."""
    h, p = hashlib.blake2b(digest_size=12), Path(path)
    for f in sorted(p.iterdir()) if p.is_dir() else [p]:
        if f.is_file():
            h.update(f.read_bytes())
    return h.digest()


def _keys(split) -> tuple[list[bytes], torch.Tensor | None] | None:
    """One hash per example (its bytes) with its label, or for a streamed split one per source file (an image
    file, a video however many clips it gives) with the file's label. None: the split cannot be hashed."""
    if isinstance(split, TensorSplit):
        x = split.tensors[0].cpu().contiguous()
        rows = x.view(len(x), -1).numpy()
        return [hashlib.blake2b(r.tobytes(), digest_size=12).digest() for r in rows], labels_of(split)
    sources = split.sources() if isinstance(split, StreamSplit) else None
    if sources is None:
        return None
    return [_file_hash(p) for p, _ in sources], torch.tensor([int(lab) for _, lab in sources], dtype=torch.long)


def _images(split) -> torch.Tensor | None:
    if isinstance(split, TensorSplit) and split.tensors[0].ndim == 4:
        return split.tensors[0]
    return None


def _centred(x: torch.Tensor, size: int = 0) -> torch.Tensor:
    x = x.float().cpu()
    if size:
        x = x.mean(1, keepdim=True)
        if x.shape[-1] > size:
            x = F.adaptive_avg_pool2d(x, size)
    t = x.flatten(1)
    t = t - t.mean(1, keepdim=True)
    return t / t.norm(dim=1, keepdim=True).clamp_min(1e-6)


def _even(n: int, k: int) -> torch.Tensor:
    return torch.linspace(0, n - 1, min(n, k)).round().long().unique()


def near_pairs(queries: torch.Tensor, pool: torch.Tensor, same: bool = False) -> torch.Tensor:
    """For each query image, whether it has a near duplicate in `pool` (excluding itself when same=True)."""
    qt, pt = _centred(queries, 16), _centred(pool, 16)
    hit = torch.zeros(len(queries), dtype=torch.bool)
    for i in range(0, len(queries), 512):
        s = qt[i : i + 512] @ pt.T  # thumbnails: the candidate is the nearest one
        if same:
            s[torch.arange(len(s)), torch.arange(i, i + len(s))] = -2
        j = s.argmax(1)
        full = (_centred(queries[i : i + 512]) * _centred(pool[j])).sum(1)  # confirm at full resolution
        hit[i : i + 512] = full >= NEAR
    return hit


def duplicates(ctx: Ctx) -> Verdict:
    """Exact duplicates inside the training split, the same example with two labels, and near duplicates."""
    train = ctx.data.train
    hashed = _keys(train)
    if hashed is None:
        return Verdict("duplicates", "skip", advice="the training split cannot be hashed")
    keys, y = hashed
    first: dict[bytes, int] = {}
    dups, conflicts = 0, 0
    for i, k in enumerate(keys):
        if k in first:
            dups += 1
            if y is not None and y.ndim == 1 and y[i] != y[first[k]]:
                conflicts += 1
        else:
            first[k] = i
    near_txt, near_frac = "", 0.0
    imgs = _images(train)
    if imgs is not None:
        idx = _even(len(imgs), 2000)
        near_frac = float(near_pairs(imgs[idx], imgs[idx], same=True).float().mean())
        near_txt = f", {near_frac:.1%} near duplicates (sample of {len(idx)})"
    frac = dups / max(1, len(keys))
    measured = f"{dups} exact ({frac:.1%}), {conflicts} with conflicting labels{near_txt}"
    if frac >= 0.1 or conflicts > 0.01 * len(keys):
        return Verdict(
            "duplicates",
            "fail",
            measured,
            "0",
            "many copies or contradictory labels: deduplicate "
            "the training set (a file listed twice, an export run twice)",
            frac,
        )
    if dups or conflicts or near_frac > 0.02:
        return Verdict(
            "duplicates",
            "warn",
            measured,
            "0",
            "duplicates weigh some examples more and inflate validation when they cross splits: consider removing them",
            frac,
        )
    return Verdict("duplicates", "pass", measured, "0", "", frac)


def leakage(ctx: Ctx) -> Verdict:
    """Examples of val/test that also appear in train, exactly or nearly: the metric would be a lie."""
    d = ctx.data
    thashed = _keys(d.train)
    if thashed is None:
        return Verdict("leakage", "skip", advice="the training split cannot be hashed")
    tset, timgs = set(thashed[0]), _images(d.train)
    parts, worst = [], 0.0
    for name in ("val", "test"):
        s = getattr(d, name)
        hashed = _keys(s) if s is not None and len(s) else None
        if hashed is None:
            continue
        keys = hashed[0]
        exact = torch.tensor([k in tset for k in keys])
        leaked, n = int(exact.sum()), len(keys)
        imgs = _images(s)
        if imgs is not None and timgs is not None:
            qi = _even(len(imgs), SAMPLE_EVAL)
            near = near_pairs(imgs[qi], timgs[_even(len(timgs), SAMPLE_TRAIN)]) & ~exact[qi]
            # the near duplicates of the sample, scaled to the whole split
            leaked += int(round(float(near.float().mean()) * n))
        worst = max(worst, leaked / n)
        parts.append(f"{name}: {leaked} of {n}")
    if not parts:
        return Verdict("leakage", "skip", advice="no val/test split to compare with train")
    measured = "; ".join(parts) + " also in train"
    if worst > 0.01:
        return Verdict(
            "leakage",
            "fail",
            measured,
            "0",
            "evaluation examples are in the training set: split "
            "by source (person, video, file), deduplicate across splits",
            worst,
        )
    if worst > 0:
        return Verdict("leakage", "warn", measured, "0", "a few evaluation examples also appear in train", worst)
    return Verdict("leakage", "pass", measured, "0", "", worst)


# ---------------------------------------------------------------------------------------------- the batch


def batch(ctx: Ctx) -> Verdict:
    """Pictures of examples and of the step-0 batch exactly as it enters the net (augmented, normalized, then
    undone for the eye), and the statistics of that input: a float input should be near mean 0, std 1."""
    from deeprecipe.engine import plots

    b = ctx.train_batch(0)
    shown = []
    for name, bb, title in (
        ("examples", ctx.train_batch(0, augment=False), "training examples (no augmentation)"),
        ("batch", b, "step-0 batch as it enters the net (de-normalized)"),
    ):
        view = ctx.family.show_batch(tuple(t[:32] if torch.is_tensor(t) else t for t in bb), ctx.spec)
        if isinstance(view, str):
            path = ctx.plot_path(f"{name}.txt")
            path.write_text(view)
        elif view is not None:
            path = ctx.plot_path(f"{name}.png")
            imgs, caps = view
            plots.image_grid(imgs.float().cpu(), caps, path, title)
        else:
            continue
        shown.append(str(path.relative_to(ctx.out)))
    x = ctx.get_input(b)
    if not x.is_floating_point():
        return Verdict(
            "batch",
            "pass" if shown else "skip",
            "integer input (ids)",
            "",
            "look at the pictures" if shown else "no picture for this task (show_batch)",
            None,
            shown,
        )
    x = x.float()
    mean, std = float(x.mean()), float(x.std())
    measured, expected = f"input mean {mean:.2f}, std {std:.2f}", "mean ~0, std ~1"
    if abs(mean) > 5 or not 0.05 <= std <= 20:
        return Verdict(
            "batch",
            "fail",
            measured,
            expected,
            "the input is not normalized (or normalized twice): check prepare/normalize",
            std,
            shown,
        )
    weights = ctx.spec.extra.get("inputs", {}).get("weights")  # normalized as pretrained weights ask, on purpose
    if weights and (abs(mean) > 1 or not 0.3 <= std <= 3):
        expected = f"mean/std of {weights}'s own images (models/pretrained.py), not this data's"
        return Verdict("batch", "pass", measured, expected, "look at the pictures: labels must match", std, shown)
    if abs(mean) > 1 or not 0.3 <= std <= 3:
        return Verdict(
            "batch",
            "warn",
            measured,
            expected,
            "the input is far from zero mean, unit variance: check the normalization statistics",
            std,
            shown,
        )
    return Verdict(
        "batch", "pass", measured, expected, "look at the pictures: labels must match what you see", std, shown
    )


def configured_batch(ctx: Ctx) -> Verdict:
    """`batch` for a family whose prepare needs options that check_config hands it (the self-supervised ones: the
    checks prepare batches before they build a model)."""
    ctx.family.check_config(ctx.cfg)
    return batch(ctx)
