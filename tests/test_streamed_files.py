"""Image and mask folders past data.in_memory_mb are streamed: DataLoader workers decode each batch, and the
batches (training and evaluation) are exactly those of the same set held in memory, so resume stays exact."""

from __future__ import annotations

import pytest
import torch

from deeprecipe.data import DATASETS
from deeprecipe.data.core import StreamSplit, TensorSplit, eval_batches, train_batches
from test_data import write_cityscapes
from test_segmentation import _mask_folder

CPU = torch.device("cpu")


def same(a, b) -> bool:
    return len(a) == len(b) and all(all(torch.equal(s, t) for s, t in zip(x, y)) for x, y in zip(a, b))


def mask_folder(tmp):
    _mask_folder(tmp / "seg", n=10, size=(20, 24), classes=3)
    return DATASETS["maskfolder"](path=str(tmp / "seg"), classes=["a", "b", "c"], size=(16, 16), val_fraction=0.2)


@pytest.mark.parametrize("make", [mask_folder, write_cityscapes])
def test_a_streamed_folder_gives_the_batches_of_the_same_folder_in_memory(tmp_path, make):
    cfg = make(tmp_path)
    held = cfg.build()
    cfg.in_memory_mb = 0
    with pytest.warns(UserWarning, match="image pairs streamed from disk"):
        streamed = cfg.build()
    assert isinstance(held.train, TensorSplit) and isinstance(streamed.train, StreamSplit)
    assert held.spec.num_classes == streamed.spec.num_classes and held.spec.image_size == streamed.spec.image_size
    want = list(train_batches(held.train, 1, range(4), 3, CPU))
    assert same(want, list(train_batches(streamed.train, 1, range(4), 3, CPU, workers=2)))
    assert same(want[2:], list(train_batches(streamed.train, 1, range(2, 4), 3, CPU, workers=2)))  # resumed
    for split in ("val", "test"):
        a, b = getattr(held, split), getattr(streamed, split)
        if a is not None:
            assert same(list(eval_batches(a, 2, CPU)), list(eval_batches(b, 2, CPU, workers=0)))
