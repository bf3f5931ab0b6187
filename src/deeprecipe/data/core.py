"""What every data set hands the engine: a spec for the model, and splits that give batches by index.

The batch of training step s is a pure function of (seed, s): the stream of examples is the concatenation
of per-epoch permutations, each seeded by (seed, epoch), and step s takes the slice [s*B, (s+1)*B). So a
resumed run only needs the step number to see exactly the data an uninterrupted run would have seen, and
N processes that each take every N-th index of the global batch see together what one process sees.
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


def step_indices(n: int, seed: int, step: int, batch: int) -> torch.Tensor:
    """Indices of the examples of global training step `step` (see the module docstring)."""
    start, out = step * batch, []
    while batch > 0:
        epoch, offset = divmod(start, n)
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        take = min(batch, n - offset)
        out.append(torch.randperm(n, generator=g)[offset : offset + take])
        start, batch = start + take, batch - take
    return torch.cat(out)


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
        for s in steps:
            yield split.take(step_indices(len(split), seed, s, batch)[rank::world])
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
