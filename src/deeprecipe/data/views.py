"""SimCLR's augmented views (Chen et al. 2020, appendix A), made for a whole batch at once on the device.

Images in [0, 1] (B, C, H, W) -> one view each, same size: a random resized crop (area a fraction of the image
drawn from `crop_scale`, aspect ratio log-uniform in [3/4, 4/3]) and a horizontal flip as one affine grid per image
(F.affine_grid + F.grid_sample, bilinear), then with chance `jitter_p` colour jitter of strength s (brightness,
contrast and saturation factors in [1 - 0.8 s, 1 + 0.8 s], a hue rotation of up to 0.2 s of the colour circle),
then with chance `gray_p` grayscale. Every random number comes from `Draws`, one per image, so a step's views do
not depend on accumulation or data-parallel splits. Two simplifications of torchvision's pipeline: the jitter's
four parts run in a fixed order (torchvision shuffles them), and the hue turns the chroma plane of YIQ instead of
going through HSV (the same rotation of the colour circle to first order, and a 3 x 3 matrix per image). No blur:
the images here are small (SimCLR leaves it out on CIFAR too).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from deeprecipe.data.core import Draws

# RGB -> YIQ (NTSC): Y the luma (torchvision's rgb_to_grayscale weights), (I, Q) the plane a hue change turns
RGB_TO_YIQ = torch.tensor([[0.2989, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
YIQ_TO_RGB = torch.linalg.inv(RGB_TO_YIQ)
LUMA = RGB_TO_YIQ[0]


def gray(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> its luma (B, 1, H, W); a one-channel image is its own gray."""
    if x.shape[1] == 1:
        return x
    return torch.einsum("c,bchw->bhw", LUMA.to(x), x)[:, None]


def resized_crop(x: torch.Tensor, draws: Draws, scale: tuple[float, float], flip: bool = True) -> torch.Tensor:
    """A random resized crop of each image (and a horizontal flip with chance 1/2), at the input's size."""
    B, C, H, W = x.shape
    area = scale[0] + (scale[1] - scale[0]) * draws.rand(B)
    ratio = torch.exp(math.log(3 / 4) + math.log(16 / 9) * draws.rand(B))  # crop width / height in pixels
    # the crop's half-extent in grid coordinates ([-1, 1] spans the image): w_px = sqrt(area H W ratio), / W
    sx = (area * ratio * H / W).sqrt().clamp(max=1.0)
    sy = (area / ratio * W / H).sqrt().clamp(max=1.0)
    tx = (draws.rand(B) * 2 - 1) * (1 - sx)  # the crop's centre, anywhere that keeps it inside the image
    ty = (draws.rand(B) * 2 - 1) * (1 - sy)
    sign = torch.where(draws.rand(B) < 0.5, -1.0, 1.0) if flip else torch.ones(B, device=x.device)
    zero = torch.zeros_like(sx)
    theta = torch.stack([torch.stack([sx * sign, zero, tx], 1), torch.stack([zero, sy, ty], 1)], 1)  # (B, 2, 3)
    grid = F.affine_grid(theta, [B, C, H, W], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def colour_jitter(x: torch.Tensor, draws: Draws, s: float, p: float) -> torch.Tensor:
    """Brightness, contrast, saturation and hue of strength s, applied to each image with chance p."""
    B = len(x)
    view = (B, 1, 1, 1)
    factor = lambda: 1 + 0.8 * s * (2 * draws.rand(B) - 1)  # noqa: E731  (one per image, in [1 - 0.8 s, 1 + 0.8 s])
    b, c, sat = factor().view(view), factor().view(view), factor().view(view)
    angle = 0.2 * s * (2 * draws.rand(B) - 1) * 2 * math.pi  # hue: a fraction of the colour circle
    apply = (draws.rand(B) < p).view(view)
    y = x * b
    mean = gray(y).mean((2, 3), keepdim=True)  # contrast scales about the image's mean gray
    y = (y - mean) * c + mean
    if x.shape[1] == 3:
        g = gray(y)
        y = g + (y - g) * sat
        cos, sin = angle.cos(), angle.sin()
        one, zero = torch.ones_like(cos), torch.zeros_like(cos)
        turn = torch.stack([torch.stack([one, zero, zero], 1), torch.stack([zero, cos, -sin], 1)], 1)
        turn = torch.cat([turn, torch.stack([zero, sin, cos], 1)[:, None]], 1)  # (B, 3, 3): rotate I, Q
        m = YIQ_TO_RGB.to(x) @ turn @ RGB_TO_YIQ.to(x)  # (B, 3, 3): RGB -> RGB
        y = torch.einsum("bij,bjhw->bihw", m, y)
    return torch.where(apply, y.clamp(0, 1), x)


def to_gray(x: torch.Tensor, draws: Draws, p: float) -> torch.Tensor:
    """Each image turned gray (its luma in every channel) with chance p."""
    apply = (draws.rand(len(x)) < p).view(-1, 1, 1, 1)
    return torch.where(apply, gray(x).expand_as(x), x)


def view(
    x: torch.Tensor, draws: Draws, crop_scale: tuple[float, float], jitter: float, jitter_p: float, gray_p: float
) -> torch.Tensor:
    """One SimCLR view of each image of x (B, C, H, W) in [0, 1]: crop and flip, colour jitter, grayscale."""
    x = resized_crop(x, draws, crop_scale)
    x = colour_jitter(x, draws, jitter, jitter_p)
    return to_gray(x, draws, gray_p)
