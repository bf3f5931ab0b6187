"""Video classifiers on clips (B, C, T, H, W): a small C3D and a residual (2+1)D net.

C3D (Tran et al., 2015): stacks of 3x3x3 convolutions with 3D max-pooling; the first pool is spatial only
so that early layers keep the clip's temporal detail. Here with BatchNorm and global average pooling.

R(2+1)D (Tran et al., 2018): every 3x3x3 convolution is factorized into a 1x3x3 spatial convolution and a
3x1x1 temporal one with a BN-ReLU between them (twice the non-linearities for about the same parameters,
and easier to optimize), inside ResNet basic blocks. The middle width follows the paper, chosen so that the
pair has the parameter count of the full 3D kernel.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from deeprecipe.config import ranged
from deeprecipe.core import DataSpec
from deeprecipe.models.dropout import Dropout
from deeprecipe.models.head import Classifier


def _bn_relu(c: int) -> list[nn.Module]:
    return [nn.BatchNorm3d(c), nn.ReLU(inplace=True)]


@dataclass
class C3DConfig:
    name: str = "c3d"
    channels: tuple[int, ...] = ranged((32, 64, 128, 128), "> 0")  # width of each stage; a pool follows every stage
    convs: int = 1  # 3x3x3 convs per stage
    dropout: float = ranged(0.3, "[0, 1)")  # before the head

    def build(self, spec: DataSpec) -> nn.Module:
        return C3D(spec.in_channels, spec.num_classes, list(self.channels), self.convs, self.dropout)


class C3D(Classifier, nn.Module):
    def __init__(self, in_channels: int, num_classes: int, channels: list[int], convs: int = 1, dropout: float = 0.3):
        super().__init__()
        layers: list[nn.Module] = []
        cin = in_channels
        for i, w in enumerate(channels):
            for j in range(convs):
                layers += [nn.Conv3d(cin if j == 0 else w, w, 3, padding=1, bias=False), *_bn_relu(w)]
            # stage 0 pools space only; later stages pool time too (ceil: short clips never reach size 0)
            layers += [nn.MaxPool3d((1, 2, 2) if i == 0 else 2, ceil_mode=True)]
            cin = w
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool3d(1), nn.Flatten())
        self.dropout = Dropout(dropout)
        self.head = nn.Linear(cin, num_classes)
        # the pooled post-ReLU features are all positive and large, so a random head starts with strong class
        # preferences (loss at init well above ln C); a zero head starts at exactly ln C, uniform over classes
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, T, H, W) -> (B, classes)
        return self.head(self.dropout(self.features(x)))


class Conv2Plus1D(nn.Sequential):
    """A 3x3x3 convolution factorized as 1x3x3 (space) -> BN-ReLU -> 3x1x1 (time)."""

    def __init__(self, cin: int, cout: int, stride: int = 1, tstride: int = 1):
        mid = (cin * cout * 27) // (cin * 9 + cout * 3)  # same parameters as the full 3x3x3 kernel
        super().__init__(
            nn.Conv3d(cin, mid, (1, 3, 3), (1, stride, stride), (0, 1, 1), bias=False),
            *_bn_relu(mid),
            nn.Conv3d(mid, cout, (3, 1, 1), (tstride, 1, 1), (1, 0, 0), bias=False),
        )


class Block(nn.Module):
    """ResNet basic block of two (2+1)D convolutions; a strided 1x1x1 projection when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Sequential(Conv2Plus1D(cin, cout, stride, stride), *_bn_relu(cout))
        self.conv2 = nn.Sequential(Conv2Plus1D(cout, cout), nn.BatchNorm3d(cout))
        self.skip = nn.Identity()
        if stride != 1 or cin != cout:
            self.skip = nn.Sequential(nn.Conv3d(cin, cout, 1, stride, bias=False), nn.BatchNorm3d(cout))
        nn.init.zeros_(self.conv2[1].weight)  # each block starts as the identity

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.skip(x) + self.conv2(self.conv1(x)))


@dataclass
class R2Plus1DConfig:
    name: str = "r2plus1d"
    width: int = ranged(32, "> 0")  # channels after the stem; doubled at each later stage
    blocks: tuple[int, ...] = ranged((1, 1, 1), "> 0")  # residual blocks per stage; later stages halve T, H, W
    stem_stride: int = 2  # spatial stride of the stem (1 for small frames such as 32 px)
    dropout: float = ranged(0.2, "[0, 1)")

    def build(self, spec: DataSpec) -> nn.Module:
        return R2Plus1D(spec.in_channels, spec.num_classes, self)


class R2Plus1D(Classifier, nn.Module):
    def __init__(self, in_channels: int, num_classes: int, cfg: R2Plus1DConfig):
        super().__init__()
        w, s = cfg.width, cfg.stem_stride
        # stem: (2+1)D with a wide spatial kernel, as in the paper
        self.stem = nn.Sequential(
            nn.Conv3d(in_channels, w, (1, 7, 7), (1, s, s), (0, 3, 3), bias=False),
            *_bn_relu(w),
            nn.Conv3d(w, w, (3, 1, 1), 1, (1, 0, 0), bias=False),
            *_bn_relu(w),
        )
        stages, cin = [], w
        for i, n in enumerate(cfg.blocks):
            cout = w * 2**i
            stages += [Block(cin if j == 0 else cout, cout, 2 if (i > 0 and j == 0) else 1) for j in range(n)]
            cin = cout
        self.stages = nn.Sequential(*stages)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool3d(1), nn.Flatten(), Dropout(cfg.dropout))
        self.head = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, T, H, W) -> (B, classes)
        return self.head(self.pool(self.stages(self.stem(x))))
