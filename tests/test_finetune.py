"""Fine-tuning: loading by name and shape (torchvision ResNet, our runs), channel adaptation, freezing, lr groups."""

import types

import pytest
import torch
import torchvision
import yaml
from safetensors.torch import save_file

from deeprecipe.cli import main
from deeprecipe.config import FinetuneConfig
from deeprecipe.data.core import DataSpec
from deeprecipe.data.images import DigitsData
from deeprecipe.engine import checkpoint, optim
from deeprecipe.engine.finetune import apply, load_matching, plan, read_source
from deeprecipe.models.resnet import ResNetConfig
from deeprecipe.util import UserError


def resnet(layout="resnet8", width=8, channels=1, classes=10):
    return ResNetConfig(layout=layout, width=width).build(DataSpec(num_classes=classes, in_channels=channels))


def test_torchvision_resnet18_state_dict_loads_by_name(tmp_path):
    tv = torchvision.models.resnet18(num_classes=1000)  # random weights; nothing is downloaded
    path = tmp_path / "resnet18.pth"
    torch.save(tv.state_dict(), path)
    model = resnet("resnet18", 64, channels=3, classes=7)
    report = load_matching(model, read_source(str(path)))
    # torchvision's 7x7 stem and 1000-class head (its `fc`, read as our `head`) do not fit: kept fresh; everything
    # else is copied exactly
    assert {n for n, _, _ in report["skipped"]} == {"conv1.weight", "head.weight", "head.bias"}
    assert report["new"] == [] and report["unused"] == [] and report["adapted"] == []
    ours, theirs = model.state_dict(), tv.state_dict()
    assert len(report["loaded"]) == len(ours) - 3
    for name in report["loaded"]:
        assert torch.equal(ours[name], theirs[name]), name
    assert ours["head.weight"].shape == (7, 512)


def test_gray_model_from_rgb_weights_matches_rgb_model_on_gray_input(tmp_path):
    rgb = resnet(channels=3).eval()
    with torch.no_grad():  # non-trivial BN statistics and residual branches
        for m in rgb.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2), m.running_var.uniform_(0.5, 1.5), m.weight.uniform_(0.5, 1.5)
    save_file(checkpoint.plain_state(rgb), str(tmp_path / "rgb.safetensors"))
    gray = resnet(channels=1).eval()
    report = load_matching(gray, read_source(str(tmp_path / "rgb.safetensors")))
    assert [n for n, _, _ in report["adapted"]] == ["conv1.weight"]
    x = torch.randn(4, 1, 12, 12)
    torch.testing.assert_close(gray(x), rgb(x.repeat(1, 3, 1, 1)), atol=1e-4, rtol=1e-4)


def test_freeze_plans():
    m = resnet()
    scale = plan(m, ["head.weight", "head.bias"], "backbone", head_lr=10, backbone_lr=0.1, unfreeze_after=0)
    assert {n for n, p in m.named_parameters() if p.requires_grad} == {"head.weight", "head.bias"}
    assert scale["head."] == 10 and scale["layer1."] == 0.1
    m = resnet()
    plan(m, [], "layer1", 1, 1, 0)
    frozen = {n.split(".")[0] for n, p in m.named_parameters() if not p.requires_grad}
    assert frozen == {"conv1", "bn1", "layer1"}
    with pytest.raises(UserError, match="not a top-level layer"):
        plan(resnet(), [], "layer9", 1, 1, 0)
    with pytest.raises(UserError, match="head"):
        plan(resnet(), [], "head", 1, 1, 0)
    m = resnet()  # a fresh (not loaded) stem is never frozen: it would stay random
    plan(m, ["conv1.weight"], "backbone", 1, 1, 0)
    assert m.conv1.weight.requires_grad and not m.layer1[0].conv1.weight.requires_grad


