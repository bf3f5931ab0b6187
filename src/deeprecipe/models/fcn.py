"""FCN (Long, Shelhamer and Darrell, 2015): a plain conv net classifies every pixel of its coarsest feature
map, and the coarse scores are upsampled and refined by scores from finer stages (the FCN-8s "skips").

    x (B, C, H, W) -> [conv3x3-BN-ReLU x convs -> maxpool] x stages      (stage i at H / 2^(i+1))
      score = head: 1x1 conv(last stage)                                  (B, classes, H / 2^stages, ...)
      for each of the `skips` previous stages: score = up2(score) + 1x1 conv(that stage)
      logits = bilinear upsampling of score to (H, W)

skips=0 is FCN-32s-like, 1 FCN-16s, 2 FCN-8s. Upsampling is bilinear (fixed), as learned deconvolutions
initialised to bilinear bring little at this size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from deeprecipe.config import ranged
from deeprecipe.core import DataSpec
from deeprecipe.models.head import Classifier, fresh_like


@dataclass
class FCNConfig:
    name: str = "fcn"
    width: int = ranged(32, "> 0")  # channels of the first stage; doubled per stage
    stages: int = ranged(4, "> 0")  # number of conv stages, each ending in a 2x max-pool (output stride 2**stages)
    convs: int = 2  # conv layers per stage
    max_width: int = 256
    skips: int = 2  # finer stages whose scores refine the coarse ones (2: FCN-8s)
    dropout: float = ranged(0.1, "[0, 1)")  # before the last score layer
    dice: float = ranged(0.0, ">= 0")  # weight of the Dice loss added to cross-entropy (tasks/segment.py reads it)

    def build(self, spec: DataSpec) -> nn.Module:
        return FCN(spec.in_channels, spec.num_classes, self)


class FCN(Classifier, nn.Module):
    OLD_NAMES = ("score",)  # the head's name before every classifier's was `head`

    def __init__(self, in_channels: int, num_classes: int, cfg: FCNConfig):
        super().__init__()
        if not 0 <= cfg.skips < cfg.stages:
            from deeprecipe.core import ConfigError

            raise ConfigError(f"model.skips={cfg.skips} must be between 0 and model.stages-1={cfg.stages - 1}")
        self.stages = nn.ModuleList()
        widths, cin = [], in_channels
        for i in range(cfg.stages):
            w = min(cfg.width * 2**i, cfg.max_width)
            layers: list[nn.Module] = []
            for j in range(cfg.convs):
                layers += [
                    nn.Conv2d(cin if j == 0 else w, w, 3, padding=1, bias=False),
                    nn.BatchNorm2d(w),
                    nn.ReLU(inplace=True),
                ]
            self.stages.append(nn.Sequential(*layers, nn.MaxPool2d(2, ceil_mode=True)))
            widths.append(w)
            cin = w
        self.drop = nn.Dropout2d(cfg.dropout)
        self.head = nn.Conv2d(cin, num_classes, 1)
        # score layers of the finer stages, coarse to fine
        self.skip_scores = nn.ModuleList(nn.Conv2d(widths[-2 - i], num_classes, 1) for i in range(cfg.skips))
        self._zero_skips()

    def _zero_skips(self) -> None:
        for s in self.skip_scores:  # start as plain FCN-32s: the skips learn a correction from zero
            nn.init.zeros_(s.weight), nn.init.zeros_(s.bias)

    def reset_classifier(self, num_classes: int) -> None:
        """A fresh head and fresh skip scores (they add class scores too) for `num_classes` classes."""
        super().reset_classifier(num_classes)
        self.skip_scores = nn.ModuleList(fresh_like(s, num_classes) for s in self.skip_scores)
        self._zero_skips()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, classes, H, W)
        H, W = x.shape[-2:]
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)  # (B, w_i, H / 2^(i+1), W / 2^(i+1))
        score = self.head(self.drop(x))
        for i, layer in enumerate(self.skip_scores):
            f = feats[-2 - i]
            score = F.interpolate(score, size=f.shape[-2:], mode="bilinear", align_corners=False) + layer(f)
        return F.interpolate(score, size=(H, W), mode="bilinear", align_corners=False)
