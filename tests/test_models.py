"""Every registered model: builds from a tiny DataSpec, forward and backward, output shape, defaults resolve.

A family that registers a model adds a tiny case to TINY below; test_every_model_has_a_tiny_case fails until it
does, so no model enters the registry untested.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from deeprecipe.data.core import DataSpec
from deeprecipe.models import MODELS, model_config_class


def image_case(cfg, classes: int = 3, channels: int = 1, size: int = 8):
    """A classifier on (B, C, H, W) images -> logits (B, classes)."""
    spec = DataSpec(
        num_classes=classes,
        class_names=[str(i) for i in range(classes)],
        in_channels=channels,
        image_size=(size, size),
        mean=(0.5,) * channels,
        std=(0.25,) * channels,
    )
    return cfg, spec, (torch.randn(4, channels, size, size),), (4, classes)


# model name -> () -> (model config, spec, inputs, expected shape of the first output)
TINY = {
    "mlp": lambda: image_case(MODELS["mlp"](hidden=(16, 8))),
    "cnn": lambda: image_case(MODELS["cnn"](channels=(4, 8), dense=(8,)), channels=3),
    "resnet": lambda: image_case(MODELS["resnet"](layout="resnet8", width=4), channels=3, size=12),
}


def first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def test_every_model_has_a_tiny_case():
    missing = sorted(set(MODELS) - set(TINY))
    assert not missing, f"add a tiny case to TINY in tests/test_models.py for: {missing}"


@pytest.mark.parametrize("name", sorted(MODELS))
def test_forward_backward_shape(name):
    if name not in TINY:
        pytest.fail(f"model '{name}' has no tiny case in TINY")
    torch.manual_seed(0)
    cfg, spec, inputs, shape = TINY[name]()
    assert model_config_class(name) is type(cfg)
    model = cfg.build(spec)
    assert isinstance(model, nn.Module)
    model.train()
    out = first(model(*inputs))
    assert tuple(out.shape) == shape
    assert torch.isfinite(out).all()
    out.float().square().mean().backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable
    no_grad = [n for n, p in trainable if p.grad is None]
    assert not no_grad, f"parameters that get no gradient: {no_grad[:5]}"
    assert all(torch.isfinite(p.grad).all() for _, p in trainable)


@pytest.mark.parametrize("name", sorted(n for n in TINY if TINY[n]()[1].num_classes))
def test_classifier_loss_at_init_near_log_classes(name):
    """A classifier whose head is initialised sanely starts near ln(C) (style.md: loss at init)."""
    torch.manual_seed(0)
    cfg, spec, inputs, shape = TINY[name]()
    model = cfg.build(spec).eval()
    x = torch.randn(64, *inputs[0].shape[1:])
    with torch.no_grad():
        loss = nn.functional.cross_entropy(first(model(x)), torch.randint(0, spec.num_classes, (64,)))
    assert abs(loss.item() - math.log(spec.num_classes)) < 0.5 * math.log(spec.num_classes)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_default_config_builds_for_its_case(name):
    """The documented defaults (what a recipe gets when it names only the model) build too."""
    _, spec, inputs, shape = TINY[name]()
    model = MODELS[name]().build(spec).eval()
    with torch.no_grad():
        assert tuple(first(model(*inputs)).shape) == shape


def test_resnet_rejects_unknown_layout():
    from deeprecipe.config import ConfigError

    with pytest.raises(ConfigError, match="resnet20"):
        MODELS["resnet"](layout="resnet7").build(image_case(None)[1])


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
    _, spec, inputs, shape = image_case(None)
    model = cfg.build(spec)
    assert model[1].out_features == 7
    assert tuple(model(*inputs).shape) == shape
