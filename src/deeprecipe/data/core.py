"""What every data set hands the engine: a spec for the model, and splits that give batches by index.

The batch of training step s is a pure function of (seed, s): the stream of examples is the concatenation
of per-epoch permutations, each seeded by (seed, epoch), and step s takes the slice [s*B, (s+1)*B). So a
resumed run only needs the step number to see exactly the data an uninterrupted run would have seen, and
N processes that each take every N-th index of the global batch see together what one process sees.

Targets whose number differs between examples (the boxes of a detection data set) are held padded:
`pad_targets` makes (N, M, 4) boxes and (N, M) labels with label -1 on the padding (M: the most any example
has), so a split stays a TensorSplit of equal-sized tensors and batches by indexing like any other;
`trim_targets` drops the padding columns no example of a batch uses.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset

from deeprecipe.core import DataError, DataSpec


class TensorSplit:
    """A split held as tensors: the first dimension indexes examples. Moved to the device once."""

    def __init__(self, *tensors: torch.Tensor):
        n = {len(t) for t in tensors}
        if len(n) != 1:
            raise DataError(f"split tensors disagree on the number of examples: {sorted(n)}")
        self.tensors = tensors

    def __len__(self) -> int:
        return len(self.tensors[0])

    def to(self, device: torch.device | str) -> TensorSplit:
        self.tensors = tuple(t.to(device) for t in self.tensors)
        return self

    def take(self, idx: torch.Tensor) -> tuple[torch.Tensor, ...]:
        idx = idx.to(self.tensors[0].device)
        return tuple(t[idx] for t in self.tensors)


class StreamSplit:
    """A split read from disk example by example (a torch Dataset returning tuples of tensors). A dataset may
    also say, without decoding anything, every example's label (`labels()`) and the files it reads with their
    labels (`sources()`: one entry per distinct file, e.g. one per video for many clips); the checks use them."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def labels(self) -> torch.Tensor | None:
        """(N,) labels of the examples, or None when the dataset cannot tell without decoding."""
        known = getattr(self.dataset, "labels", None)
        return torch.tensor([int(v) for v in known()], dtype=torch.long) if known else None

    def sources(self) -> list[tuple[str, int]] | None:
        """(file or frame folder, label) of each distinct source, or None when the dataset does not say."""
        known = getattr(self.dataset, "sources", None)
        return list(known()) if known else None

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def to(self, device: torch.device | str) -> StreamSplit:
        return self

    def take(self, idx: torch.Tensor) -> tuple[torch.Tensor, ...]:
        items = [self.dataset[int(i)] for i in idx]
        return tuple(torch.stack(col) for col in zip(*items))


Split = TensorSplit | StreamSplit


