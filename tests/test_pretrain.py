"""Self-supervised pretraining (families/pretrain): NT-Xent against a reference written anchor by anchor, the views
as one batch of tensor ops independent of how a step is split, the loss falling on tiny scenes, and the trunk of a
run loading by name into the models that fine-tune from it."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from deeprecipe.cli import main
from deeprecipe.core import ConfigError, DataSpec
from deeprecipe.data.core import Draws, step_indices
from deeprecipe.data.image_ops import normalize
from deeprecipe.data.views import colour_jitter, gray, resized_crop, to_gray, view
from deeprecipe.engine.finetune import load_matching, read_source
from deeprecipe.families import get_family
from deeprecipe.families.pretrain import BACKBONE_FILE, nt_xent, prepare
from deeprecipe.models import MODELS
from deeprecipe.recipe import load

TINY = ["data.size=[32,32]", "data.train_size=64", "data.val_size=16", "pretrain.proj_hidden=32", "pretrain.proj_dim=8"]


def reference_nt_xent(z1: torch.Tensor, z2: torch.Tensor, t: float) -> torch.Tensor:
    """NT-Xent as the SimCLR paper writes it, one anchor at a time: -log softmax over the 2B - 1 others."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    n, losses = len(z1), []
    for a in range(2 * n):
        others = [k for k in range(2 * n) if k != a]
        logits = torch.stack([z[a] @ z[k] for k in others]) / t
        partner = others.index((a + n) % (2 * n))
        losses.append(F.cross_entropy(logits[None], torch.tensor([partner])))
    return torch.stack(losses).mean()


def test_nt_xent_equals_the_paper_anchor_by_anchor():
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    for t in (0.1, 0.5):
        torch.testing.assert_close(nt_xent(z1, z2, t), reference_nt_xent(z1, z2, t))


def test_nt_xent_rewards_matched_views_and_is_ln_of_the_candidates_when_blind():
    g = torch.Generator().manual_seed(1)
    z1 = torch.linalg.qr(torch.randn(16, 8, generator=g))[0].T  # 8 orthonormal embeddings (8, 16)
    z2 = z1 + 0.05 * torch.randn(z1.shape, generator=g)  # each image's second view: close to its first
    matched = nt_xent(z1, z2, 0.2)
    shuffled = nt_xent(z1, z2[torch.roll(torch.arange(8), 1)], 0.2)  # partners that are other images
    assert matched < 0.2 < math.log(15) < shuffled
    # identical views of orthogonal images: the partner at cosine 1 against 14 others at cosine 0
    torch.testing.assert_close(nt_xent(z1, z1, 0.2), torch.tensor(math.log(1 + 14 * math.exp(-1 / 0.2))))
    same = torch.ones(8, 16)  # a net that maps everything to one point: every candidate equally likely
    torch.testing.assert_close(nt_xent(same, same, 0.2), torch.tensor(math.log(15)))


def test_views_do_not_depend_on_how_a_step_is_split():
    """A micro-batch's views (Draws with the step's index) equal its rows of the whole batch's views, as the
    loop's accumulation and data-parallel splits need; and two draws of the step differ (two views)."""
    x = torch.rand(8, 3, 20, 24)
    args = ((0.2, 1.0), 0.5, 0.8, 0.2)
    whole = view(x, Draws(torch.Generator().manual_seed(5)), *args)
    half = view(x[4:], Draws(torch.Generator().manual_seed(5), torch.arange(4, 8), 8), *args)
    torch.testing.assert_close(half, whole[4:])
    assert whole.shape == x.shape and 0 <= whole.min() and whole.max() <= 1
    other = view(x, Draws(torch.Generator().manual_seed(6)), *args)
    assert (other - whole).abs().amax((1, 2, 3)).min() > 0.01  # every image's two views differ


class Fixed:
    """Draws that hand out given values, one per call (the same for every image): an oracle's control."""

    def __init__(self, *values: float):
        self.values = list(values)

    def rand(self, n: int) -> torch.Tensor:
        return torch.full((n,), self.values.pop(0))


# rand() values of resized_crop: area, aspect ratio (0.5: 1), centre x, centre y (0.5: the middle), flip (< 0.5)
MIDDLE = (0.5, 0.5, 0.5, 0.5)


def test_crops_sample_the_window_they_draw():
    x = torch.rand(2, 3, 16, 16)
    torch.testing.assert_close(resized_crop(x, Fixed(*MIDDLE, 0.9), (1, 1)), x)  # the whole image
    torch.testing.assert_close(resized_crop(x, Fixed(*MIDDLE, 0.1), (1, 1)), x.flip(-1))  # mirrored
    # a quarter of the area is a half-side window, blown up 2x: torch's bilinear resize of that window (away from
    # its border, where the crop also sees the pixels just outside it); centred, then pushed to the left edge
    for cx, cols in ((0.5, slice(4, 12)), (0.0, slice(0, 8))):
        out = resized_crop(x, Fixed(0.5, 0.5, cx, 0.5, 0.9), (0.25, 0.25))
        want = F.interpolate(x[:, :, 4:12, cols], size=(16, 16), mode="bilinear", align_corners=False)
        torch.testing.assert_close(out[..., 1:-1, 1:-1], want[..., 1:-1, 1:-1])


