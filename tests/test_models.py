"""Every registered model: builds from a tiny DataSpec, forward and backward, output shape, defaults resolve.

A family that registers a model adds a tiny case to TINY below; test_every_model_has_a_tiny_case fails until it
does, so no model enters the registry untested.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import pytest
import torch
import torch.nn as nn

from deeprecipe.data.core import DataSpec
from deeprecipe.models import MODELS, model_config_class


class Case(NamedTuple):
    cfg: object  # the model's config
    spec: DataSpec  # what the data tells the builder
    inputs: tuple  # the arguments of one call
    shape: tuple  # expected shape of the first output
    run: Callable | None = None  # (model, *inputs) -> output; None: model(*inputs)


def image_case(cfg, classes: int = 3, channels: int = 1, size: int = 8) -> Case:
    """A classifier on (B, C, H, W) images -> logits (B, classes)."""
    spec = DataSpec(
        num_classes=classes,
        class_names=[str(i) for i in range(classes)],
        in_channels=channels,
        image_size=(size, size),
        mean=(0.5,) * channels,
        std=(0.25,) * channels,
    )
    return Case(cfg, spec, (torch.randn(4, channels, size, size),), (4, classes))


def segment_case(cfg, classes: int = 5, channels: int = 3, size: tuple[int, int] = (10, 14)) -> Case:
    """Per-pixel classes: (B, C, H, W) -> logits (B, classes, H, W); sides that are not powers of two."""
    spec = DataSpec(
        num_classes=classes,
        class_names=[str(i) for i in range(classes)],
        in_channels=channels,
        image_size=size,
        mean=(0.5,) * channels,
        std=(0.25,) * channels,
    )
    return Case(cfg, spec, (torch.randn(4, channels, *size),), (4, classes, *size))


def video_case(cfg, classes: int = 5, channels: int = 3, frames: int = 4, size: int = 8) -> Case:
    """A clip classifier: (B, C, T, H, W) -> logits (B, classes)."""
    spec = DataSpec(
        num_classes=classes,
        class_names=[str(i) for i in range(classes)],
        in_channels=channels,
        image_size=(size, size),
        mean=(0.45,) * channels,
        std=(0.225,) * channels,
        extra={"frames": frames},
    )
    return Case(cfg, spec, (torch.randn(4, channels, frames, size, size),), (4, classes))


def lm_case(cfg, vocab: int = 31, block: int = 12) -> Case:
    """A language model: token ids (B, T) -> (logits (B, T, vocab), loss)."""
    spec = DataSpec(vocab_size=vocab, extra={"block_size": block})
    return Case(cfg, spec, (torch.randint(0, vocab, (4, block)),), (4, block, vocab))


def seq2seq_case(cfg, src_vocab: int = 37, vocab: int = 29) -> Case:
    """Translation: (source ids (B, S), target ids (B, T)) -> logits (B, T, vocab); separate vocabularies of
    different sizes (a source id fed to the target embedding would be out of range), padded ends."""
    spec = DataSpec(
        vocab_size=vocab, extra={"src_vocab": src_vocab, "shared_vocab": False, "pad": 0, "bos": 1, "eos": 2}
    )
    src = torch.randint(3, src_vocab, (4, 7))
    src[0, 5:] = 0
    tgt = torch.randint(3, vocab, (4, 6))
    tgt[:, 0] = 1
    tgt[1, 4:] = 0
    return Case(cfg, spec, (src, tgt), (4, 6, vocab))


def gan_step(model, n: int) -> torch.Tensor:
    """A GAN trains both of its nets: the discriminator's logits on generated images, D(G(z, y), y) -> (n,)."""
    z, y = model.noise(n)
    return model.discriminator(model(z, y), y)


def text_case(cfg, classes: int = 3, vocab: int = 23, max_len: int = 12) -> Case:
    """A text classifier: token ids (B, T), PAD (0) after the shorter texts -> logits (B, classes)."""
    names = [str(i) for i in range(classes)]
    spec = DataSpec(num_classes=classes, class_names=names, vocab_size=vocab, extra={"pad": 0, "max_len": max_len})
    ids = torch.randint(1, vocab, (4, max_len))
    ids[1, 5:] = 0
    return Case(cfg, spec, (ids,), (4, classes))


