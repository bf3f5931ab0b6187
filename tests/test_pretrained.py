"""Pretrained starts (models/pretrained.py, models/zoo.py): published weight layouts load by name into the zoo's
models, a published name is read from torch.hub's cache with the network unreachable, an offline miss names the
file it needs, and the inputs follow the weights (their mean/std, RGB) through train, eval, predict, serve and
export. The weights are made here (random init, the real layout): nothing is downloaded."""

from __future__ import annotations

import json
import urllib.request
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torchvision
from PIL import Image

from deeprecipe.core import ConfigError, DataSpec, UserError
from deeprecipe.data import image_ops
from deeprecipe.engine import checkpoint
from deeprecipe.engine.finetune import head_name
from deeprecipe.models import MODELS, model_config_class
from deeprecipe.models.pretrained import classifier, hub_file

IMAGENET = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])  # torchvision's published ImageNet transforms
RESNET18_FILE = "resnet18-f37072fd.pth"  # the published file name of ResNet18_Weights.IMAGENET1K_V1


def spec(classes: int = 3, channels: int = 3, size: int = 32) -> DataSpec:
    return DataSpec(
        num_classes=classes,
        class_names=[f"c{i}" for i in range(classes)],
        in_channels=channels,
        image_size=(size, size),
        mean=(0.5,) * channels,
        std=(0.25,) * channels,
    )


def tv_resnet18_state() -> dict[str, torch.Tensor]:
    """A torchvision ResNet-18's state dict exactly as published (1000 classes), with random weights."""
    torch.manual_seed(1)
    return torchvision.models.resnet18(weights=None).state_dict()


def build(name: str, weights: str, s: DataSpec) -> tuple[nn.Module, list[str]]:
    """The model and the notes its build gave (warnings: what the CLI prints as note: lines)."""
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        model = model_config_class(name)(name=name, weights=weights).build(s)
    return model, [str(x.message) for x in w]


def loaded(notes: list[str]) -> str:
    """The note of the load (counts of loaded, missing, unexpected and shape-mismatched tensors)."""
    return next(n for n in notes if " loaded " in n)


def assert_loaded_all_but_the_head(model: nn.Module, state: dict, notes: list[str]) -> None:
    head = {k for k in model.state_dict() if k.startswith("fc.")}
    assert head == {"fc.weight", "fc.bias"}
    for k, v in model.state_dict().items():
        if k not in head:
            assert torch.equal(v, state[k]), k
    assert set(model.state_dict()) == set(state)  # the published layout, name for name
    note = loaded(notes)
    assert f"loaded {len(state) - 2} tensors, missing 0, unexpected 0, shape-mismatched 2" in note, note
    assert "fc.weight [1000, 512]->[3, 512]" in note


@pytest.mark.parametrize("layout", ["plain", "checkpoint", "safetensors"])
def test_torchvision_file_loads_into_tv_resnet18_with_only_the_head_mismatched(tmp_path, layout):
    state = tv_resnet18_state()
    if layout == "safetensors":
        from safetensors.torch import save_file

        path = tmp_path / "r18.safetensors"
        save_file(state, str(path))
    else:  # a training checkpoint: the state dict under "state_dict", names prefixed by DDP's module.
        path = tmp_path / "r18.pth"
        obj = {"state_dict": {"module." + k: v for k, v in state.items()}, "epoch": 90} if layout != "plain" else state
        torch.save(obj, path)
    model, notes = build("tv-resnet18", str(path), spec())
    assert_loaded_all_but_the_head(model, state, notes)
    assert tuple(model(torch.randn(2, 3, 32, 32)).shape) == (2, 3)


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """An empty TORCH_HOME and no network: any download attempt fails loudly."""
    home = tmp_path / "torch-home"
    monkeypatch.setenv("TORCH_HOME", str(home))

    def no_network(*args, **kwargs):
        raise AssertionError(f"a download was attempted: {args[:1]}")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    return home


def test_published_name_loads_from_the_torch_hub_cache_without_the_network(offline):
    state = tv_resnet18_state()
    cached = offline / "hub" / "checkpoints" / RESNET18_FILE
    cached.parent.mkdir(parents=True)
    torch.save(state, cached)
    assert hub_file(torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url) == cached
    s = spec()
    model, notes = build("tv-resnet18", "IMAGENET1K_V1", s)
    assert_loaded_all_but_the_head(model, state, notes)
    assert (list(s.mean), list(s.std)) == IMAGENET  # the inputs follow the weights' metadata
    assert s.extra["inputs"]["size"] == 224 and s.extra["inputs"]["channels"] == "RGB"
    assert any("224 x 224" in n for n in notes)  # the data's 32 px images are not the weights' size


