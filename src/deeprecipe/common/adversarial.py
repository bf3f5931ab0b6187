"""The two losses of an adversarial step (the GAN and image-to-image families) and the resize of real images to a
generator's size."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def fit(x: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Resize real images (B, C, H, W) to the model's (C, S, S) when they differ."""
    if tuple(x.shape[-2:]) == tuple(shape[-2:]):
        return x
    return F.interpolate(x, size=tuple(shape[-2:]), mode="bilinear", antialias=True, align_corners=False)


def d_loss(real: torch.Tensor, fake: torch.Tensor, kind: str, real_label: float = 1.0) -> torch.Tensor:
    real, fake = real.float(), fake.float()
    if kind == "hinge":
        return F.relu(1 - real).mean() + F.relu(1 + fake).mean()
    return F.binary_cross_entropy_with_logits(
        real, torch.full_like(real, real_label)
    ) + F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake))


def g_loss(fake: torch.Tensor, kind: str) -> torch.Tensor:
    fake = fake.float()
    return -fake.mean() if kind == "hinge" else F.softplus(-fake).mean()  # softplus(-l) = -log sigmoid(l)
