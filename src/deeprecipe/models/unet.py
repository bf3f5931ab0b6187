"""U-Net (Ronneberger et al., 2015): an encoder that halves the resolution `depth` times, a decoder that
doubles it back, and skip connections that hand each decoder level the encoder's features at that size.

    x (B, C, H, W) -> [double conv -> maxpool] x depth -> double conv (bottleneck)
      -> [upsample x2 -> concat skip -> double conv] x depth -> 1x1 conv -> logits (B, classes, H, W)

Widths double per level from `width` (capped at `max_width`). Inputs whose sides are not multiples of
2**depth are padded and the logits cropped back, so any image size works.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from deeprecipe.core import DataSpec


@dataclass
class UNetConfig:
    name: str = "unet"
    width: int = 32  # channels of the first level; doubled at each level down
    depth: int = 4  # number of 2x down-samplings
    max_width: int = 256  # cap on the channels of the deep levels
    dropout: float = 0.0  # dropout in the bottleneck
    dice: float = 0.0  # weight of the Dice loss added to cross-entropy (tasks/segment.py reads it)

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


class UNet(nn.Module):
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
