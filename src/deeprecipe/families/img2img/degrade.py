"""The degradations an image-to-image net learns to undo, made on the whole batch on its device.

Everything works on images in [-1, 1] (B, C, H, W) and draws its randomness from the step's `Draws` (one value
per example of the step's whole batch), so accumulation and resume see the same degradations; evaluation uses
a fixed generator, so every evaluation scores the same degraded images.

- shrink: optional Gaussian blur (sigma per image in [0, blur]), antialiased bicubic down-sampling by `scale`,
  optional Gaussian noise (std per image in [0, noise] of the [0, 1] range), then 8-bit quantization: the
  low-res image a user would have as a PNG. `enlarge` is the bicubic up-sampling (the classic baseline).
- crop: a random square of each image of the batch, and the same square of its label map (training on patches:
  a step for a fraction of the pixels, enough for a local task such as super-resolution).
- holes: a mask (B, 1, H, W), 1 = missing: one box of `fraction` of the area (aspect 0.6 .. 1.6, anywhere),
  or free-form strokes (4 strokes of 3 thick segments, about as much area), or either per image ("both").
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from deeprecipe.data.core import Draws

EVAL_SEED = 20_240_601  # the generator of evaluation degradations: the same holes and noise at every evaluation


def unit(x: torch.Tensor) -> torch.Tensor:
    """uint8 -> [-1, 1]."""
    return x.float() / 127.5 - 1


def one_hot(labels: torch.Tensor, k: int) -> torch.Tensor:
    """A label map (B, H, W) of class ids -> the one-hot input (B, k, H, W) of label2image; an ignored pixel (255)
    is all zeros."""
    return F.one_hot(labels.long().clamp(max=k), k + 1)[..., :k].permute(0, 3, 1, 2).float()


def eval_draws(device: torch.device) -> Draws:
    return Draws(torch.Generator(device=device).manual_seed(EVAL_SEED))


def quantize(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> the nearest 8-bit level, still in [-1, 1]."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1


def blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Gaussian blur with a sigma per image (B,) (0: unchanged), separable, reflect-padded."""
    B, C, H, W = x.shape
    r = int(math.ceil(3 * float(sigma.max())))
    if r == 0:
        return x
    t = torch.arange(-r, r + 1, device=x.device, dtype=x.dtype)
    s = sigma.to(x.dtype).clamp_min(1e-3).view(B, 1)
    k = torch.exp(-0.5 * (t / s) ** 2)
    k = k / k.sum(1, keepdim=True)  # (B, 2r + 1); sigma ~ 0 gives a delta
    k = k.repeat_interleave(C, 0)  # one kernel per (image, channel)
    y = F.pad(x.reshape(1, B * C, H, W), (r, r, r, r), mode="reflect")
    y = F.conv2d(y, k.view(B * C, 1, 1, -1), groups=B * C)
    y = F.conv2d(y, k.view(B * C, 1, -1, 1), groups=B * C)
    return y.view(B, C, H, W)


def shrink(x: torch.Tensor, scale: int, blur_max: float, noise_max: float, draws: Draws) -> torch.Tensor:
    """High-res images (B, C, H, W) in [-1, 1] -> low-res (B, C, H / scale, W / scale), quantized to 8 bit."""
    B = len(x)
    if blur_max > 0:
        x = blur(x, draws.rand(B).to(x.device) * blur_max)
    lr = F.interpolate(x, scale_factor=1 / scale, mode="bicubic", antialias=True, align_corners=False)
    if noise_max > 0:
        std = draws.rand(B).to(x.device) * noise_max * 2  # of the [-1, 1] range
        lr = lr + std.view(B, 1, 1, 1) * draws.normal(B, lr[0].numel()).to(x.device).view_as(lr)
    return quantize(lr)


def enlarge(lr: torch.Tensor, scale: int) -> torch.Tensor:
    """Bicubic up-sampling by `scale`, clamped to [-1, 1] (the baseline, and the sr generator's input)."""
    return F.interpolate(lr, scale_factor=scale, mode="bicubic", align_corners=False).clamp(-1, 1)