def gan_case(cfg, classes: int = 3, channels: int = 1, size: int = 6) -> Case:
    spec = DataSpec(
        num_classes=classes,
        class_names=[str(i) for i in range(classes)],
        in_channels=channels,
        image_size=(size, size),
        mean=(0.5,) * channels,
        std=(0.5,) * channels,
    )
    return Case(cfg, spec, (4,), (4,), gan_step)


def img2img_case(cfg, mode: str) -> Case:
    """An image-to-image net trains G and D: D's patch logits on G's output, (4, 1, 2, 2) for 16 px images."""
    two = mode == "unpaired"
    spec = DataSpec(
        num_classes=3,
        class_names=["a", "b", "c"],
        in_channels=6 if two else 3,
        image_size=(16, 16),
        mean=(0.5,) * (6 if two else 3),
        std=(0.25,) * (6 if two else 3),
        extra={"mode": mode, "scale": 4, "blur": 0.0, "noise": 0.0, "holes": "box", "hole_fraction": 0.25}
        | {"channels_a": 3},
    )

    def run(model, x):
        if two:  # both generators and both discriminators
            return model.discriminators["b"](model.ab(x)) + model.discriminators["a"](model.ba(model.ab(x)))
        return model.judge(x, model(x))

    return Case(cfg, spec, (torch.randn(4, 3, 16, 16),), (4, 1, 2, 2), run)