def test_offline_miss_is_one_line_naming_the_cache_path(offline, monkeypatch):
    import urllib.error

    def unreachable(*args, **kwargs):
        raise urllib.error.URLError("Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", unreachable)
    with pytest.raises(UserError) as e:
        build("tv-resnet18", "IMAGENET1K_V1", spec())
    msg = str(e.value)
    assert "\n" not in msg
    assert str(offline / "hub" / "checkpoints" / RESNET18_FILE) in msg
    assert "https://download.pytorch.org/models/" + RESNET18_FILE in msg


def test_unknown_published_name_and_missing_file_are_config_errors(offline):
    with pytest.raises(ConfigError, match="IMAGENET1K_V1"):
        build("tv-resnet18", "IMAGENET9K", spec())
    with pytest.raises(ConfigError, match="no such file"):
        build("tv-resnet18", "nowhere/r18.pth", spec())


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": tv_resnet18_state(), "cfg": Path("x")}, path)  # a non-tensor object: needs unpickling
    with pytest.raises(UserError, match="weights-only"):
        build("tv-resnet18", str(path), spec())


@pytest.mark.parametrize(
    "name, head, top",
    [("tv-resnet18", "fc", "fc"), ("tv-mobilenet-v3", "classifier.3", "classifier")],
)
def test_zoo_models_name_their_head(name, head, top):
    """timm's API on torchvision nets: get_classifier is the last Linear, sized to the classes; fine-tuning and the
    checks find it there; reset_classifier gives a fresh head for another class count, and ln C at init."""
    torch.manual_seed(0)
    model = MODELS[name]().build(spec(classes=4))
    assert model.get_classifier() is model.get_submodule(head) and classifier(model) is model.get_submodule(head)
    assert model.get_classifier().out_features == 4
    assert head_name(model) == top
    model.reset_classifier(7)
    assert model.get_submodule(head).out_features == 7
    with torch.no_grad():
        logits = model.eval()(torch.randn(16, 3, 32, 32))
    loss = nn.functional.cross_entropy(logits, torch.randint(0, 7, (16,)))
    assert abs(loss.item() - np.log(7)) < 0.05  # a small head: every class equally likely at init


def test_gray_data_is_repeated_to_rgb_and_normalized_per_channel(offline):
    s = spec(channels=1)
    MODELS["tv-resnet18"]().build(s)  # no weights: the data's own gray statistics in each channel
    assert s.mean == (0.5,) * 3 and s.std == (0.25,) * 3
    cached = offline / "hub" / "checkpoints" / RESNET18_FILE
    cached.parent.mkdir(parents=True)
    torch.save(tv_resnet18_state(), cached)
    s = spec(channels=1)
    build("tv-resnet18", "IMAGENET1K_V1", s)
    gray = torch.randint(0, 256, (2, 1, 5, 5), dtype=torch.uint8)
    # oracle: torchvision's normalize of the gray image copied into R, G and B
    want = torchvision.transforms.functional.normalize(gray.repeat(1, 3, 1, 1).float() / 255, *IMAGENET)
    assert torch.allclose(image_ops.normalize(gray, s), want, atol=1e-6)
    assert s.in_channels == 1  # files are still read as gray, as the data set read them


def test_video_net_loads_kinetics_weights_and_gray_clips_become_rgb(offline):
    """tv-r3d-18 from KINETICS400_V1 in torch.hub's cache; the video family's clips follow the weights: gray
    frames repeated to RGB and normalized by Kinetics' mean/std (oracle: torchvision's normalize)."""
    from deeprecipe.families.video import prepare

    w = torchvision.models.video.R3D_18_Weights.KINETICS400_V1
    torch.manual_seed(0)
    state = torchvision.models.video.r3d_18().state_dict()
    hub_file(w.url).parent.mkdir(parents=True)
    torch.save(state, hub_file(w.url))
    s = spec(classes=4, channels=1, size=16)
    s.extra["frames"] = 4
    model, notes = build("tv-r3d-18", "KINETICS400_V1", s)
    assert "missing 0, unexpected 0, shape-mismatched 2" in loaded(notes)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items() if not k.startswith("fc."))
    t = w.transforms()
    assert (list(s.mean), list(s.std)) == (list(t.mean), list(t.std))
    clips = torch.randint(0, 256, (2, 1, 4, 16, 16), dtype=torch.uint8)  # (B, C, T, H, W) gray
    x, _ = prepare((clips, None), s)
    mean, std = torch.tensor(t.mean).view(1, 3, 1, 1, 1), torch.tensor(t.std).view(1, 3, 1, 1, 1)
    assert torch.allclose(x, (clips.repeat(1, 3, 1, 1, 1).float() / 255 - mean) / std, atol=1e-6)
    assert tuple(model(x).shape) == (2, 4)


