"""Pictures and tables of an img2img run: rows of input / output / target (and the baseline), the quality table."""

from __future__ import annotations

from pathlib import Path

import torch

from deeprecipe.core import DataSpec

BASELINE = {"sr": "bicubic", "inpaint": "telea", "paired": "input", "unpaired": "input"}


def _rgb(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] (C, H, W) -> [0, 1] (3, H, W)."""
    x = ((x.float().clamp(-1, 1) + 1) / 2)[:3]
    return x.expand(3, -1, -1) if x.shape[0] == 1 else x


def _labels(onehot: torch.Tensor, palette: list) -> torch.Tensor:
    """One-hot labels (K, H, W) -> palette colours (3, H, W) in [0, 1] (no class: black)."""
    pal = torch.tensor(palette, dtype=torch.float)[: len(onehot)] / 255  # (K, 3)
    return torch.einsum("khw,kc->chw", onehot.float(), pal)


def input_picture(x: torch.Tensor, spec: DataSpec) -> tuple[torch.Tensor, str]:
    """(the net's input as a picture (3, H, W) in [0, 1], its caption)."""
    mode = spec.extra["mode"]
    if mode == "label2image":
        return _labels(x, spec.extra["palette"]), "labels"
    if mode == "inpaint":
        hole = x[-1:]
        return _rgb(x[:-1]) * (1 - hole) + 0.5 * hole, "with hole"
    if mode == "sr":
        return _rgb(x), f"bicubic x{spec.extra['scale']}"
    return _rgb(x), "input"


def rows(kept: list, spec: DataSpec, with_output: bool = True) -> tuple[torch.Tensor, list[str]]:
    """(tiles (N, 3, H, W) in [0, 1], captions): per example input, output, [Telea], target."""
    tiles, caps = [], []
    for x, out, t, extra in kept:
        pic, cap = input_picture(x, spec)
        tiles.append(pic)
        caps.append(cap)
        if with_output:
            tiles.append(_rgb(out))
            caps.append("output")
        if extra is not None:
            tiles.append(extra.float()[:3].expand(3, -1, -1) if extra.shape[0] == 1 else extra.float()[:3])
            caps.append("telea")
        tiles.append(_rgb(t))
        caps.append("target")
    return torch.stack(tiles), caps


def grid(tiles: torch.Tensor, cols: int) -> torch.Tensor:
    from torchvision.utils import make_grid

    return make_grid(tiles, nrow=cols, padding=2, pad_value=1.0)


def save_rows(kept: list, spec: DataSpec, path: Path, title: str) -> None:
    from deeprecipe.engine import plots

    if not kept:
        return
    tiles, caps = rows(kept, spec)
    per = len(tiles) // len(kept)
    plots.image_grid(tiles, caps, path, title, cols=per * (2 if per <= 3 else 1))


def quality_table(m: dict, mode: str, split: str, n: int) -> str:
    """The model's scores next to the baseline's, one line each."""
    base = BASELINE.get(mode)
    lines = [f"{split} ({n} images, {mode}): PSNR / SSIM of the model and of the baseline"]
    lines.append(f"{'':<22}{'PSNR dB':>10}{'SSIM':>8}{'hole PSNR':>11}")

    def row(name, p, s, h):
        fmt = lambda v, w, d: f"{v:>{w}.{d}f}" if v is not None else f"{'-':>{w}}"  # noqa: E731
        return f"{name:<22}{fmt(p, 10, 2)}{fmt(s, 8, 4)}{fmt(h, 11, 2)}"

    lines.append(row("model", m.get("psnr"), m.get("ssim"), m.get("psnr_hole")))
    if base and f"psnr_{base}" in m:
        lines.append(row(base, m.get(f"psnr_{base}"), m.get(f"ssim_{base}"), m.get(f"psnr_hole_{base}")))
    if mode == "unpaired" and "psnr_input" not in m:
        lines.append("(no known pairs: PSNR / SSIM of the cycle A -> B -> A)")
    if "fid" in m:
        inp = f", of the untranslated input {m['fid_input']:.2f}" if "fid_input" in m else ""
        lines.append(f"domain FID against the real targets (scene U-Net features): model {m['fid']:.2f}{inp}")
    if "fid_standard" in m:
        lines.append(f"standard FID against the real targets (FID Inception): model {m['fid_standard']:.2f}")
    return "\n".join(lines)
