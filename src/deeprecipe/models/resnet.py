"""ResNets with basic blocks and BatchNorm, sized for small images.

Layouts: resnet8/14/20/32 are the CIFAR-style nets (3 stages of n blocks, widths w, 2w, 4w, with
n = (depth - 2) / 6); resnet18 is the ImageNet layout (4 stages of 2 blocks, widths w..8w) with a 3x3
stem and no max-pool, so it keeps detail on 28-64 pixel images. Module names follow torchvision's
(conv1, bn1, layer1.0.conv1, ...) so torchvision state dicts load by name; the classifier is `head` (timm's API,
models/head.py), and torchvision's `fc` (the name this model's head had too) is read as `head` when loading.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from deeprecipe.config import ranged
from deeprecipe.core import DataSpec
from deeprecipe.models.dropout import Dropout
from deeprecipe.models.head import Classifier

Layout = Literal["resnet8", "resnet14", "resnet20", "resnet32", "resnet18", "resnet34"]
LAYOUTS: dict[str, tuple[int, ...]] = {  # blocks per stage of each Layout
    "resnet8": (1, 1, 1),
    "resnet14": (2, 2, 2),
    "resnet20": (3, 3, 3),
    "resnet32": (5, 5, 5),
    "resnet18": (2, 2, 2, 2),
    "resnet34": (3, 4, 6, 3),
}


@dataclass
class ResNetConfig:
    name: str = "resnet"
    layout: Layout = "resnet20"  # blocks per stage: LAYOUTS
    width: int = ranged(16, "> 0")  # channels of the first stage; doubles at every later stage
    dropout: float = ranged(0.0, "[0, 1)")  # before the head

    def build(self, spec: DataSpec) -> nn.Module:
        return ResNet(LAYOUTS[self.layout], self.width, spec.in_channels, spec.num_classes, self.dropout)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:  # projection shortcut when the shape changes
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        nn.init.zeros_(self.bn2.weight)  # each block starts as the identity: deep nets train from step one

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)), inplace=True)


class ResNet(Classifier, nn.Module):
    OLD_NAMES = ("fc",)  # torchvision's name for the head, and this model's before it was `head`

    def __init__(self, blocks: tuple[int, ...], width: int, in_channels: int, num_classes: int, dropout: float):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        cin = width
        for i, n in enumerate(blocks):
            cout = width * 2**i
            stage = [BasicBlock(cin if j == 0 else cout, cout, 2 if (i > 0 and j == 0) else 1) for j in range(n)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*stage))
            cin = cout
        self.stages = len(blocks)
        self.drop = Dropout(dropout)
        self.head = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, classes)
        x = F.relu(self.bn1(self.conv1(x)), inplace=True)
        for i in range(self.stages):
            x = getattr(self, f"layer{i + 1}")(x)
        return self.head(self.drop(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)))

    def stage_outputs(self) -> list[nn.Module]:
        """Each stage (layer1, layer2, ...): one map per width."""
        return [getattr(self, f"layer{i + 1}") for i in range(self.stages)]