def test_gradual_unfreezing_gives_lr_zero_until_each_layer_starts():
    m = resnet()
    scale = plan(m, [], "backbone", 1.0, 0.5, unfreeze_after=10)
    assert scale["layer3."] == (0.5, 10) and scale["conv1."] == (0.5, 50)  # head side first, stem last
    opt = optim.adamw(m, optim.OptimConfig(), scale)
    lr_of = {id(p): g for g in opt.param_groups for p in g["params"]}
    for step, want_l3, want_stem in [(0, 0.0, 0.0), (10, 0.5, 0.0), (50, 0.5, 0.5)]:
        optim.set_lr(opt, 1.0, step)
        assert lr_of[id(m.layer3[0].conv1.weight)]["lr"] == want_l3
        assert lr_of[id(m.conv1.weight)]["lr"] == want_stem
        assert lr_of[id(m.head.weight)]["lr"] == 1.0


def test_sources_are_read_without_unpickling(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"w": types.SimpleNamespace(a=1)}, path)  # an arbitrary object needs the unpickler
    with pytest.raises(UserError, match="weights-only"):
        read_source(str(path))
    with pytest.raises(UserError, match="no such"):
        read_source(str(tmp_path / "missing.pt"))
    m = torch.nn.Linear(2, 2)
    torch.save({"state_dict": {"module." + k: v for k, v in m.state_dict().items()}}, tmp_path / "ddp.pt")
    assert set(read_source(str(tmp_path / "ddp.pt"))) == {"weight", "bias"}  # wrapper and DDP prefix removed
    with pytest.raises(UserError, match="no tensor matches"):
        apply(resnet(), FinetuneConfig(init_from=str(tmp_path / "ddp.pt")), tmp_path / "run")


def test_per_class_keeps_a_balanced_few_label_set():
    data = DigitsData(per_class=7).build()
    y = data.train.tensors[1]
    assert torch.bincount(y, minlength=10).tolist() == [7] * 10
    assert len(data.val) == len(DigitsData().build().val)  # val and test are untouched