def test_colour_ops_match_torchvision():
    from torchvision.transforms import functional as TF

    x = torch.rand(3, 3, 8, 8)
    torch.testing.assert_close(to_gray(x, Fixed(0.0), 1.0), TF.rgb_to_grayscale(x).expand_as(x))
    # rand() values of colour_jitter: brightness, contrast, saturation (0.5: factor 1), hue (0.5: none), apply
    s = 0.5
    for u, op in ((0, TF.adjust_brightness), (1, TF.adjust_contrast), (2, TF.adjust_saturation)):
        values = [0.5, 0.5, 0.5, 0.5, 0.0]
        values[u] = 0.9  # factor 1 + 0.8 s (2 * 0.9 - 1)
        want = op(x, 1 + 0.8 * s * 0.8)
        torch.testing.assert_close(colour_jitter(x, Fixed(*values), s, 1.0), want, atol=1e-5, rtol=1e-5)
    # a hue turn keeps each pixel's luma (it turns the chroma plane only); not applied (last draw >= p): unchanged
    mid = 0.3 + 0.4 * x  # colours that stay inside [0, 1] when turned (no clamping)
    turned = colour_jitter(mid, Fixed(0.5, 0.5, 0.5, 0.9, 0.0), s, 1.0)
    assert (turned - mid).abs().max() > 0.01
    torch.testing.assert_close(gray(turned), gray(mid), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(colour_jitter(x, Fixed(0.9, 0.9, 0.9, 0.9, 0.95), s, 0.8), x)


def test_evaluation_views_are_the_image_and_a_fixed_view_of_it():
    cfg = load("scenes-simclr", TINY)
    spec = DataSpec(in_channels=3, image_size=(16, 16), mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    x = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    for k in (0, 3):  # every evaluation batch: view 1 is the image itself, normalized
        v1, v2 = prepare((x,), spec, cfg, None, k)
        torch.testing.assert_close(v1, normalize(x, spec))
        torch.testing.assert_close(v2, prepare((x,), spec, cfg, None, k)[1])  # the same views every time
        assert (v2 - v1).abs().max() > 0.1
    assert (prepare((x,), spec, cfg, None, 0)[1] - prepare((x,), spec, cfg, None, 1)[1]).abs().max() > 0.1


def test_accumulation_is_refused():
    cfg = load("scenes-simclr", [*TINY, "train.accum=2", "train.batch_size=8"])
    with pytest.raises(ConfigError, match="accum"):
        get_family("pretrain").check_config(cfg)
    with pytest.raises(ConfigError, match="tasks pretrain and masked"):
        load("scenes-unet", ["pretrain.temperature=0.5"])


def test_a_few_steps_on_tiny_scenes_lower_the_loss():
    cfg = load("scenes-simclr", [*TINY, "train.device=cpu"])
    data = cfg.data.build()
    family = get_family("pretrain")
    family.check_config(cfg)
    torch.manual_seed(0)
    model = family.build_model(cfg, data.spec)
    held = family.prepare(data.val.take(torch.arange(16)), data.spec, None)  # fixed views of held-out scenes
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def held_loss():
        with torch.no_grad():  # BatchNorm on the batch's statistics, as in training
            return float(family.loss(model, held, cfg, "model")[0])

    before = held_loss()
    for s in range(12):
        x = data.train.take(step_indices(len(data.train), 0, s, 16))
        loss, _ = family.loss(model, family.prepare(x, data.spec, Draws(torch.Generator().manual_seed(s))), cfg, "")
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert held_loss() < 0.9 * before  # 3.67 -> 3.12 when written (ln 31 = 3.43 is a blind net's)


def test_a_pretrained_trunk_loads_into_unet_resnet18_and_centernet(tmp_path):
    """A pretraining run's weights (its folder, or backbone.safetensors) fill every trunk tensor of unet-resnet18's
    `encoder.` and of CenterNet's torchvision `backbone.` by name, with the run's values; the projector is not
    part of the trunk file."""
    run = tmp_path / "ssl"
    sets = [*TINY, "train.steps=2", "train.batch_size=8", "train.device=cpu", "train.precision=fp32"]
    assert main(["train", "scenes-simclr", "--out", str(run), *[a for s in sets for a in ("--set", s)]]) == 0
    trunk = load_file(str(run / BACKBONE_FILE))
    assert "layer4.1.bn2.running_var" in trunk and not any(k.startswith("fc.") for k in trunk)
    spec = DataSpec(num_classes=3, in_channels=3, image_size=(64, 64))
    det_spec = DataSpec(num_classes=3, in_channels=3, image_size=(64, 64))
    det_spec.extra.update(boxes="xyxy", objects_per_image=[1.0] * 3)
    for source in (str(run), str(run / BACKBONE_FILE)):
        for model, prefix in (
            (MODELS["tv-resnet18"]().build(spec), ""),  # a classifier: its own new head stays fresh
            (MODELS["unet-resnet18"](decoder=(16, 8, 8, 8, 4)).build(spec), "encoder."),
            (MODELS["centernet"](backbone="tv-resnet18", neck=8).build(det_spec), "backbone."),
        ):
            report = load_matching(model, read_source(source))
            want = {k for k in model.state_dict() if k.startswith(prefix) and not k.startswith("fc.")}
            assert want == {prefix + k for k in trunk}  # the same tensors...
            assert want <= set(report["loaded"]) and not report["skipped"]  # ...all loaded: 0 trunk tensors missing
            own = model.state_dict()
            assert all(torch.equal(own[prefix + k], v) for k, v in trunk.items())  # ...with the run's values
