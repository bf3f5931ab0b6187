"""Model-zoo classifiers: torchvision's own builders (`tv-resnet18`, ..., the video nets `tv-r3d-18` and
`tv-r2plus1d-18`) and any timm model (`timm:NAME`).

Each is the library's network as published (same modules, same state-dict names, so its published weights load
by name), with the classifier sized to the data's classes and timm's head API (`get_classifier()`,
`reset_classifier(n)`). Input: RGB images (B, 3, H, W), or clips (B, 3, T, H, W) for the video nets, normalized
the way the weights were trained (mean/std of their metadata: models/pretrained.py follow_weights records them in
the spec; gray data is repeated to three channels); output: logits (B, classes). The image nets downsample 32x,
so images of at least 32 pixels a side.

`model.weights` gives the first weights (models/pretrained.py): a local file, or a published name fetched by the
library into its cache (torchvision: IMAGENET1K_V1, KINETICS400_V1, DEFAULT, ...; timm: a pretrained tag, or
`pretrained` for the model's default tag). The classifier's tensors are the expected mismatch and stay fresh.
"""

from __future__ import annotations

from dataclasses import dataclass, field, make_dataclass
from pathlib import Path

import torch.nn as nn

from deeprecipe.core import ConfigError, DataSpec, UserError, require
from deeprecipe.models.head import fresh_like
from deeprecipe.models.pretrained import (
    follow_weights,
    is_file,
    load,
    mix_in,
    read_file,
    strip,
    torchvision_start,
)

TV_ARCHS = {  # registry name -> torchvision.models.get_model name
    "tv-resnet18": "resnet18",
    "tv-resnet50": "resnet50",
    "tv-mobilenet-v3": "mobilenet_v3_large",
    "tv-efficientnet-b0": "efficientnet_b0",
    "tv-convnext-tiny": "convnext_tiny",
    "tv-r3d-18": "r3d_18",  # video: clips (B, 3, T, H, W), Kinetics-400 weights
    "tv-r2plus1d-18": "r2plus1d_18",
}


@dataclass
class TVClassifierConfig:
    name: str = "tv-resnet18"  # one of TV_ARCHS
    weights: str = ""  # a .pth/.pt/.safetensors file or a published name (IMAGENET1K_V1, DEFAULT); "": none
    progress: bool = True  # show torch.hub's progress bar while the weights download

    def build(self, spec: DataSpec) -> nn.Module:
        from torchvision.models import get_model

        if self.name not in TV_ARCHS:
            raise ConfigError(f"model.name={self.name}: not a torchvision classifier ({', '.join(TV_ARCHS)})")
        arch = TV_ARCHS[self.name]
        # residual branches start at zero (their last BatchNorm's scale), as our own ResNet's: at random init
        # the blocks are identities and a 50-layer net's activations stay in range (ln C at init, not ~3x that)
        extra = {"zero_init_residual": True} if arch.startswith(("resnet", "r3d", "r2plus1d")) else {}
        net = mix_in(get_model(arch, weights=None, **extra))
        net.reset_classifier(spec.num_classes)
        # a file carries no metadata: it is taken for torchvision's published weights of this arch (what its
        # layout says), whose inputs the DEFAULT entry describes
        return torchvision_start(net, spec, self.weights, arch, self.progress)


# ------------------------------------------------------------------------------------------ segmenters

TV_SEGMENTERS = {  # registry name -> (torchvision segmenter, its backbone classifier)
    "tv-deeplabv3-resnet50": ("deeplabv3_resnet50", "resnet50"),
    "tv-fcn-resnet50": ("fcn_resnet50", "resnet50"),
    "tv-lraspp-mobilenet-v3": ("lraspp_mobilenet_v3_large", "mobilenet_v3_large"),
}


class DenseLogits:
    """Mixed into a torchvision segmenter's class: forward gives the logits (B, classes, H, W) at the input's size
    (torchvision's nets return a dict); the head is `classifier`, its class convs re-made by reset_classifier."""

    def forward(self, x):
        return super().forward(x)["out"]

    def get_classifier(self) -> nn.Module:
        return self.classifier

    def reset_classifier(self, num_classes: int) -> None:
        """Fresh class convs (LR-ASPP has two, summed) for `num_classes`: small weights, zero bias (ln C at init)."""
        outs = [m.out_channels for m in self.classifier.modules() if isinstance(m, nn.Conv2d)]
        for name, m in list(self.classifier.named_modules()):
            if isinstance(m, nn.Conv2d) and m.out_channels == outs[-1] and m.kernel_size == (1, 1):
                self.classifier.set_submodule(name, fresh_like(m, num_classes))


