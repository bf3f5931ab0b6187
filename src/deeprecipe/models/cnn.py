"""The classic classifiers: an MLP and the conv-pool-dense CNN.

CNN layout (the default is the well-known Fashion-MNIST net conv32-pool-conv64-pool-conv128-dense64):
    [conv3x3 -> BN -> maxpool2 -> ReLU] for all but the last width, conv3x3 -> BN -> ReLU for the last,
    then flatten -> dense layers -> head. With `depth` d > 1 each width is a VGG block: d - 1 conv3x3 -> BN -> ReLU
    before that block's conv (-> pool) -> ReLU. Max-pooling and ReLU commute (ReLU is monotone), so pooling first gives
    the textbook conv-BN-ReLU-pool net's values and gradients while rectifying a quarter of the elements.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from deeprecipe.config import ranged
from deeprecipe.core import DataSpec
from deeprecipe.models.dropout import Dropout
from deeprecipe.models.head import Classifier


@dataclass
class MLPConfig:
    name: str = "mlp"
    hidden: tuple[int, ...] = ranged((256, 256), "> 0")  # widths of the hidden layers
    dropout: float = ranged(0.1, "[0, 1)")

    def build(self, spec: DataSpec) -> nn.Module:
        h, w = spec.image_size
        return MLP(spec.in_channels * h * w, list(self.hidden), spec.num_classes, self.dropout)


class MLP(Classifier, nn.Module):
    def __init__(self, in_features: int, hidden: list[int], num_classes: int, dropout: float = 0.0):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        for width in hidden:
            layers += [nn.Linear(in_features, width), nn.ReLU(inplace=True), Dropout(dropout)]
            in_features = width
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(in_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, classes)
        return self.head(self.body(x))


@dataclass
class CNNConfig:
    name: str = "cnn"
    channels: tuple[int, ...] = ranged((32, 64, 128), "> 0")  # conv widths; a 2x2 max-pool after all but the last
    depth: int = ranged(1, ">= 1")  # convolutions per width (2: VGG's double-conv blocks)
    dense: tuple[int, ...] = ranged((64,), "> 0")  # widths of the dense layers before the head
    batchnorm: bool = True
    dropout: float = ranged(0.2, "[0, 1)")  # before each dense layer and the head
    global_pool: bool = False  # average-pool the last feature map instead of flattening it

    def build(self, spec: DataSpec) -> nn.Module:
        return CNN(spec.in_channels, spec.num_classes, spec.image_size, self)


class CNN(Classifier, nn.Module):
    def __init__(self, in_channels: int, num_classes: int, image_size: tuple[int, int], cfg: CNNConfig):
        super().__init__()
        layers: list[nn.Module] = []
        self.ends: list[int] = []  # the place in `features` of the ReLU that ends each width's block
        h, w = image_size
        for i, width in enumerate(cfg.channels):
            for k in range(cfg.depth):
                layers += [nn.Conv2d(in_channels, width, 3, padding=1, bias=not cfg.batchnorm)]
                layers += [nn.BatchNorm2d(width)] if cfg.batchnorm else []
                if k == cfg.depth - 1 and i < len(cfg.channels) - 1:  # pool, then ReLU: the same values (ReLU is
                    layers += [nn.MaxPool2d(2)]  # monotone) on 1/4 of the elements
                    h, w = h // 2, w // 2
                layers += [nn.ReLU(inplace=True)]
                in_channels = width
            self.ends.append(len(layers) - 1)
        if cfg.global_pool:
            layers += [nn.AdaptiveAvgPool2d(1)]
            h = w = 1
        self.features = nn.Sequential(*layers, nn.Flatten())
        dense: list[nn.Module] = []
        in_features = in_channels * h * w
        for width in cfg.dense:
            dense += [Dropout(cfg.dropout), nn.Linear(in_features, width), nn.ReLU(inplace=True)]
            in_features = width
        self.dense = nn.Sequential(*dense, Dropout(cfg.dropout))
        self.head = nn.Linear(in_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, classes)
        return self.head(self.dense(self.features(x)))

    def stage_outputs(self) -> list[nn.Module]:
        """The ReLU ending each width's block (after its pool): one map per width (14, 7, 7 px for widths 32-64-128
        on 28 px images)."""
        return [self.features[i] for i in self.ends]
