"""Image-to-image nets: pix2pix (Isola et al., 2017) and CycleGAN (Zhu et al., 2017).

Both generators are the shared U-Net (models/unet.py) with as many outputs as the image has channels; both
discriminators are PatchGANs: a few stride-2 4x4 convolutions that give one real/fake logit per patch
(B, 1, h, w) instead of one per image, so D judges texture and G's L1 loss keeps the layout.

`Pix2Pix` holds G and D (one module for checkpoints, export and serve); calling it runs G on the input the
img2img family prepares, in [-1, 1]:
    sr           x = the low-res image upsampled (bicubic) to the output size (B, C, H, W); out = x + G(x)
                 (G learns the residual the bicubic upsampling misses)
    inpaint      x = the image with its holes zeroed and the mask (1 = hole) as a last channel (B, C + 1, H, W);
                 out = the image outside the holes, tanh(G(x)) inside
    label2image  x = one-hot labels (B, K, H, W); out = tanh(G(x))
    paired       x = image A (B, Ca, H, W); out = tanh(G(x)) (B, Cb, H, W)
D sees the input and an output stacked on the channels (a conditional PatchGAN).

`CycleGAN` holds G_ab, G_ba (as `generators`) and D_a, D_b (as `discriminators`, unconditional PatchGANs);
calling it translates A -> B.

No classifier API (models/head.py): generators and PatchGAN critics, no class scores.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from deeprecipe.config import ranged
from deeprecipe.core import ConfigError, DataSpec
from deeprecipe.models.unet import UNet

MODES = ("sr", "inpaint", "label2image", "paired", "unpaired")


class PatchGAN(nn.Module):
    """(B, C, H, W) -> (B, 1, H / 2^layers, W / 2^layers) logits: layers x [Conv 4x4 stride 2, norm, LeakyReLU],
    then a 3x3 conv to one logit per patch. InstanceNorm (no batch statistics) keeps examples apart."""

    def __init__(self, channels: int, width: int = 64, layers: int = 3):
        super().__init__()
        seq, c = [], channels
        for i in range(layers):
            w = width * 2 ** min(i, 3)
            seq += [nn.Conv2d(c, w, 4, 2, 1, bias=i == 0)]
            seq += [nn.InstanceNorm2d(w, affine=True)] if i > 0 else []
            seq += [nn.LeakyReLU(0.2, inplace=True)]
            c = w
        seq += [nn.Conv2d(c, 1, 3, 1, 1)]
        self.net = nn.Sequential(*seq)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def channels_of(spec: DataSpec) -> tuple[int, int, str]:
    """(input channels of G, output channels, mode) for an img2img data spec."""
    mode = spec.extra.get("mode", "")
    if mode not in MODES:
        raise ConfigError(f"the pix2pix and cyclegan models need img2img data (data.name=img2img), not mode {mode!r}")
    c = spec.in_channels
    if mode in ("paired", "unpaired"):
        ca = int(spec.extra["channels_a"])
        return ca, c - ca, mode
    if mode == "inpaint":
        return c + 1, c, mode
    if mode == "label2image":
        return spec.num_classes, c, mode
    return c, c, mode


class Pix2Pix(nn.Module):
    """G and D; forward(x) = G's image (see the module docstring)."""

    def __init__(self, generator: nn.Module, discriminator: nn.Module, mode: str, out_channels: int, unshuffle=1):
        super().__init__()
        self.generator, self.discriminator = generator, discriminator
        self.mode, self.out_channels, self.unshuffle = mode, out_channels, unshuffle
        # what exact tiling needs (families/img2img.tiled): G's size multiple and reach (models/unet.py), in pixels
        self.multiple = generator.multiple * unshuffle
        self.reach = generator.reach * unshuffle

    def g(self, x: torch.Tensor) -> torch.Tensor:
        """G's raw output; with `unshuffle` f > 1, G works on the input's f x f blocks stacked on the channels
        (pixel_unshuffle: nothing lost, f^2 fewer pixels) and its output is unstacked (pixel_shuffle)."""
        f = self.unshuffle
        if f == 1:
            return self.generator(x)
        H, W = x.shape[-2:]
        x = F.pad(x, (0, -W % f, 0, -H % f), mode="replicate") if H % f or W % f else x
        return F.pixel_shuffle(self.generator(F.pixel_unshuffle(x, f)), f)[..., :H, :W]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.g(x)
        if self.mode == "sr":
            return x + y
        y = torch.tanh(y)
        if self.mode == "inpaint":
            hole = x[:, -1:]
            return x[:, :-1] * (1 - hole) + y * hole
        return y

    def judge(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """D's patch logits for output y given input x."""
        return self.discriminator(torch.cat([x, y], 1))


@dataclass
class Pix2PixConfig:
    """pix2pix: a U-Net generator and a PatchGAN discriminator, trained with L1 + adversarial loss."""

    name: str = "pix2pix"
    width: int = ranged(32, "> 0")  # U-Net width of the first level (doubled per level down)
    depth: int = ranged(4, "> 0")  # U-Net down-samplings
    max_width: int = 256
    d_width: int = 32  # PatchGAN width of its first layer
    d_layers: int = 3  # PatchGAN stride-2 layers (the patch grows with them: 3 -> about 30 pixels)
    unshuffle: Literal[1, 2, 4] = 1  # G works on f x f pixel blocks stacked on the channels (f^2 fewer pixels)
    l1: float = 100.0  # weight of the pixel loss of G
    pixel_loss: Literal["l1", "mse"] = "l1"  # l1 (pix2pix's: sharper) | mse (the conditional mean: best PSNR)
    adv: float = 1.0  # weight of the adversarial loss of G (0: a plain pixel regression, D neither run nor trained)
    loss: Literal["nonsat", "hinge"] = "nonsat"  # common/adversarial.py
    d_lr_scale: float = ranged(1.0, "> 0")  # D's lr = optim.lr * this
    feature_recipe: str = "auto"  # domain FID of translations. Scenes: a segment recipe (a U-Net) trained on the
    #                               scenes, its encoder the feature net (auto: scenes-unet); two folders (pairs): a
    #                               classify recipe trained on A vs B (auto: imagefolder-resnet); none: no FID
    feature_steps: int = 0  # train the feature net this many steps (0: as its recipe says)
    fid_weights: str = ""  # path to the FID Inception weights (pt_inception-2015-12-05-6726825d.pth): the standard
    #                         FID `fid_standard` of the outputs too, any mode (never downloaded; common/fid.py)

    def build(self, spec: DataSpec) -> Pix2Pix:
        cin, cout, mode = channels_of(spec)
        if mode == "unpaired":
            raise ConfigError("data.mode=unpaired has no pairs to learn from: use model.name=cyclegan")
        f = self.unshuffle
        g = UNet(cin * f * f, cout * f * f, self.width, self.depth, self.max_width)
        if mode == "sr":  # start near the bicubic up-sampling: a small residual
            with torch.no_grad():
                g.head.weight.mul_(0.1)
                g.head.bias.zero_()
        return Pix2Pix(g, PatchGAN(cin + cout, self.d_width, self.d_layers), mode, cout, f)


class CycleGAN(nn.Module):
    """G_ab, G_ba, D_a, D_b; forward(a) = G_ab(a) in [-1, 1]."""

    def __init__(self, g_ab: nn.Module, g_ba: nn.Module, d_a: nn.Module, d_b: nn.Module):
        super().__init__()
        self.generators = nn.ModuleDict({"ab": g_ab, "ba": g_ba})
        self.discriminators = nn.ModuleDict({"a": d_a, "b": d_b})
        self.mode = "unpaired"

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        return self.ab(a)

    def ab(self, a: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.generators["ab"](a))

    def ba(self, b: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.generators["ba"](b))


@dataclass
class CycleGANConfig:
    """CycleGAN: two U-Net generators (A -> B, B -> A) and two PatchGANs, with cycle and identity losses."""

    name: str = "cyclegan"
    width: int = ranged(32, "> 0")
    depth: int = ranged(4, "> 0")
    max_width: int = 256
    d_width: int = 32
    d_layers: int = 3
    cycle: float = 10.0  # weight of |G_ba(G_ab(a)) - a| + |G_ab(G_ba(b)) - b|
    identity: float = 5.0  # weight of |G_ab(b) - b| + |G_ba(a) - a| (keeps colours; needs Ca == Cb)
    adv: float = 1.0
    loss: Literal["nonsat", "hinge"] = "nonsat"
    d_lr_scale: float = ranged(1.0, "> 0")
    feature_recipe: str = "auto"  # domain FID of translations (as for pix2pix; none: no FID)
    feature_steps: int = 0
    fid_weights: str = ""  # the standard FID's weights file (as for pix2pix)

    def build(self, spec: DataSpec) -> CycleGAN:
        ca, cb, mode = channels_of(spec)
        if mode not in ("paired", "unpaired"):
            raise ConfigError(f"model.name=cyclegan translates between two image sets: data.mode={mode} is not one")
        if self.identity and ca != cb:
            raise ConfigError(f"model.identity={self.identity} needs as many channels in A ({ca}) as in B ({cb})")

        def unet(cin, cout):
            return UNet(cin, cout, self.width, self.depth, self.max_width)

        return CycleGAN(
            unet(ca, cb),
            unet(cb, ca),
            PatchGAN(ca, self.d_width, self.d_layers),
            PatchGAN(cb, self.d_width, self.d_layers),
        )