@dataclass
class TVSegmenterConfig:
    name: str = "tv-deeplabv3-resnet50"  # one of TV_SEGMENTERS
    # a .pth/.safetensors file (a segmenter's, or its backbone classifier's: read into backbone.), a published name
    # of the segmenter (COCO_WITH_VOC_LABELS_V1) or of its backbone (IMAGENET1K_V1, ...); "": none
    weights: str = ""
    progress: bool = True  # show torch.hub's progress bar while the weights download

    def build(self, spec: DataSpec) -> nn.Module:
        from torchvision.models import get_model, get_model_weights

        arch, backbone = TV_SEGMENTERS[self.name]
        aux = {} if arch.startswith("lraspp") else {"aux_loss": False}  # the run trains on "out" alone
        net = get_model(arch, weights=None, weights_backbone=None, num_classes=spec.num_classes, **aux)
        net = mix_in(net, DenseLogits)
        net.reset_classifier(spec.num_classes)
        # a published name is the segmenter's own, else its backbone's (ImageNet classifier weights)
        own, other = get_model_weights(arch).__members__, get_model_weights(backbone).__members__
        file = bool(self.weights) and is_file(self.weights)
        if self.weights and not file and self.weights not in own and self.weights not in other:
            raise ConfigError(
                f"model.weights={self.weights}: not a file, nor a published name of torchvision's {arch} "
                f"({', '.join(own)}) or of its backbone {backbone} ({', '.join(other)})"
            )
        source = arch if file or self.weights in own else backbone
        return torchvision_start(net, spec, self.weights, source, self.progress)


def named(base: type, names) -> dict[str, type]:
    """One config class per registry name: `base` with that name as its `name` default (what the registry's tests
    and `model.name` switching rely on)."""
    cls = lambda n: make_dataclass(base.__name__, [("name", str, field(default=n))], bases=(base,))
    return {n: cls(n) for n in names}


TV_CONFIGS = {**named(TVClassifierConfig, TV_ARCHS), **named(TVSegmenterConfig, TV_SEGMENTERS)}


# ------------------------------------------------------------------------------------------ timm


@dataclass
class TimmConfig:
    """`model.name: timm:NAME` (pip install 'deeprecipe[timm]'): timm.create_model(NAME, num_classes=...)."""

    name: str = "timm:resnet18"
    weights: str = ""  # a .pth/.safetensors file, a pretrained tag of NAME (a1_in1k, ...), or "pretrained"; "": none
    args: dict | None = None  # more keyword arguments of timm.create_model (drop_rate, drop_path_rate, ...)

    def build(self, spec: DataSpec) -> nn.Module:
        timm = import_timm()
        arch = self.name.removeprefix("timm:")
        if not timm.is_model(arch):
            near = timm.list_models(f"*{arch.split('.')[0][:6]}*")[:5]
            raise ConfigError(f"model.name={self.name}: timm has no model {arch!r} (similar: {', '.join(near)})")
        net = timm.create_model(arch, pretrained=False, num_classes=spec.num_classes, **(self.args or {}))
        inputs = None
        if self.weights:
            # a file is taken for NAME's default pretrained weights; a tag's inputs are its own (CLIP's mean/std
            # are not ImageNet's)
            if is_file(self.weights):
                state, cfg = read_file(self.weights), net.pretrained_cfg
            else:
                state, cfg = timm_state(timm, arch, self.weights)
            load(net, state, self.weights)
            inputs = {"mean": list(cfg["mean"]), "std": list(cfg["std"]), "size": int(cfg["input_size"][-1])}
        follow_weights(spec, inputs, self.weights)
        return net


def import_timm():
    return require("timm", "timm", "model.name timm:NAME")


def timm_state(timm, arch: str, tag: str) -> tuple[dict, dict]:
    """The published weights of `arch` with pretrained tag `tag` ("pretrained": its default), fetched by timm's own
    hub mechanism (the Hugging Face hub, its cache) with the original head (load() then keeps the data's head),
    and their pretrained_cfg (mean, std, input_size)."""
    base = arch.split(".")[0]
    name = arch if tag == "pretrained" else f"{base}.{tag}"
    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except RuntimeError:
        cfg = None
    if cfg is None:
        tags = [t.split(".", 1)[1] for t in timm.list_pretrained(f"{base}.*")]
        raise ConfigError(f"model.weights={tag}: timm publishes no weights {name} (tags of {base}: {', '.join(tags)})")
    try:
        published = timm.create_model(name, pretrained=True)
        return strip(published.state_dict()), published.pretrained_cfg
    except Exception as e:  # offline without a cached copy, a damaged download, ...
        constants = require("huggingface_hub.constants", "timm")  # where timm's hub downloads go
        repo = Path(constants.HF_HUB_CACHE) / ("models--" + (cfg.hf_hub_id or "").replace("/", "--"))
        where = f"the hub repository {cfg.hf_hub_id} in {repo}" if cfg.hf_hub_id else f"{cfg.url} in timm's cache"
        raise UserError(
            f"model.weights={tag}: timm could not fetch the weights of {name} ({type(e).__name__}); expected "
            f"{where} (fetched when online), or give a downloaded file as model.weights"
        ) from None