def detect_case(cfg, classes: int = 3, size: int = 32) -> Case:
    """A detector: images (B, 3, H, W) -> raw maps (B, classes + 4, H / 4, W / 4) (heat maps and box distances)."""
    spec = DataSpec(
        num_classes=classes,
        class_names=[str(i) for i in range(classes)],
        in_channels=3,
        image_size=(size, size),
        mean=(0.5,) * 3,
        std=(0.25,) * 3,
        extra={"boxes": "xyxy", "objects_per_image": [1.0] * classes},
    )
    return Case(cfg, spec, (torch.randn(2, 3, size, size),), (2, classes + 4, size // 4, size // 4))


def tv_detect_case(cfg, size: int = 64) -> Case:
    """A torchvision detector trains through its own losses: their sum for two images with boxes, shape (1,)."""
    case = detect_case(cfg, size=size)
    boxes = torch.tensor([[[4.0, 6.0, 30.0, 40.0], [0.0, 0.0, 0.0, 0.0]], [[10.0, 10.0, 50.0, 30.0], [2, 2, 12, 20]]])
    labels = torch.tensor([[0, -1], [2, 1]])
    return case._replace(shape=(1,), run=lambda m, x: m.loss(x, boxes, labels)[0].view(1))


TV_NAMES = ("tv-resnet18", "tv-resnet50", "tv-mobilenet-v3", "tv-efficientnet-b0", "tv-convnext-tiny")

# model name -> () -> its Case
TINY = {
    "centernet": lambda: detect_case(MODELS["centernet"](width=4, neck=8, max_width=16)),
    "tv-detector": lambda: tv_detect_case(MODELS["tv-detector"]()),
    "mlp": lambda: image_case(MODELS["mlp"](hidden=(16, 8))),
    "cnn": lambda: image_case(MODELS["cnn"](channels=(4, 8), dense=(8,)), channels=3),
    "resnet": lambda: image_case(MODELS["resnet"](layout="resnet8", width=4), channels=3, size=12),
    "gpt": lambda: lm_case(MODELS["gpt"](n_layer=2, n_head=2, n_embd=16)),
    "lstm": lambda: lm_case(MODELS["lstm"](n_layer=2, hidden=16, emb=8)),
    "seq2seq": lambda: seq2seq_case(MODELS["seq2seq"](d_model=16, n_head=2, enc_layers=1, dec_layers=2)),
    "unet": lambda: segment_case(MODELS["unet"](width=4, depth=2)),
    "unet-resnet18": lambda: segment_case(MODELS["unet-resnet18"](decoder=(16, 8, 8, 8, 4))),
    "fcn": lambda: segment_case(MODELS["fcn"](width=4, stages=3, skips=2)),
    "c3d": lambda: video_case(MODELS["c3d"](channels=(4, 8), convs=1)),
    "r2plus1d": lambda: video_case(MODELS["r2plus1d"](width=4, blocks=(1, 1), stem_stride=1)),
    "gan": lambda: gan_case(MODELS["gan"](latent=8, hidden=(16, 32), conditional=True, spectral_norm=True)),
    "dcgan": lambda: gan_case(MODELS["dcgan"](latent=8, g_width=4, d_width=4, conditional=True), size=28),
    "text-transformer": lambda: text_case(MODELS["text-transformer"](n_layer=2, n_head=2, d_model=16)),
    "text-lstm": lambda: text_case(MODELS["text-lstm"](n_layer=2, hidden=8, emb=8)),
    "pix2pix": lambda: img2img_case(MODELS["pix2pix"](width=4, depth=2, max_width=8, d_width=4, d_layers=3), "sr"),
    "cyclegan": lambda: img2img_case(
        MODELS["cyclegan"](width=4, depth=2, max_width=8, d_width=4, d_layers=3), "unpaired"
    ),
    # torchvision's classifiers at their published sizes (RGB, downsampling 32x): 32 px is the smallest input
    **{n: (lambda n=n: image_case(MODELS[n](), channels=3, size=32)) for n in TV_NAMES},
    "tv-r3d-18": lambda: video_case(MODELS["tv-r3d-18"]()),
    "tv-r2plus1d-18": lambda: video_case(MODELS["tv-r2plus1d-18"]()),
    "tv-deeplabv3-resnet50": lambda: segment_case(MODELS["tv-deeplabv3-resnet50"]()),
    "tv-fcn-resnet50": lambda: segment_case(MODELS["tv-fcn-resnet50"]()),
    "tv-lraspp-mobilenet-v3": lambda: segment_case(MODELS["tv-lraspp-mobilenet-v3"]()),
}


def first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def call(case: Case, model: nn.Module, inputs: tuple | None = None) -> torch.Tensor:
    inputs = case.inputs if inputs is None else inputs
    return first(case.run(model, *inputs) if case.run else model(*inputs))


def test_every_model_has_a_tiny_case():
    missing = sorted(set(MODELS) - set(TINY))
    assert not missing, f"add a tiny case to TINY in tests/test_models.py for: {missing}"


@pytest.mark.parametrize("name", sorted(MODELS))
def test_forward_backward_shape(name):
    if name not in TINY:
        pytest.fail(f"model '{name}' has no tiny case in TINY")
    torch.manual_seed(0)
    case = TINY[name]()
    assert model_config_class(name) is type(case.cfg)
    model = case.cfg.build(case.spec)
    assert isinstance(model, nn.Module)
    model.train()
    out = call(case, model)
    assert tuple(out.shape) == case.shape
    assert torch.isfinite(out).all()
    out.float().square().mean().backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable
    no_grad = [n for n, p in trainable if p.grad is None]
    assert not no_grad, f"parameters that get no gradient: {no_grad[:5]}"
    assert all(torch.isfinite(p.grad).all() for _, p in trainable)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_stage_outputs_are_the_stage_maps_in_order(name):
    """A model naming stages (attention transfer matches them) gives one (B, C, H, W) map per stage in the order
    named, each no larger than the one before; the others name none."""
    from deeprecipe.families.classify import captured

    case = TINY[name]()
    model = case.cfg.build(case.spec).eval()
    stages = model.stage_outputs() if hasattr(model, "stage_outputs") else []
    if not stages:
        assert name not in ("cnn", "resnet"), f"model '{name}' should name its stages"
        return
    with torch.no_grad(), captured(stages) as maps:
        call(case, model)
    assert len(maps) == len(stages) and all(m.ndim == 4 and len(m) == len(case.inputs[0]) for m in maps)
    sides = [m.shape[-2] * m.shape[-1] for m in maps]
    assert sides == sorted(sides, reverse=True) and sides[0] <= case.inputs[0].shape[-2] * case.inputs[0].shape[-1]


def logit_classes(case: Case) -> int:
    """The number of classes when the first output is logits over classes (axis 1: per image, pixel or clip)
    or over a vocabulary (last axis: per token); 0 for other outputs (a GAN's discriminator logit)."""
    shape, spec = case.shape, case.spec
    if spec.num_classes and len(shape) >= 2 and shape[1] == spec.num_classes:
        return spec.num_classes
    if spec.vocab_size and len(shape) >= 2 and shape[-1] == spec.vocab_size:
        return spec.vocab_size
    return 0


@pytest.mark.parametrize("name", sorted(n for n in TINY if logit_classes(TINY[n]())))
def test_loss_at_init_near_log_classes(name):
    """A classifier or language model whose head is initialised sanely starts near ln(C) (style.md: loss at
    init), whether C counts classes of images, pixels, clips or tokens."""
    torch.manual_seed(0)
    case = TINY[name]()
    classes = logit_classes(case)
    model = case.cfg.build(case.spec).eval()
    inputs = case.inputs
    if inputs[0].is_floating_point():  # images or clips: a bigger batch for a steadier mean
        inputs = (torch.randn(64, *inputs[0].shape[1:]),)
    with torch.no_grad():
        logits = call(case, model, inputs).float()
    if logits.shape[1] != classes:  # tokens: (B, T, vocab) -> (B, vocab, T)
        logits = logits.movedim(-1, 1)
    target = torch.randint(0, classes, (logits.shape[0], *logits.shape[2:]))
    loss = nn.functional.cross_entropy(logits, target)
    assert abs(loss.item() - math.log(classes)) < 0.5 * math.log(classes)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_default_config_builds_for_its_case(name):
    """The documented defaults (what a recipe gets when it names only the model) build too."""
    torch.manual_seed(0)
    case = TINY[name]()
    model = MODELS[name]().build(case.spec).eval()
    with torch.no_grad():
        assert tuple(call(case, model).shape) == case.shape


def test_resnet_rejects_unknown_layout():
    from deeprecipe.config import ConfigError, from_dict

    with pytest.raises(ConfigError, match="^model.layout=resnet7: .*resnet20"):
        from_dict(MODELS["resnet"], {"layout": "resnet7"}, "model")


def test_user_model_file(tmp_path):
    """model.name: path/to/file.py:Name builds the user's module, given the spec's fields it asks for."""
    f = tmp_path / "mine.py"
    f.write_text(
        "import torch.nn as nn\n"
        "def Net(num_classes, in_channels, image_size, width=5):\n"
        "    h, w = image_size\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * h * w, width),"
        " nn.Linear(width, num_classes))\n"
    )
    cls = model_config_class(f"{f}:Net")
    cfg = cls(name=f"{f}:Net", args={"width": 7})
    case = image_case(None)
    model = cfg.build(case.spec)
    assert model[1].out_features == 7
    assert tuple(model(*case.inputs).shape) == case.shape


@pytest.mark.parametrize("depth", [1, 2])
def test_cnn_pools_before_relu_with_the_textbook_values_and_gradients(depth):
    """The CNN max-pools before its ReLU (a quarter of the elements to rectify); the oracle is the textbook
    conv -> BN -> ReLU -> pool order on the same modules: equal outputs and equal weight gradients. With depth 2
    each width is VGG's block: conv -> BN -> ReLU -> conv -> BN -> (pool) -> ReLU."""
    from deeprecipe.models.cnn import CNNConfig

    torch.manual_seed(0)
    spec = DataSpec(num_classes=4, class_names=list("abcd"), in_channels=1, image_size=(12, 12))
    model = CNNConfig(channels=(4, 6, 8), depth=depth, dense=(5,), dropout=0.0).build(spec).train()
    mods = list(model.features)
    convs = [(m.in_channels, m.out_channels) for m in mods if isinstance(m, nn.Conv2d)]
    want = {1: [(1, 4), (4, 6), (6, 8)], 2: [(1, 4), (4, 4), (4, 6), (6, 6), (6, 8), (8, 8)]}[depth]
    assert convs == want and sum(isinstance(m, nn.ReLU) for m in mods) == len(want)
    pools = [i for i, m in enumerate(mods) if isinstance(m, nn.MaxPool2d)]
    assert pools and all(isinstance(mods[i + 1], nn.ReLU) for i in pools)  # the order under test
    textbook = list(mods)
    for i in pools:
        textbook[i], textbook[i + 1] = textbook[i + 1], textbook[i]
    x = torch.randn(3, 1, 12, 12)
    ours = model(x)
    ours.square().sum().backward()
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    ref = model.head(model.dense(nn.Sequential(*textbook)(x)))
    ref.square().sum().backward()
    torch.testing.assert_close(ours, ref)
    for g, p in zip(got, model.parameters()):
        torch.testing.assert_close(g, p.grad)