def pad_targets(
    boxes: list[torch.Tensor], labels: list[torch.Tensor], width: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example boxes (k_i, 4) and labels (k_i,) -> boxes float (N, M, 4) and labels long (N, M), M =
    max(k_i, width), label -1 (and box 0) on the padding; the real entries come first in each row."""
    m = max([width, *(len(b) for b in boxes)])
    out_b = torch.zeros(len(boxes), m, 4)
    out_y = torch.full((len(boxes), m), -1, dtype=torch.long)
    for i, (b, y) in enumerate(zip(boxes, labels)):
        if len(b) != len(y):
            raise DataError(f"example {i}: {len(b)} boxes but {len(y)} labels")
        out_b[i, : len(b)], out_y[i, : len(y)] = b.float(), y.long()
    return out_b, out_y


def trim_targets(boxes: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the trailing padding columns of padded targets (see pad_targets) that no example of the batch uses
    (label -1; labels below it are boxes, data/detect.py ignored)."""
    used = (labels != -1).any(0).nonzero()
    m = int(used[-1]) + 1 if len(used) else 0
    return boxes[:, :m], labels[:, :m]


@dataclass
class Data:
    spec: DataSpec
    train: Split
    val: Split | None = None
    test: Split | None = None

    def split(self, name: str) -> Split:
        s = getattr(self, name)
        if s is None or len(s) == 0:
            raise DataError(f"this data set has no '{name}' split")
        return s

    def final_split(self) -> str:
        """The split a finished run is scored on: test, else val, else train."""
        return "test" if self.test is not None else "val" if self.val is not None else "train"


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The order of the n examples in `epoch`: a permutation seeded by (seed, epoch)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


def step_indices(n: int, seed: int, step: int, batch: int, order=epoch_order) -> torch.Tensor:
    """Indices of the examples of global training step `step` (see the module docstring). `order(n, seed, epoch)`
    gives an epoch's permutation (train_batches passes one that keeps it, on the device, for the whole epoch)."""
    start, out = step * batch, []
    while batch > 0:
        epoch, offset = divmod(start, n)
        take = min(batch, n - offset)
        out.append(order(n, seed, epoch)[offset : offset + take])
        start, batch = start + take, batch - take
    return torch.cat(out)


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU tensor on `device` without making the host wait for the GPU: a plain copy from pageable memory
    waits until the GPU has finished all queued work, which would stall every training step."""
    if device.type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


class EpochOrders:
    """epoch_order with the current epoch's permutation kept on `device`: one permutation and one copy per epoch
    instead of one per step."""

    def __init__(self, device: torch.device):
        self.device, self.key, self.perm = device, None, None

    def __call__(self, n: int, seed: int, epoch: int) -> torch.Tensor:
        if self.key != (n, seed, epoch):
            self.key, self.perm = (n, seed, epoch), to_device(epoch_order(n, seed, epoch), self.device)
        return self.perm


class Draws:
    """Random numbers for per-example augmentation that do not depend on how a step is split.

    Each call draws one value for every example of the step's whole batch (`total`) from `gen` (seeded by
    (seed, step)) and returns those of this micro-batch's examples (`index`: their places in the step's batch).
    So accumulation and data-parallel processes augment every example exactly as one big batch would.
    Without `index`, the draws are for a batch of the size asked."""

    def __init__(self, gen: torch.Generator, index: torch.Tensor | None = None, total: int = 0):
        self.gen, self.index, self.total = gen, index, total

    def rand(self, n: int) -> torch.Tensor:
        """n uniform floats in [0, 1), one per example."""
        if self.index is not None and len(self.index) != n:
            raise ValueError(f"Draws for {len(self.index)} examples asked for {n} values")
        v = torch.rand(self.total if self.index is not None else n, generator=self.gen, device=self.gen.device)
        return v if self.index is None else v[self.index]

    def normal(self, n: int, dim: int) -> torch.Tensor:
        """n standard normal vectors (n, dim), one per example, from their own stream of the step: the same
        numbers on every call (a GAN's discriminator and generator turns see the same noise)."""
        if self.index is not None and len(self.index) != n:
            raise ValueError(f"Draws for {len(self.index)} examples asked for {n} vectors")
        g = torch.Generator(device=self.gen.device).manual_seed(self.gen.initial_seed() ^ 0x5DEECE66D)
        v = torch.randn(self.total if self.index is not None else n, dim, generator=g, device=g.device)
        return v if self.index is None else v[self.index]

    def uniform(self, n: int, k: int) -> torch.Tensor:
        """(n, k) uniform floats in [0, 1): k per example (one draw of the whole batch's (total, k))."""
        if self.index is not None and len(self.index) != n:
            raise ValueError(f"Draws for {len(self.index)} examples asked for {n} rows")
        v = torch.rand(self.total if self.index is not None else n, k, generator=self.gen, device=self.gen.device)
        return v if self.index is None else v[self.index]

    def randint(self, high: int, n: int) -> torch.Tensor:
        """n uniform integers in [0, high), one per example."""
        return (self.rand(n) * high).long().clamp_(max=high - 1)


def micro_draws(gen: torch.Generator, batch: int, micro: int, k: int, rank: int, world: int) -> Draws:
    """Draws for micro-batch k (of `micro` examples over all processes) of a step of `batch` examples, on process
    `rank` of `world`: it holds the step's examples k * micro + rank, + world, ... (see train_batches)."""
    index = torch.arange(k * micro + rank, (k + 1) * micro, world, device=gen.device)
    return Draws(gen, index, batch)


class _StepBatches(torch.utils.data.Sampler):
    def __init__(self, n: int, seed: int, steps: range, batch: int, rank: int, world: int):
        self.n, self.seed, self.steps, self.batch, self.rank, self.world = n, seed, steps, batch, rank, world

    def __iter__(self):
        for s in self.steps:
            yield step_indices(self.n, self.seed, s, self.batch)[self.rank :: self.world].tolist()

    def __len__(self) -> int:
        return len(self.steps)


def train_batches(
    split: Split,
    seed: int,
    steps: range,
    batch: int,
    device: torch.device,
    rank: int = 0,
    world: int = 1,
    workers: int = 2,
):
    """Yield the (per-process) batch of each step in `steps`, already on `device`."""
    if hasattr(split, "step_batch"):  # a split that draws its own batch of step s from (seed, s): text windows
        for s in steps:
            yield tuple(t[rank::world] for t in split.step_batch(seed, s, batch))
        return
    if isinstance(split, TensorSplit):
        orders = EpochOrders(split.tensors[0].device)
        for s in steps:
            yield split.take(step_indices(len(split), seed, s, batch, orders)[rank::world])
        return
    loader = DataLoader(
        split.dataset,
        batch_sampler=_StepBatches(len(split), seed, steps, batch, rank, world),
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
    )
    for b in loader:
        yield tuple(t.to(device, non_blocking=True) for t in b)


def eval_batches(split: Split, batch: int, device: torch.device, limit: int = 0, workers: int = 2):
    """Yield the whole split (or its first `limit` examples) in order, on `device`."""
    n = min(len(split), limit) if limit else len(split)
    if not isinstance(split, StreamSplit):  # TensorSplit, or any split with take(indices)
        for i in range(0, n, batch):
            yield split.take(torch.arange(i, min(i + batch, n)))
        return
    sub = torch.utils.data.Subset(split.dataset, range(n))
    for b in DataLoader(sub, batch_size=batch, num_workers=workers):
        yield tuple(t.to(device, non_blocking=True) for t in b)