def crop(x: torch.Tensor, y: torch.Tensor, size: int, draws: Draws) -> tuple[torch.Tensor, torch.Tensor]:
    """A random size x size square per example of images (B, C, H, W) and, when y is a label map (B, H, W), of y."""
    B, _, H, W = x.shape
    if size >= min(H, W):
        return x, y
    top = draws.randint(H - size + 1, B).to(x.device).view(B, 1, 1)
    left = draws.randint(W - size + 1, B).to(x.device).view(B, 1, 1)
    r = torch.arange(size, device=x.device)
    b, ys, xs = torch.arange(B, device=x.device).view(B, 1, 1), top + r.view(1, -1, 1), left + r.view(1, 1, -1)
    x = x[b, :, ys, xs].permute(0, 3, 1, 2).contiguous()  # (B, size, size, C) -> (B, C, size, size)
    return x, (y[b, ys, xs] if y.dim() == 3 else y)


def box_holes(n: int, H: int, W: int, fraction: float, draws: Draws, device) -> torch.Tensor:
    """(n, 1, H, W): one box per image covering `fraction` of it (aspect drawn in 0.6 .. 1.6)."""
    aspect = 0.6 + draws.rand(n).to(device) * 1.0
    bh = (fraction * H * W * aspect).sqrt().clamp(1, H)
    bw = (fraction * H * W / bh).clamp(1, W)
    top = draws.rand(n).to(device) * (H - bh)
    left = draws.rand(n).to(device) * (W - bw)
    ys = torch.arange(H, device=device).view(1, H, 1) + 0.5
    xs = torch.arange(W, device=device).view(1, 1, W) + 0.5
    t, l, h, w = (v.view(n, 1, 1) for v in (top, left, bh, bw))
    return ((ys >= t) & (ys < t + h) & (xs >= l) & (xs < l + w)).float()[:, None]


def stroke_holes(n: int, H: int, W: int, fraction: float, draws: Draws, device, strokes: int = 4) -> torch.Tensor:
    """(n, 1, H, W): free-form strokes, each 3 thick segments turning at random, about `fraction` of the area."""
    seg_len = 0.3 * min(H, W)
    width = fraction * H * W / (strokes * 3 * seg_len) * 1.15  # thickness so the strokes cover ~fraction
    ys = torch.arange(H, device=device, dtype=torch.float32).view(1, 1, H, 1) + 0.5
    xs = torch.arange(W, device=device, dtype=torch.float32).view(1, 1, 1, W) + 0.5
    starts_x, starts_y, angles = [], [], []
    for _ in range(strokes):
        starts_x.append(draws.rand(n).to(device) * W)
        starts_y.append(draws.rand(n).to(device) * H)
        angles.append(draws.rand(n).to(device) * 2 * math.pi)
    segs = []  # (x0, y0, x1, y1) each (n,)
    for x0, y0, a in zip(starts_x, starts_y, angles):
        for _ in range(3):
            a = a + (draws.rand(n).to(device) - 0.5) * 2.0
            x1, y1 = (x0 + seg_len * torch.cos(a)).clamp(0, W), (y0 + seg_len * torch.sin(a)).clamp(0, H)
            segs.append((x0, y0, x1, y1))
            x0, y0 = x1, y1
    x0, y0, x1, y1 = (torch.stack([s[i] for s in segs], 1).view(n, -1, 1, 1) for i in range(4))  # (n, S, 1, 1)
    dx, dy = x1 - x0, y1 - y0
    t = (((xs - x0) * dx + (ys - y0) * dy) / (dx * dx + dy * dy).clamp_min(1e-6)).clamp(0, 1)
    d2 = (xs - x0 - t * dx) ** 2 + (ys - y0 - t * dy) ** 2  # (n, S, H, W): squared distance to each segment
    return (d2.amin(1, keepdim=True) <= (width / 2) ** 2).float()


def holes(n: int, H: int, W: int, kind: str, fraction: float, draws: Draws, device) -> torch.Tensor:
    """(n, 1, H, W) masks, 1 = missing; kind box | strokes | both (each image draws one of the two)."""
    if kind == "box":
        return box_holes(n, H, W, fraction, draws, device)
    if kind == "strokes":
        return stroke_holes(n, H, W, fraction, draws, device)
    pick = (draws.rand(n).to(device) < 0.5).view(n, 1, 1, 1)
    return torch.where(
        pick, box_holes(n, H, W, fraction, draws, device), stroke_holes(n, H, W, fraction, draws, device)
    )


def input_image(model_input: torch.Tensor, mode: str) -> torch.Tensor:
    """The picture in a net's input ([-1, 1], what a copying net would return): the bicubic image (sr), the image
    with its holes zeroed (inpaint), A (paired, unpaired); label2image has none (None)."""
    if mode == "inpaint":
        return model_input[:, :-1]
    if mode == "label2image":
        return None
    return model_input