def test_segmenter_loads_its_own_weights_or_its_backbone_classifiers(offline):
    """tv-lraspp-mobilenet-v3 from its published COCO_WITH_VOC_LABELS_V1 (all but the class convs), or from
    MobileNetV3's ImageNet IMAGENET1K_V1 (features.* read as backbone.*): both names from torch.hub's cache."""
    seg_w = torchvision.models.segmentation.LRASPP_MobileNet_V3_Large_Weights.COCO_WITH_VOC_LABELS_V1
    cls_w = torchvision.models.MobileNet_V3_Large_Weights.IMAGENET1K_V1
    torch.manual_seed(0)
    seg = torchvision.models.segmentation.lraspp_mobilenet_v3_large(weights_backbone=None).state_dict()
    cls = torchvision.models.mobilenet_v3_large().state_dict()
    hub_file(seg_w.url).parent.mkdir(parents=True)
    torch.save(seg, hub_file(seg_w.url))
    torch.save(cls, hub_file(cls_w.url))
    s = spec(classes=4)
    model, notes = build("tv-lraspp-mobilenet-v3", "COCO_WITH_VOC_LABELS_V1", s)
    assert f"loaded {len(seg) - 4} tensors, missing 0, unexpected 0, shape-mismatched 4" in loaded(notes), notes
    assert tuple(model(torch.randn(2, 3, 10, 14)).shape) == (2, 4, 10, 14)  # logits at the input's size
    model, notes = build("tv-lraspp-mobilenet-v3", "IMAGENET1K_V1", spec(classes=4))
    own = model.state_dict()
    features = {k: v for k, v in cls.items() if k.startswith("features.")}
    assert "names features.* read as backbone.*" in loaded(notes) and f"loaded {len(features)} tensors" in loaded(notes)
    assert all(torch.equal(own["backbone." + k.removeprefix("features.")], v) for k, v in features.items())
    assert head_name(model) == "classifier"
    with pytest.raises(ConfigError, match="COCO_WITH_VOC_LABELS_V1.*IMAGENET1K_V1"):
        build("tv-lraspp-mobilenet-v3", "VOC2012", spec())


def test_unet_resnet18_encoder_loads_torchvision_resnet18_weights(tmp_path):
    state = tv_resnet18_state()
    torch.save(state, tmp_path / "r18.pth")
    s = spec(classes=5)
    model, notes = build("unet-resnet18", str(tmp_path / "r18.pth"), s)
    assert (
        "read as encoder.*" in loaded(notes)
        and "loaded 120 tensors" in loaded(notes)
        and "unexpected 2" in loaded(notes)
    )
    own = model.state_dict()
    assert all(torch.equal(own["encoder." + k], v) for k, v in state.items() if not k.startswith("fc."))
    assert (list(s.mean), list(s.std)) == IMAGENET
    assert tuple(model(torch.randn(2, 3, 20, 30)).shape) == (2, 5, 20, 30) and head_name(model) == "head"


def test_centernet_on_torchvision_resnet18_loads_its_weights(tmp_path):
    state = tv_resnet18_state()
    torch.save(state, tmp_path / "r18.pth")
    s = spec(classes=3, size=64)
    s.extra.update(boxes="xyxy", objects_per_image=[1.0] * 3)
    cfg = MODELS["centernet"](backbone="tv-resnet18", neck=8, weights=str(tmp_path / "r18.pth"))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        model = cfg.build(s)
    note = next(str(x.message) for x in w if "loaded" in str(x.message))
    assert "loaded 120 tensors" in note and "unexpected 2" in note  # all but torchvision's fc
    own = model.state_dict()
    assert torch.equal(own["backbone.conv1.weight"], state["conv1.weight"])
    assert torch.equal(own["backbone.layer4.1.bn2.running_var"], state["layer4.1.bn2.running_var"])
    assert tuple(model(torch.randn(2, 3, 64, 64)).shape) == (2, 3 + 4, 16, 16)
    assert (list(s.mean), list(s.std)) == IMAGENET
    with pytest.raises(ConfigError, match="tv-resnet18"):
        MODELS["centernet"](weights="IMAGENET1K_V1").build(spec())


