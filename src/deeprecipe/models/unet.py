"""U-Net (Ronneberger et al., 2015): an encoder that halves the resolution `depth` times, a decoder that
doubles it back, and skip connections that hand each decoder level the encoder's features at that size.

    x (B, C, H, W) -> [double conv -> maxpool] x depth -> double conv (bottleneck)
      -> [upsample x2 -> concat skip -> double conv] x depth -> 1x1 conv -> logits (B, classes, H, W)

Widths double per level from `width` (capped at `max_width`). Inputs whose sides are not multiples of
2**depth are padded and the logits cropped back, so any image size works.

`unet-resnet18`: the encoder is torchvision's ResNet-18 (its modules and names under `encoder.`, so its
published ImageNet weights load into it: `model.weights`, models/pretrained.py), its stem and four stages the
skips at strides 2, 4, 8, 16 and 32; the decoder goes back up the same way to a 1x1 head at full size.
Input RGB (B, 3, H, W) normalized as the weights were trained; logits (B, classes, H, W).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from deeprecipe.config import ranged
from deeprecipe.core import ConfigError, DataSpec
from deeprecipe.models.head import Classifier
from deeprecipe.models.pretrained import torchvision_start


@dataclass
class UNetConfig:
    name: str = "unet"
    width: int = ranged(32, "> 0")  # channels of the first level; doubled at each level down
    depth: int = ranged(4, "> 0")  # number of 2x down-samplings
    max_width: int = 256  # cap on the channels of the deep levels
    dropout: float = ranged(0.0, "[0, 1)")  # dropout in the bottleneck
    dice: float = ranged(0.0, ">= 0")  # weight of the Dice loss added to cross-entropy (tasks/segment.py reads it)

    def build(self, spec: DataSpec) -> nn.Module:
        return UNet(spec.in_channels, spec.num_classes, self.width, self.depth, self.max_width, self.dropout)


def double_conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class UNet(Classifier, nn.Module):
    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        width: int = 32,
        depth: int = 4,
        max_width: int = 256,
        dropout: float = 0.0,
    ):
        super().__init__()
        widths = [min(width * 2**i, max_width) for i in range(depth + 1)]  # per level, top to bottom
        self.down = nn.ModuleList()
        cin = in_channels
        for w in widths[:-1]:
            self.down.append(double_conv(cin, w))
            cin = w
        self.bottleneck = nn.Sequential(double_conv(cin, widths[-1]), nn.Dropout2d(dropout))
        self.up = nn.ModuleList()
        cin = widths[-1]
        for w in reversed(widths[:-1]):
            self.up.append(double_conv(cin + w, w))  # upsampled deeper features + the skip
            cin = w
        self.head = nn.Conv2d(cin, num_classes, 1)
        self.multiple = 2**depth
        # How far (input pixels) an output pixel sees, a bound: per level of scale s = 2^i the double conv adds
        # 2s going down and again going up, the max-pool s, the bilinear up-sampling 2s; the bottleneck 2 * 2^depth.
        # Tiles aligned to `multiple` that overlap by `reach` give exactly the whole image's output (families/img2img).
        self.reach = 7 * (self.multiple - 1) + 2 * self.multiple

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, classes, H, W)
        H, W = x.shape[-2:]
        ph, pw = -H % self.multiple, -W % self.multiple
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph), mode="replicate")
        skips = []
        for block in self.down:
            x = block(x)
            skips.append(x)  # (B, w_i, H / 2^i, W / 2^i)
            x = F.max_pool2d(x, 2)
        x = self.bottleneck(x)
        for block, skip in zip(self.up, reversed(skips)):
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = block(torch.cat([x, skip], 1))
        return self.head(x)[..., :H, :W]


@dataclass
class ResNetUNetConfig:
    name: str = "unet-resnet18"
    weights: str = ""  # the encoder's: a ResNet-18 file (torchvision's layout) or torchvision's name (IMAGENET1K_V1)
    decoder: tuple[int, ...] = (256, 128, 64, 64, 32)  # widths at strides 16, 8, 4, 2 and at full size
    progress: bool = True  # show torch.hub's progress bar while the weights download
    dice: float = ranged(0.0, ">= 0")  # weight of the Dice loss added to cross-entropy (the segment family reads it)

    def build(self, spec: DataSpec) -> nn.Module:
        if len(self.decoder) != 5:
            raise ConfigError(f"model.decoder={list(self.decoder)}: give 5 widths (strides 16, 8, 4, 2, 1)")
        # ResNet-18's names land under encoder. (models/pretrained.py best_prefix)
        return torchvision_start(
            ResNetUNet(spec.num_classes, self.decoder), spec, self.weights, "resnet18", self.progress
        )


class ResNetUNet(Classifier, nn.Module):
    def __init__(self, num_classes: int, decoder: tuple[int, ...]):
        super().__init__()
        from torchvision.models import resnet18

        self.encoder = resnet18(weights=None, zero_init_residual=True)
        del self.encoder.fc  # the classifier is not part of the encoder (a published file's fc is unexpected)
        skips = (256, 128, 64, 64)  # layer3, layer2, layer1, stem: the skips on the way up
        self.up = nn.ModuleList()
        cin = 512
        for skip, w in zip(skips, decoder[:4]):
            self.up.append(double_conv(cin + skip, w))
            cin = w
        self.top = double_conv(cin, decoder[4])  # at full size, after the last upsampling
        self.head = nn.Conv2d(decoder[4], num_classes, 1)
        nn.init.normal_(self.head.weight, std=0.01)  # every class equally likely at init: loss ln C
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, classes, H, W)
        H, W = x.shape[-2:]
        ph, pw = -H % 32, -W % 32  # the encoder halves the size five times
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph), mode="replicate")
        e = self.encoder
        x0 = e.relu(e.bn1(e.conv1(x)))  # (B, 64, H/2, W/2)
        x1 = e.layer1(e.maxpool(x0))  # (B, 64, H/4, W/4)
        x2 = e.layer2(x1)  # (B, 128, H/8, W/8)
        x3 = e.layer3(x2)  # (B, 256, H/16, W/16)
        d = e.layer4(x3)  # (B, 512, H/32, W/32)
        for block, skip in zip(self.up, (x3, x2, x1, x0)):
            d = F.interpolate(d, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            d = block(torch.cat([d, skip], 1))
        d = self.top(F.interpolate(d, size=x.shape[-2:], mode="bilinear", align_corners=False))
        return self.head(d)[..., :H, :W]
