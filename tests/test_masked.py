"""Masked-image pretraining (families/masked): the masks against their definition, the loss against a loop written
pixel by pixel, masks independent of how a step is split, the loss falling on tiny scenes, and a run's encoder and
decoder loading into the segmenter that fine-tunes from it."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from deeprecipe.cli import main
from deeprecipe.core import ConfigError, DataSpec
from deeprecipe.data.core import Draws, step_indices
from deeprecipe.engine.finetune import load_matching, read_source
from deeprecipe.families import get_family
from deeprecipe.families.masked import BACKBONE_FILE, prepare
from deeprecipe.families.masked.mask import cell_mask, masked_error
from deeprecipe.models import MODELS
from deeprecipe.recipe import load

TINY = ["data.size=[32,32]", "data.train_size=64", "data.val_size=16", "model.decoder=[16,8,8,8,4]"]


def test_the_mask_hides_whole_cells_the_same_number_in_every_image():
    m = cell_mask((5, 3, 20, 28), Draws(torch.Generator().manual_seed(0)), 0.6, 8)  # cells 3 x 4, cut at the border
    assert m.shape == (5, 1, 20, 28) and set(m.unique().tolist()) == {0.0, 1.0}
    for img in m[:, 0]:
        cells = [img[r : r + 8, c : c + 8] for r in range(0, 20, 8) for c in range(0, 28, 8)]
        assert all(cell.min() == cell.max() for cell in cells)  # a cell is hidden whole or not at all
        assert sum(int(cell[0, 0]) for cell in cells) == round(0.6 * 12)  # exactly round(ratio * cells)
    assert len({tuple(img.flatten().tolist()) for img in m}) > 1  # each image its own cells
    again = cell_mask((5, 3, 20, 28), Draws(torch.Generator().manual_seed(0)), 0.6, 8)
    assert torch.equal(m, again)
    # a micro-batch of examples 1 and 3 of a step's batch of 5 gets exactly their rows of the whole batch's masks
    part = cell_mask((2, 3, 20, 28), Draws(torch.Generator().manual_seed(0), torch.tensor([1, 3]), 5), 0.6, 8)
    assert torch.equal(part, m[[1, 3]])


def test_the_loss_is_the_squared_error_over_the_hidden_pixels_only():
    g = torch.Generator().manual_seed(1)
    out, x = torch.randn(3, 2, 6, 6, generator=g), torch.randn(3, 2, 6, 6, generator=g)
    mask = cell_mask(x.shape, Draws(g), 0.5, 3)
    want = []
    for b in range(3):  # the oracle: a loop over the hidden pixels
        errs = [
            float((out[b, c, i, j] - x[b, c, i, j]) ** 2)
            for c in range(2)
            for i in range(6)
            for j in range(6)
            if mask[b, 0, i, j]
        ]
        want.append(sum(errs) / len(errs))
    torch.testing.assert_close(masked_error(out, x, mask), torch.tensor(want))
    shown = out + 5 * (1 - mask)  # what the net outputs where the image is visible does not count
    torch.testing.assert_close(masked_error(shown, x, mask), torch.tensor(want))
    with pytest.raises(ConfigError, match="image-sized output"):
        masked_error(torch.randn(3, 10), x, mask)


def test_evaluation_masks_are_fixed_and_the_hidden_pixels_are_zero():
    cfg = load("scenes-masked", TINY)
    spec = DataSpec(in_channels=3, image_size=(16, 16), mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    x = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    hidden, whole, mask = prepare((x,), spec, cfg, None, 0)
    mean, std = torch.tensor(spec.mean).view(1, 3, 1, 1), torch.tensor(spec.std).view(1, 3, 1, 1)
    torch.testing.assert_close(whole, (x / 255 - mean) / std)  # evaluation: the image itself, normalized
    torch.testing.assert_close(hidden, whole * (1 - mask))
    assert torch.equal(mask, prepare((x,), spec, cfg, None, 0)[2])  # the same masks at every evaluation
    assert not torch.equal(mask, prepare((x,), spec, cfg, None, 1)[2])


def test_options_of_the_other_method_are_refused():
    with pytest.raises(ConfigError, match="temperature is SimCLR's"):
        get_family("masked").check_config(load("scenes-masked", ["pretrain.temperature=0.5"]))
    with pytest.raises(ConfigError, match="mask_ratio is masked pretraining's"):
        get_family("pretrain").check_config(load("scenes-simclr", ["pretrain.mask_ratio=0.5"]))
    with pytest.raises(ConfigError, match="tasks pretrain and masked"):
        load("scenes-unet", ["pretrain.mask_ratio=0.5"])


def test_a_few_steps_on_tiny_scenes_lower_the_held_out_error():
    cfg = load("scenes-masked", [*TINY, "train.device=cpu"])
    data = cfg.data.build()
    family = get_family("masked")
    family.check_config(cfg)
    torch.manual_seed(0)
    model = family.build_model(cfg, data.spec)
    held = family.prepare(data.val.take(torch.arange(16)), data.spec, None)  # fixed masks of held-out scenes
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)

    def held_loss():
        with torch.no_grad():  # BatchNorm on the batch's statistics, as in training
            return float(family.loss(model, held, cfg, "model")[0])

    before = held_loss()
    for s in range(40):
        x = data.train.take(step_indices(len(data.train), 0, s, 16))
        loss, _ = family.loss(model, family.prepare(x, data.spec, Draws(torch.Generator().manual_seed(s))), cfg, "")
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = held_loss()
    assert after < 0.9 * before, (before, after)  # 1.17 -> 0.93 when written (the net starts at ~0: the mean)


def test_a_run_fills_a_segmenters_encoder_and_decoder_and_its_encoder_file_a_resnet(tmp_path):
    """The run's weights load by name into unet-resnet18 built for 5 classes: every tensor but the head's (sized to
    the classes) with the run's values; backbone.safetensors is the encoder alone in torchvision's layout, which
    fills tv-resnet18 but its classifier."""
    run = tmp_path / "masked"
    sets = [*TINY, "train.steps=2", "train.batch_size=8", "train.device=cpu", "train.precision=fp32"]
    assert main(["train", "scenes-masked", "--out", str(run), *[a for s in sets for a in ("--set", s)]]) == 0
    spec = DataSpec(num_classes=5, in_channels=3, image_size=(32, 32))
    seg = MODELS["unet-resnet18"](decoder=(16, 8, 8, 8, 4)).build(spec)
    report = load_matching(seg, read_source(str(run)))
    source = read_source(str(run))
    own = seg.state_dict()
    assert set(report["loaded"]) == {k for k in own if not k.startswith("head.")}
    assert [n for n, _, _ in report["skipped"]] == ["head.weight", "head.bias"]  # 3 outputs there, 5 classes here
    assert all(torch.equal(own[k], source[k]) for k in report["loaded"])
    trunk = load_file(str(run / BACKBONE_FILE))
    assert set(trunk) == {k[len("encoder.") :] for k in own if k.startswith("encoder.")}
    resnet = MODELS["tv-resnet18"]().build(spec)
    r = load_matching(resnet, read_source(str(run / BACKBONE_FILE)))
    assert set(r["loaded"]) == {k for k in resnet.state_dict() if not k.startswith("fc.")}