def test_timm_model_loads_a_timm_layout_file(tmp_path):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    src = timm.create_model("resnet18", pretrained=False)  # 1000 classes, timm's names
    path = tmp_path / "timm-r18.safetensors"
    from safetensors.torch import save_file

    save_file(src.state_dict(), str(path))
    s = spec(classes=5)
    model, notes = build("timm:resnet18", str(path), s)
    own = model.state_dict()
    assert set(own) == set(src.state_dict())
    assert all(torch.equal(v, src.state_dict()[k]) for k, v in own.items() if not k.startswith("fc."))
    assert model.get_classifier().out_features == 5 and head_name(model) == "fc"
    assert "missing 0, unexpected 0, shape-mismatched 2" in loaded(notes)
    assert (list(s.mean), [round(v, 3) for v in s.std]) == (IMAGENET[0], IMAGENET[1])
    with pytest.raises(ConfigError, match="timm has no model"):
        model_config_class("timm:no_such_net")(name="timm:no_such_net").build(spec())


def test_timm_tag_comes_from_timms_hub_cache_and_an_offline_miss_names_it(tmp_path, monkeypatch, offline):
    timm = pytest.importorskip("timm")
    constants = pytest.importorskip("huggingface_hub.constants")
    cache = tmp_path / "hf-hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # the hub's own offline switch: no request leaves
    repo = cache / "models--timm--resnet18.a1_in1k"
    with pytest.raises(UserError) as e:
        build("timm:resnet18", "a1_in1k", spec())
    assert "\n" not in str(e.value) and str(repo) in str(e.value)
    with pytest.raises(ConfigError, match="a1_in1k"):  # an unknown tag lists the published ones
        build("timm:resnet18", "b9_in1k", spec())
    torch.manual_seed(0)
    src = timm.create_model("resnet18", pretrained=False)
    rev = "0" * 40  # the hub cache's layout: refs/main names the snapshot that holds the files
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(rev)
    (repo / "snapshots" / rev).mkdir(parents=True)
    from safetensors.torch import save_file

    save_file(src.state_dict(), str(repo / "snapshots" / rev / "model.safetensors"))
    s = spec(classes=5)
    model, notes = build("timm:resnet18", "a1_in1k", s)
    assert all(torch.equal(v, src.state_dict()[k]) for k, v in model.state_dict().items() if not k.startswith("fc."))
    published = timm.models.get_pretrained_cfg("resnet18.a1_in1k")  # the tag's own inputs
    assert (s.mean, s.std) == (tuple(published.mean), tuple(published.std))
    assert "missing 0, unexpected 0, shape-mismatched 2" in loaded(notes)


# ------------------------------------------------------------------------------------------ end to end