@pytest.mark.slow
def test_cli_fine_tune_from_a_run_keeps_frozen_backbone(tmp_path, capsys):
    base = [
        "--set",
        "train.device=cpu",
        "--set",
        "model.channels=[8,16]",
        "--set",
        "model.dense=[16]",
        "--set",
        "train.eval_every=0",
        "--set",
        "train.batch_size=32",
    ]
    src = tmp_path / "src"
    assert main(["train", "digits-cnn", "--out", str(src), "--set", "train.steps=5", *base]) == 0
    dst = tmp_path / "dst"
    args = [
        "train",
        "digits-cnn",
        "--out",
        str(dst),
        "--set",
        "train.steps=5",
        "--set",
        "data.per_class=5",
        "--init-from",
        str(src),
        "--freeze",
        "backbone",
        "--head-lr",
        "3",
        *base,
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "loaded 16 tensors" in out and "skipped 0" in out and "frozen" in out
    saved = yaml.safe_load((dst / "config.yaml").read_text())["finetune"]  # the flags are the typed section
    assert saved == dict(init_from=str(src), freeze="backbone", head_lr=3.0, backbone_lr=1.0, unfreeze_after=0)
    before, after = checkpoint.inference_weights(src), checkpoint.inference_weights(dst)
    params = {n for n, _ in torch.nn.Module.named_parameters(_cnn())}
    for name in params:
        same = torch.equal(before[name], after[name])
        assert same == (not name.startswith("head.")), name  # backbone untouched, head trained
    assert (
        main(
            ["train", "digits-cnn", "--out", str(tmp_path / "bad"), "--init-from", str(src), "--freeze", "nope", *base]
        )
        == 2
    )
    assert main(["train", "digits-cnn", "--out", str(tmp_path / "bad"), "--head-lr", "3", *base]) == 2  # no source
    assert not (tmp_path / "bad").exists()


@pytest.mark.slow
def test_resumed_fine_tune_equals_uninterrupted_and_keeps_the_freeze(tmp_path):
    """The fine-tuning plan (frozen layers, per-group lr) is saved in the run: --resume re-applies it, so the
    optimizer state loads and the resumed run ends bitwise where an uninterrupted one ends."""
    base = ["--set", "train.device=cpu", "--set", "model.channels=[8,16]", "--set", "model.dense=[16]"]
    base += ["--set", "train.eval_every=0", "--set", "train.batch_size=32", "--set", "optim.schedule=constant"]
    base += ["--set", "optim.warmup=0", "--set", "train.ckpt_every=3"]
    src = tmp_path / "src"
    assert main(["train", "digits-cnn", "--out", str(src), "--set", "train.steps=4", *base]) == 0
    tune = ["--init-from", str(src), "--freeze", "features", "--head-lr", "3", "--set", "data.per_class=5"]
    full, part = tmp_path / "full", tmp_path / "part"
    assert main(["train", "digits-cnn", "--out", str(full), "--set", "train.steps=6", *tune, *base]) == 0
    assert main(["train", "digits-cnn", "--out", str(part), "--set", "train.steps=3", *tune, *base]) == 0
    assert (part / "finetune.json").is_file()
    assert main(["train", "--resume", str(part), "--set", "train.steps=6", *base]) == 0
    a, b, s = (checkpoint.inference_weights(r) for r in (full, part, src))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    frozen = [n for n, _ in _cnn().named_parameters() if n.startswith("features.")]  # BatchNorm stats do move
    assert frozen and all(torch.equal(b[n], s[n]) for n in frozen)  # still frozen after the resume
    assert main(["train", "--resume", str(part), "--init-from", str(src), *base]) == 2


def _cnn():
    from deeprecipe.models.cnn import CNNConfig

    return CNNConfig(channels=(8, 16), dense=(16,)).build(DataSpec(num_classes=10, in_channels=1, image_size=(8, 8)))


def test_a_trunk_loads_across_models_under_another_top_level_name(tmp_path):
    """A U-Net's `encoder.` (torchvision ResNet-18) fine-tunes a CenterNet's `backbone.` and back: the same trunk,
    so every trunk tensor is copied and the two compute the same layer4 features."""
    from deeprecipe.models import MODELS

    seg_spec = DataSpec(num_classes=4, in_channels=3, image_size=(64, 64))
    det_spec = DataSpec(num_classes=3, in_channels=3, image_size=(64, 64))
    det_spec.extra.update(boxes="xyxy", objects_per_image=[1.0] * 3)
    torch.manual_seed(0)
    unet = MODELS["unet-resnet18"]().build(seg_spec)
    save_file(checkpoint.plain_state(unet), str(tmp_path / "unet.safetensors"))
    det = MODELS["centernet"](backbone="tv-resnet18", neck=8).build(det_spec)
    report = load_matching(det, read_source(str(tmp_path / "unet.safetensors")))
    assert report["renamed"] == [("encoder.", "backbone.")]
    trunk = [k for k in det.state_dict() if k.startswith("backbone.")]
    assert sorted(report["loaded"]) == sorted(trunk) and report["skipped"] == []
    x = torch.randn(2, 3, 64, 64)
    unet.eval(), det.eval()
    e, b = unet.encoder, det.backbone
    with torch.no_grad():
        fe = e.layer4(e.layer3(e.layer2(e.layer1(e.maxpool(e.relu(e.bn1(e.conv1(x))))))))
        fb = b.layer4(b.layer3(b.layer2(b.layer1(b.maxpool(b.relu(b.bn1(b.conv1(x))))))))
    assert torch.equal(fe, fb)
    save_file(checkpoint.plain_state(det), str(tmp_path / "det.safetensors"))
    back = MODELS["unet-resnet18"]().build(seg_spec)
    report = load_matching(back, read_source(str(tmp_path / "det.safetensors")))
    assert report["renamed"] == [("backbone.", "encoder.")]
    assert all(torch.equal(back.state_dict()[k], v) for k, v in unet.state_dict().items() if k.startswith("encoder."))
