"""Masked-image reconstruction (pretrain.method=masked), the dense counterpart of SimCLR for nets whose output is
an image-sized map (a U-Net: encoder and decoder both learn, so a segmenter fine-tuned from it starts with both).

Each image is cut into mask_patch x mask_patch cells and exactly round(mask_ratio * cells) of them, chosen at
random per image, are hidden (set to 0, the normalized mean). The net sees the hidden image and its C output
channels regress the normalized pixels; the loss is the squared error over the hidden pixels only (what is visible
would be copied through the skips), as in masked autoencoders (He et al. 2022) with a convolutional net.
"""

from __future__ import annotations

import torch

from deeprecipe.core import ConfigError
from deeprecipe.data.core import Draws


def cell_mask(shape: tuple[int, ...], draws: Draws, ratio: float, patch: int) -> torch.Tensor:
    """(B, 1, H, W) float mask, 1 on the hidden pixels: per image, the round(ratio * cells) cells with the lowest
    random scores of a grid of patch x patch cells (the last row and column of cells cut at the border)."""
    B, _, H, W = shape
    gh, gw = -(-H // patch), -(-W // patch)
    n = gh * gw
    k = min(n - 1, max(1, round(ratio * n)))  # at least one cell hidden and one shown
    scores = draws.uniform(B, n)  # (B, cells)
    hidden = torch.zeros(B, n, device=scores.device)
    hidden.scatter_(1, scores.argsort(1)[:, :k], 1.0)
    grid = hidden.view(B, 1, gh, gw)
    return grid.repeat_interleave(patch, 2).repeat_interleave(patch, 3)[..., :H, :W]


def masked_error(out: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B,) mean squared error of each image over its hidden pixels (all channels)."""
    if out.shape != target.shape:
        raise ConfigError(
            f"pretrain.method=masked: the model gives {tuple(out.shape[1:])} per image for {tuple(target.shape[1:])} "
            "images; use a dense net with an image-sized output, e.g. model.name=unet-resnet18 or unet"
        )
    err = (out.float() - target).square().sum(1, keepdim=True) * mask  # (B, 1, H, W)
    return err.flatten(1).sum(1) / (mask.flatten(1).sum(1) * target.shape[1]).clamp(min=1)
