"""Quality of translated images: PSNR and SSIM (torchmetrics) per image, and the classic baselines.

Images are scored as they would be saved: in [0, 1], rounded to 8 bit. PSNR is per image and then averaged (a
perfect image counts as MAX_PSNR dB); `psnr_masked` is the PSNR over the pixels of a mask (an inpainting's
hole). The inpainting baseline is OpenCV's Telea fast marching (opencv-python-headless, an optional extra:
`telea` returns None without it).
"""

from __future__ import annotations

import torch

MAX_PSNR = 100.0  # dB given to an exact image (whose PSNR is infinite)


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1] at the nearest 8-bit level (the saved PNG)."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round() / 255


def psnr(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B,) PSNR in dB of images in [0, 1] (B, C, H, W)."""
    from torchmetrics.functional.image import peak_signal_noise_ratio

    v = peak_signal_noise_ratio(pred.float(), target.float(), data_range=1.0, reduction="none", dim=(1, 2, 3))
    return v.nan_to_num(MAX_PSNR, MAX_PSNR).clamp(max=MAX_PSNR)


def ssim(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B,) SSIM of images in [0, 1] (B, C, H, W) (Gaussian window 11, or the image's side when smaller)."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    k = min(11, *pred.shape[-2:])
    k -= 1 - k % 2  # odd
    return structural_similarity_index_measure(
        pred.float(), target.float(), data_range=1.0, reduction="none", kernel_size=k
    ).view(-1)


def psnr_masked(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B,) PSNR over the pixels where mask (B, 1, H, W) is 1 (images in [0, 1])."""
    m = mask.float().expand_as(pred)
    mse = ((pred.float() - target.float()) ** 2 * m).sum((1, 2, 3)) / m.sum((1, 2, 3)).clamp_min(1)
    return (10 * torch.log10(1 / mse.clamp_min(1e-20))).clamp(max=MAX_PSNR)


def telea_available() -> bool:
    try:
        import cv2  # noqa: F401
    except ImportError:
        return False
    return True


def telea(images: torch.Tensor, mask: torch.Tensor, radius: int = 3) -> torch.Tensor | None:
    """OpenCV's Telea inpainting of images in [0, 1] (B, C, H, W) where mask (B, 1, H, W) is 1; None without cv2."""
    if not telea_available():
        return None
    import cv2
    import numpy as np

    out = []
    for img, m in zip(images.cpu(), mask.cpu()):
        a = (img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        a = a[..., ::-1].copy() if a.shape[2] == 3 else a[..., 0].copy()  # OpenCV wants BGR or gray
        r = cv2.inpaint(a, (m[0].numpy() > 0.5).astype(np.uint8), radius, cv2.INPAINT_TELEA)
        r = r[..., ::-1].copy() if r.ndim == 3 else r[..., None]
        out.append(torch.from_numpy(r).permute(2, 0, 1).float() / 255)
    return torch.stack(out).to(images.device)


class Scores:
    """Running per-image means of named scores."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.n: dict[str, int] = {}

    def add(self, name: str, values: torch.Tensor) -> None:
        self.sums[name] = self.sums.get(name, 0.0) + float(values.double().sum())
        self.n[name] = self.n.get(name, 0) + values.numel()

    def means(self) -> dict[str, float]:
        return {k: self.sums[k] / max(1, self.n[k]) for k in self.sums}