def squares(root: Path, n: int = 8, size: int = 32) -> None:
    """red/ and blue/: n images each of a coloured square on a random dark background."""
    g = torch.Generator().manual_seed(0)
    for name, rgb in (("red", (220, 30, 30)), ("blue", (30, 30, 220))):
        (root / name).mkdir(parents=True)
        for i in range(n):
            img = torch.randint(0, 60, (size, size, 3), dtype=torch.uint8, generator=g)
            a, b = (int(v) for v in torch.randint(0, size // 2, (2,), generator=g))
            img[a : a + size // 2, b : b + size // 2] = torch.tensor(rgb, dtype=torch.uint8)
            Image.fromarray(img.numpy()).save(root / name / f"{i}.png")


def test_checks_make_batches_as_the_weights_expect(tmp_path):
    """deeprecipe check's batches (the batch check runs before any model is built) are normalized as the
    pretrained weights ask: gray files repeated to RGB, ImageNet's mean/std (oracle: torchvision's normalize)."""
    from deeprecipe.checks.core import Ctx
    from deeprecipe.checks.data import batch as batch_check
    from deeprecipe.families import get_family
    from deeprecipe.recipe import load

    squares(tmp_path / "img", n=3)
    weights = tmp_path / "r18.pth"
    torch.save(tv_resnet18_state(), weights)
    args = [f"data.path={tmp_path / 'img'}", "data.image_size=32", "data.channels=1", "data.val_fraction=0"]
    cfg = load("imagefolder-resnet", [*args, "model.name=tv-resnet18", f"model.weights={weights}", "train.device=cpu"])
    ctx = Ctx(cfg, tmp_path / "checks", get_family("classify"))
    x, _ = ctx.train_batch(0, augment=False)
    raw = ctx.data.train.take(torch.arange(len(ctx.data.train)))[0]  # (N, 1, 32, 32) uint8
    assert raw.shape[1] == 1 and x.shape[1] == 3
    want = torchvision.transforms.functional.normalize(raw.repeat(1, 3, 1, 1).float() / 255, *IMAGENET)
    assert any(torch.allclose(x[0], w, atol=1e-6) for w in want)
    v = batch_check(ctx)  # dark squares under ImageNet's mean/std are far from 0/1, as the weights want them
    assert v.status == "pass" and "r18.pth" in v.expected, v


@pytest.mark.slow
def test_fine_tuning_tv_resnet18_from_a_weights_file_runs_through_every_verb(tmp_path, cli):
    """train from a test-made torchvision file; the run's spec says ImageNet's mean/std; eval, predict, serve
    and the ONNX export all prepare an image that way (the oracle: the model fed torchvision's own
    normalization by hand), and none needs the weights file once the run exists."""
    from fastapi.testclient import TestClient

    from deeprecipe.cli.runs import open_run
    from deeprecipe.serve.export import run_onnx
    from deeprecipe.serve.server import ServeOptions, build_app

    squares(tmp_path / "img")
    weights = tmp_path / "resnet18.pth"
    torch.save(tv_resnet18_state(), weights)
    run = tmp_path / "run"
    args = ["data.path=" + str(tmp_path / "img"), "data.image_size=32", "data.val_fraction=0.25", "data.flip=true"]
    args += ["model.name=tv-resnet18", f"model.weights={weights}", "train.device=cpu", "train.precision=fp32"]
    args += ["train.steps=3", "train.batch_size=8", "train.eval_every=0", "train.log_every=1", "train.workers=0"]
    freeze = ["--freeze", "backbone", "--head-lr", "10"]  # model.weights is the start: no --init-from
    code, out, err = cli("train", "imagefolder-resnet", "--out", run, *freeze, *[a for s in args for a in ("--set", s)])
    assert code == 0, err
    assert "loaded 120 tensors, missing 0, unexpected 0, shape-mismatched 2" in err
    trained = checkpoint.inference_weights(run)
    source = tv_resnet18_state()
    for name, _ in torchvision.models.resnet18().named_parameters():  # the frozen backbone is the file's
        assert torch.equal(trained[name], source[name]) == (not name.startswith("fc.")), name
    assert json.loads((run / "finetune.json").read_text())["lr_scale"]["fc."] == 10
    saved = json.loads((run / "spec.json").read_text())
    assert [saved["mean"], saved["std"]] == list(IMAGENET) and saved["in_channels"] == 3
    weights.unlink()  # a finished run needs only its own folder

    code, out, err = cli("eval", run, "--json")
    assert code == 0, err
    files = [tmp_path / "img" / "red" / "0.png", tmp_path / "img" / "blue" / "1.png"]
    code, out, err = cli("predict", run, *files, "--json", "--top", "2")
    assert code == 0, err
    predicted = json.loads(out)
    cfg, s, model, rt, family = open_run(str(run), "cpu", "fp32")
    for f, p in zip(files, predicted):
        rgb = torch.from_numpy(np.array(Image.open(f).convert("RGB"))).permute(2, 0, 1).float() / 255
        x = torchvision.transforms.functional.normalize(rgb, *IMAGENET)[None]
        with torch.no_grad():
            want = model(x).softmax(-1)[0]
        got = {t["label"]: t["prob"] for t in p["top"]}
        assert got == pytest.approx({n: float(want[i]) for i, n in enumerate(s.class_names)}, abs=1e-4)

    with TestClient(build_app(str(run), cfg, s, model, rt, family, ServeOptions())) as c:
        r = c.post("/classify", files={"image": ("x.png", files[0].read_bytes(), "image/png")}, params={"top": 2})
        assert r.status_code == 200, r.text
        assert {t["label"]: t["prob"] for t in r.json()["top"]} == {t["label"]: t["prob"] for t in predicted[0]["top"]}

    code, out, err = cli("export", run)
    assert code == 0, err
    about = json.loads((run / "export" / "model.json").read_text())
    assert [about["mean"], about["std"]] == list(IMAGENET)
    rgb = torch.from_numpy(np.array(Image.open(files[1]).convert("RGB"))).permute(2, 0, 1).float() / 255
    x = torchvision.transforms.functional.normalize(rgb, *IMAGENET)[None].contiguous()
    (logits,) = run_onnx(run / "export" / "model.onnx", {"image": x})
    with torch.no_grad():
        assert torch.allclose(logits, model(x), atol=1e-4)
    best = predicted[1]["top"][0]
    assert float(logits.softmax(-1)[0, s.class_names.index(best["label"])]) == pytest.approx(best["prob"], abs=1e-4)
    torch.set_grad_enabled(True)
