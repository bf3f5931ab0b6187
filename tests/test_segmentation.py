"""Segmentation: scenes data, readers, joint augmentation, metrics, models and a tiny end-to-end run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torchvision.io import decode_png, write_png

from deeprecipe.data import DATASETS, DataError
from deeprecipe.data.core import DataSpec, Draws
from deeprecipe.data.scenes import CityscapesData, MaskFolderData, ScenesData
from deeprecipe.families import get_family, segment
from deeprecipe.family import PredictOptions
from deeprecipe.models import MODELS
from deeprecipe.recipe import load

SEG_MODELS = ["unet", "fcn"]
SEG_DATA = ["scenes", "cityscapes", "maskfolder"]


def test_registered():
    assert all(m in MODELS for m in SEG_MODELS) and all(d in DATASETS for d in SEG_DATA)


# ------------------------------------------------------------------------------------------ metrics


def test_miou_equals_hand_computed_value():
    target = torch.tensor([[[0, 0, 1, 1], [2, 2, 255, 1]]])
    pred = torch.tensor([[[0, 1, 1, 1], [2, 0, 0, 1]]])
    m = segment.SegMetrics(4, torch.device("cpu"))  # class 3 appears nowhere: it must not count
    m.update(pred, target)
    out = m.compute()
    # class 0: inter 1 / union 3; class 1: 3 / 4; class 2: 1 / 2; the ignored pixel counts for nothing
    assert out["iou"][:3] == pytest.approx([1 / 3, 3 / 4, 1 / 2], abs=1e-6)
    assert out["iou"][3] is None
    assert out["miou"] == pytest.approx((1 / 3 + 3 / 4 + 1 / 2) / 3, abs=1e-6)
    assert out["pixel_acc"] == pytest.approx(5 / 7, abs=1e-6)


def test_dice_loss_is_zero_for_a_perfect_prediction_and_high_for_a_wrong_one():
    y = torch.tensor([[[0, 1], [2, 255]]])
    perfect = torch.nn.functional.one_hot(y.clamp(max=2), 3).permute(0, 3, 1, 2).float() * 100
    assert segment.dice_loss(perfect, y) < 0.05
    # all wrong: per class intersection 0, prediction + truth = 2 pixels -> 1 - (0 + 1) / (2 + 1) with smoothing 1
    assert segment.dice_loss(perfect.roll(1, dims=1), y).item() == pytest.approx(2 / 3, abs=1e-4)


# ------------------------------------------------------------------------------------------ augmentation


def _blocks(B=4, H=32, W=40, classes=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randint(0, classes, (B, H // 8, W // 8), generator=g)
    return coarse.repeat_interleave(8, 1).repeat_interleave(8, 2)  # (B, H, W) blocks of 8x8 pixels


def test_joint_augment_keeps_image_and_mask_aligned_exactly():
    """An image whose pixel values encode the mask, sampled with nearest: the codes must still match."""
    y = _blocks()
    x = (y * 10 + 5).float()[:, None].expand(-1, 3, -1, -1)
    xa, ya = segment.joint_augment(
        x, y, Draws(torch.Generator().manual_seed(1)), flip=True, scale=(0.6, 1.6), crop=24, image_mode="nearest"
    )
    assert xa.shape == (4, 3, 24, 24) and ya.shape == (4, 24, 24)
    inside = ya != 255
    assert inside.float().mean() > 0.3
    assert torch.equal(xa[:, 0][inside], (ya[inside] * 10 + 5).float())
    assert (xa[:, 0][~inside] == 0).all()  # outside the source: image padding, mask ignored
    assert not torch.equal(ya, y[:, :24, :24])  # it did transform


def test_prepare_augments_with_bilinear_image_and_nearest_mask_aligned():
    y = _blocks(B=8)
    x = (y * 30 + 10).to(torch.uint8)[:, None].expand(-1, 3, -1, -1).contiguous()
    spec = DataSpec(num_classes=6, mean=(0.0,) * 3, std=(1.0,) * 3, extra={"flip": True, "scale": [0.7, 1.4]})
    xa, ya = segment.Segment().prepare((x, y.to(torch.uint8)), spec, Draws(torch.Generator().manual_seed(3)))
    assert set(ya.unique().tolist()) <= set(range(6)) | {255}  # ids copied, never blended
    inside = ya != 255
    code = ((xa[:, 0] * 255 - 10) / 30).round()
    agree = (code[inside] == ya[inside]).float().mean()
    assert agree > 0.9  # only pixels on block borders may blend
    # the same check on a mask that was not moved with its image fails: the property has teeth
    assert (code[inside] == y[inside]).float().mean() < 0.8


# ------------------------------------------------------------------------------------------ data


def test_scenes_deterministic_disjoint_and_labelled():
    cfg = ScenesData(size=(48, 64), train_size=12, val_size=4, test_size=4)
    a, b = cfg.build(), cfg.build()
    xa, ya = a.train.tensors
    assert xa.shape == (12, 3, 48, 64) and ya.shape == (12, 48, 64) and xa.dtype == ya.dtype == torch.uint8
    assert torch.equal(xa, b.train.tensors[0]) and torch.equal(ya, b.train.tensors[1])
    assert ya.max() < len(a.spec.class_names)
    assert len(ya.unique()) >= 6  # road, sidewalk, building, sky, ... all drawn
    assert not any(torch.equal(v, t) for v in a.val.tensors[0] for t in xa)  # splits come from other numbers
    other = ScenesData(size=(48, 64), train_size=12, val_size=0, test_size=0, seed=1).build()
    assert not torch.equal(other.train.tensors[0], xa)


def _png(path: Path, t: torch.Tensor) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_png(t, str(path))
    return str(path)


def _mask_folder(root: Path, n=4, size=(20, 24), classes=3):
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        _png(root / "images" / f"im{i}.png", torch.randint(0, 255, (3, *size), dtype=torch.uint8, generator=g))
        _png(root / "masks" / f"im{i}.png", torch.randint(0, classes, (1, *size), dtype=torch.uint8, generator=g))


def test_mask_folder_reads_pairs_and_resizes_masks_with_nearest(tmp_path):
    _mask_folder(tmp_path)
    data = MaskFolderData(path=str(tmp_path), classes=["a", "b", "c"], size=(16, 16), val_fraction=0.25).build()
    x, y = data.train.tensors
    assert x.shape == (3, 3, 16, 16) and y.shape == (3, 16, 16) and len(data.val) == 1
    assert set(y.unique().tolist()) <= {0, 1, 2}


def test_mask_of_another_size_names_both_files(tmp_path):
    _mask_folder(tmp_path, n=2)
    _png(tmp_path / "masks" / "im1.png", torch.zeros(1, 10, 10, dtype=torch.uint8))
    with pytest.raises(DataError, match=r"masks/im1.png.*images/im1.png"):
        MaskFolderData(path=str(tmp_path), classes=["a", "b", "c"]).build()


def test_label_id_outside_the_class_list_is_an_error(tmp_path):
    _mask_folder(tmp_path, n=2)
    _png(tmp_path / "masks" / "im0.png", torch.full((1, 20, 24), 7, dtype=torch.uint8))
    with pytest.raises(DataError, match="label id 7 is outside"):
        MaskFolderData(path=str(tmp_path), classes=["a", "b", "c"]).build()


def test_palette_masks_map_colours_and_reject_unknown_ones(tmp_path):
    red, green = [255, 0, 0], [0, 255, 0]
    m = torch.tensor(red, dtype=torch.uint8).view(3, 1, 1).expand(3, 8, 8).clone()
    m[:, :4] = torch.tensor(green, dtype=torch.uint8).view(3, 1, 1)
    _png(tmp_path / "images" / "a.png", torch.zeros(3, 8, 8, dtype=torch.uint8))
    _png(tmp_path / "masks" / "a.png", m)
    data = MaskFolderData(
        path=str(tmp_path), classes=["r", "g"], palette=[red, green], size=(8, 8), val_fraction=0
    ).build()
    y = data.train.tensors[1][0]
    assert (y[:4] == 1).all() and (y[4:] == 0).all()
    m[:, 0, 0] = torch.tensor([1, 2, 3], dtype=torch.uint8)
    _png(tmp_path / "masks" / "a.png", m)
    with pytest.raises(DataError, match=r"colour \[1, 2, 3\] is not in data.palette"):
        MaskFolderData(path=str(tmp_path), classes=["r", "g"], palette=[red, green], val_fraction=0).build()


def test_cityscapes_label_ids_map_to_train_ids(tmp_path):
    for split, name in (
        ("train", "aachen_000000_000019"),
        ("train", "aachen_000001_000019"),
        ("val", "lindau_000000_000019"),
    ):
        city = name.split("_")[0]
        _png(
            tmp_path / "leftImg8bit" / split / city / f"{name}_leftImg8bit.png",
            torch.zeros(3, 8, 16, dtype=torch.uint8),
        )
        ids = torch.tensor([7, 26, 0, 33], dtype=torch.uint8).repeat_interleave(4).view(1, 1, 16).expand(1, 8, 16)
        _png(tmp_path / "gtFine" / split / city / f"{name}_gtFine_labelIds.png", ids.contiguous())
    data = CityscapesData(path=str(tmp_path), size=(8, 16), val_fraction=0).build()
    assert data.spec.num_classes == 19 and len(data.train) == 2 and len(data.test) == 1
    row = data.train.tensors[1][0, 0]
    assert row.tolist() == [0] * 4 + [13] * 4 + [255] * 4 + [18] * 4  # road, car, ignored, bicycle


# ------------------------------------------------------------------------------------------ models and a run


@pytest.mark.parametrize("name", SEG_MODELS)
def test_model_shapes_any_size_and_backward(name):
    spec = DataSpec(num_classes=5, in_channels=3, image_size=(40, 52))
    model = MODELS[name](width=8, **({"depth": 2} if name == "unet" else {"stages": 3})).build(spec)
    x = torch.randn(2, 3, 37, 50, requires_grad=True)
    out = model(x)
    assert out.shape == (2, 5, 37, 50)
    out.mean().backward()
    assert x.grad is not None and all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("name", SEG_MODELS)
def test_tiny_training_run_then_predict(tmp_path, name):
    from deeprecipe.cli.runs import open_run
    from deeprecipe.engine.loop import train

    small = {"unet": ["model.width=8", "model.depth=2"], "fcn": ["model.width=8", "model.stages=3", "model.skips=1"]}
    cfg = load(
        f"scenes-{name}",
        [
            "data.size=[32, 48]",
            "data.train_size=8",
            "data.val_size=2",
            "data.test_size=2",
            "data.crop=24",
            "model.dice=0.5",
            "train.steps=2",
            "train.batch_size=4",
            "train.eval_every=2",
            "train.log_every=1",
            "train.device=cpu",
            *small[name],
        ],
    )
    run = tmp_path / "run"
    final = train(cfg, get_family(cfg.task), run)
    assert 0 <= final["test_miou"] <= 1 and len(final["test_iou"]) == 8
    assert (run / "plots" / "segmentation.png").is_file() and (run / "plots" / "iou.txt").is_file()
    img = tmp_path / "street.png"
    write_png(torch.randint(0, 255, (3, 30, 50), dtype=torch.uint8), str(img))
    try:
        cfg, spec, model, rt, family = open_run(str(run), "cpu")
        out = family.predict(model, spec, cfg, rt, [str(img)], PredictOptions(out=tmp_path / "pred"))
    finally:
        torch.set_grad_enabled(True)  # in case loading a run turns autograd off for the process
    labels = decode_png(torch.frombuffer(bytearray(Path(out[0]["labels"]).read_bytes()), dtype=torch.uint8))
    assert labels.shape == (1, 30, 50) and labels.max() < 8  # class ids at the input's own size
    assert Path(out[0]["overlay"]).is_file()
