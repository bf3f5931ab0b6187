"""Pictures of a GAN run: the progress strip and GIF of the fixed-noise grids, latent interpolation, the
class histogram of generated samples, and the two losses with D's outputs."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from deeprecipe.engine import plots
from deeprecipe.engine.atomic import atomic_write
from deeprecipe.engine.run import read_metrics
from deeprecipe.runtime import Runtime


def grid(images: torch.Tensor, nrow: int = 8) -> torch.Tensor:
    """images in [-1, 1] -> one grid image (C, H, W) in [0, 1]; tiny images are enlarged so a person sees them."""
    from torchvision.utils import make_grid

    images = images.float().cpu()
    if images.shape[-1] < 24:  # 8x8 digits
        images = F.interpolate(images, scale_factor=32 // images.shape[-1], mode="nearest")
    return make_grid(images, nrow=nrow, padding=2, normalize=True, value_range=(-1, 1))


def save_grid(images: torch.Tensor, path: Path, nrow: int = 8) -> torch.Tensor:
    """images in [-1, 1] -> a grid image at `path` (PNG, or the format its suffix names; written atomically);
    returns the grid."""
    from PIL import Image
    from torchvision.utils import save_image

    g = grid(images, nrow)
    fmt = Image.registered_extensions().get(Path(path).suffix.lower(), "PNG")  # the temporary name has no suffix
    atomic_write(Path(path), lambda p: save_image(g, p, format=fmt))
    return g


def progress(plots_dir: Path, rows: int = 10) -> None:
    """plots/progress.png: the first row of up to `rows` grids, oldest at the top; plots/progress.gif: all grids."""
    from PIL import Image

    files = sorted((plots_dir / "grids").glob("step-*.png"))
    if not files:
        return
    frames = [Image.open(f).convert("RGB") for f in files]
    pick = sorted({round(i * (len(files) - 1) / max(1, rows - 1)) for i in range(min(rows, len(files)))})
    w, h = frames[0].size
    row_h = (h - 2) // 8 + 2  # one grid row (8 images of 8 per row, 2-pixel padding)
    label_w = 70
    strip = Image.new("RGB", (w + label_w, row_h * len(pick)), "white")
    from PIL import ImageDraw

    draw = ImageDraw.Draw(strip)
    for r, i in enumerate(pick):
        strip.paste(frames[i].crop((0, 0, w, row_h)), (label_w, r * row_h))
        draw.text((4, r * row_h + row_h // 2 - 5), f"step {int(files[i].stem[5:])}", fill="black")
    atomic_write(plots_dir / "progress.png", lambda p: strip.save(p, format="PNG"))
    atomic_write(
        plots_dir / "progress.gif",
        lambda p: frames[0].save(p, format="GIF", save_all=True, append_images=frames[1:], duration=400, loop=0),
    )


def slerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation between noise vectors a, b (latent,) at fractions t (K,) -> (K, latent):
    the path stays where Gaussian noise has its mass, unlike a straight line through the origin region."""
    omega = torch.acos((a / a.norm() * b / b.norm()).sum().clamp(-1, 1))
    so = torch.sin(omega)
    if so.abs() < 1e-6:
        return (1 - t)[:, None] * a + t[:, None] * b
    return (torch.sin((1 - t) * omega) / so)[:, None] * a + (torch.sin(t * omega) / so)[:, None] * b


@torch.no_grad()
def interpolation(model, path: Path, seed: int, rt: Runtime, rows: int = 6, steps: int = 10) -> None:
    """Each row walks the latent space between two random z (and, for a conditional model, keeps one class)."""
    model.eval()
    g = torch.Generator().manual_seed(seed + 3)
    ends = torch.randn(rows, 2, model.latent, generator=g)
    t = torch.linspace(0, 1, steps)
    z = torch.cat([slerp(a, b, t) for a, b in ends]).to(rt.device)  # (rows * steps, latent)
    y = (torch.arange(rows).repeat_interleave(steps) % model.num_classes).to(rt.device) if model.num_classes else None
    with rt.autocast():
        save_grid(model(z, y).float(), path, nrow=steps)


def class_histogram(hist: list[int], names: list[str], path: Path) -> None:
    import matplotlib.pyplot as plt

    n = sum(hist) or 1
    fig, ax = plt.subplots(figsize=(max(4, 0.5 * len(hist)), 3))
    ax.bar(range(len(hist)), [c / n for c in hist])
    ax.axhline(1 / len(hist), color="gray", ls="--", lw=1, label="uniform")
    ax.set_xticks(range(len(hist)), names or [str(i) for i in range(len(hist))], rotation=60, fontsize=7)
    ax.set_ylabel("share of samples"), ax.set_title("generated samples by the domain classifier's class")
    ax.legend(fontsize=7)
    plots.save_figure(fig, path)


def losses(run_dir: Path, path: Path) -> None:
    import matplotlib.pyplot as plt

    rows = [r for r in read_metrics(run_dir) if "d_loss" in r]
    if not rows:
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3))
    s = [r["step"] for r in rows]
    a.plot(s, [r["d_loss"] for r in rows], label="D loss")
    a.plot(s, [r["g_loss"] for r in rows], label="G loss")
    a.set_xlabel("step"), a.set_title("losses"), a.legend()
    b.plot(s, [r["d_real"] for r in rows], label="D(x), real")
    b.plot(s, [r["d_fake"] for r in rows], label="D(G(z)), generated")
    b.set_ylim(0, 1), b.set_xlabel("step"), b.set_title("discriminator outputs (mean probability)"), b.legend()
    plots.save_figure(fig, path)
