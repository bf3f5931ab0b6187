"""Robustness of an image model after deployment: its metric under distribution shifts and adversarial attacks.

A shift is a photometric change of uint8 images (B, C, H, W) at a severity 1..5 (0 is the image itself); no shift
moves a pixel, so labels, masks and boxes stay valid. Where torchvision has the operation it does the work:

- fog: a blend towards a constant grey haze (0.7 of full scale, the level of the scenes' fog), weight 0.15 per
  severity, the same at every depth (no depth map): x' = (1 - a) x + a 0.7.
- night: gamma 1 + 0.4 s (mid-tones darken), a blue tint (red and green scaled by 1 - 0.08 s and 1 - 0.05 s) and
  Gaussian sensor noise of std 0.01 s (colour images; a grey image gets gamma and noise).
- blur: torchvision's gaussian_blur with sigma 0.5 s pixels.
- noise: additive Gaussian noise of std 0.04, 0.08, 0.12, 0.18, 0.26 (ImageNet-C's steps, from its second).
- jpeg: torchvision's JPEG round trip at quality 80, 50, 30, 15, 7.
- brightness: torchvision's adjust_brightness by a factor 1 + 0.3 s (over-exposure, clipped at white).

On the generated driving scenes (data/scenes.py) fog and night are the renderer's own looks: the same scenes drawn
with look=fog / look=night, blended into the clean image with weight s / 5 (severity 5 is the renderer's look).

An attack perturbs the images in pixel space (0..255, before normalization) within an L-infinity ball of radius
eps pixel levels (eps 8 is the 8/255 of the literature), clamped to the valid range, to raise the family's
per-example loss (family.per_example_loss: cross-entropy of classifiers and segmenters, a detector's own loss):
FGSM is one signed gradient step of size eps (Goodfellow et al. 2015); PGD is 10 steps of eps / 4 from a random
start in the ball, projected back after each (Madry et al. 2018). The attacked images stay float (not rounded to
uint8): the white-box worst case. Images are shifted or attacked batch by batch as the family's evaluate reads the
split, so memory does not grow with the split.
"""

from __future__ import annotations

import dataclasses
import html
import json
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn
import torchvision.transforms.v2.functional as TF

from deeprecipe.config import Config
from deeprecipe.core import UserError, nearest
from deeprecipe.data.core import Data
from deeprecipe.data.detect import ScenesDetectData
from deeprecipe.data.scenes import SPLIT_BASE, ScenesData, render_scenes
from deeprecipe.engine.atomic import atomic_text
from deeprecipe.runtime import Runtime

SEVERITIES = (1, 2, 3, 4, 5)
ATTACKS = ("fgsm", "pgd")
MAX_EPS = 64  # pixel levels: a quarter of the range; beyond it a perturbation is no longer small
PGD_STEPS = 10


def _gen(seed: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def _noise(x: torch.Tensor, std: float, seed: int) -> torch.Tensor:
    """x (float in [0, 1]) + N(0, std^2) per pixel, from a generator seeded by `seed` (torchvision's
    gaussian_noise draws from the global RNG: the same severity would not give the same images twice)."""
    return x + std * torch.randn(x.shape, generator=_gen(seed, x.device), device=x.device)


def _to_u8(x: torch.Tensor) -> torch.Tensor:
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


def fog(x: torch.Tensor, s: int, seed: int = 0) -> torch.Tensor:
    a = 0.15 * s
    return _to_u8((1 - a) * (x.float() / 255) + a * 0.7)


def night(x: torch.Tensor, s: int, seed: int = 0) -> torch.Tensor:
    y = TF.adjust_gamma(x.float() / 255, 1 + 0.4 * s)
    if y.shape[1] == 3:
        y = y * torch.tensor([1 - 0.08 * s, 1 - 0.05 * s, 1.0], device=y.device).view(1, 3, 1, 1)
    return _to_u8(_noise(y, 0.01 * s, seed))


def blur(x: torch.Tensor, s: int, seed: int = 0) -> torch.Tensor:
    sigma = 0.5 * s
    k = 2 * int(2 * sigma + 0.5) + 1
    k = min(k, 2 * ((min(x.shape[-2:]) - 1) // 2) + 1)  # reflect padding needs the kernel inside the image
    return TF.gaussian_blur(x, [k, k], [sigma, sigma])


def noise(x: torch.Tensor, s: int, seed: int = 0) -> torch.Tensor:
    return _to_u8(_noise(x.float() / 255, (0.04, 0.08, 0.12, 0.18, 0.26)[s - 1], seed))


def jpeg(x: torch.Tensor, s: int, seed: int = 0) -> torch.Tensor:
    # torchvision's JPEG codec runs on the CPU
    return TF.jpeg(x.cpu(), (80, 50, 30, 15, 7)[s - 1]).to(x.device)


def brightness(x: torch.Tensor, s: int, seed: int = 0) -> torch.Tensor:
    return TF.adjust_brightness(x, 1 + 0.3 * s)


SHIFTS: dict[str, Callable[[torch.Tensor, int, int], torch.Tensor]] = {
    "fog": fog,
    "night": night,
    "blur": blur,
    "noise": noise,
    "jpeg": jpeg,
    "brightness": brightness,
}


def shift_images(x: torch.Tensor, name: str, s: int, seed: int = 0) -> torch.Tensor:
    """uint8 images (B, C, H, W) under shift `name` at severity s (0: the images themselves)."""
    return x if s == 0 else SHIFTS[name](x, s, seed)


def check_shifts(names: list[str]) -> list[str]:
    for n in names:
        if n not in SHIFTS:
            raise UserError(f"--shift {n}: unknown shift; {nearest(n, list(SHIFTS))} (shifts: {', '.join(SHIFTS)})")
    return names


def parse_eps(text: str) -> list[float]:
    """'2/255,8/255' or '2,8' -> [2.0, 8.0] pixel levels, each in 0..MAX_EPS."""
    out = []
    for tok in (t.strip() for t in text.split(",")):
        num = tok[: -len("/255")] if tok.endswith("/255") else tok
        try:
            e = float(num)
        except ValueError:
            raise UserError(f"--eps {tok}: not a number; give pixel levels like 2,8 or 2/255,8/255") from None
        if not 0 <= e <= MAX_EPS:
            raise UserError(f"--eps {tok}: out of range; eps is in pixel levels (1/255 each), 0 to {MAX_EPS}")
        if 0 < e < 1 and "/" not in tok:
            raise UserError(
                f"--eps {tok}: looks like a fraction of the full range; write pixel levels, e.g. 8 or 8/255 for 0.031"
            )
        out.append(e)
    return out


def attack_images(
    family, model: nn.Module, batch: tuple, spec, cfg: Config, method: str, eps: float, seed: int = 0
) -> torch.Tensor:
    """Float images (B, C, H, W) in 0..255 within eps pixel levels of the raw batch's uint8 images that raise the
    family's per-example loss (FGSM: one step; PGD: PGD_STEPS projected steps from a random start). fp32, with
    gradients, whatever the caller's autocast and grad mode; the model's weights are not touched."""
    x0 = batch[0].float()
    rest = batch[1:]
    if eps == 0:
        return x0
    steps, size = (1, eps) if method == "fgsm" else (PGD_STEPS, eps / 4)
    adv = x0
    if method == "pgd":
        u = torch.rand(x0.shape, generator=_gen(seed, x0.device), device=x0.device)
        adv = (x0 + (2 * u - 1) * eps).clamp(0, 255)
    with torch.enable_grad(), torch.autocast(x0.device.type, enabled=False):
        for _ in range(steps):
            adv = adv.detach().requires_grad_(True)
            loss = family.per_example_loss(model, family.prepare((adv, *rest), spec, None), cfg).sum()
            (g,) = torch.autograd.grad(loss, adv)
            adv = adv.detach() + size * g.sign()
            adv = (x0 + (adv - x0).clamp(-eps, eps)).clamp(0, 255)  # back into the ball and the pixel range
    return adv.detach()


class MappedSplit:
    """A split whose images pass through fn(images, indices, rest) as they are taken (the rest unchanged)."""

    def __init__(self, base, fn: Callable):
        self.base, self.fn = base, fn

    def __len__(self) -> int:
        return len(self.base)

    def to(self, device) -> MappedSplit:
        self.base.to(device)
        return self

    def take(self, idx: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x, *rest = self.base.take(idx)
        return (self.fn(x, idx, rest), *rest)


def scene_look(data_cfg, split: str) -> Callable[[torch.Tensor, str], torch.Tensor] | None:
    """For the generated scenes: (example indices, look) -> uint8 images of the split's scenes in that look, else
    None."""
    if not isinstance(data_cfg, (ScenesData, ScenesDetectData)):
        return None
    first = SPLIT_BASE[split] + data_cfg.seed * 30_000_000

    def render(idx: torch.Tensor, look: str) -> torch.Tensor:
        return render_scenes(first + idx.long().cpu(), tuple(data_cfg.size), look)[0]

    return render


def _shifted(base, name: str, s: int, look) -> MappedSplit:
    def fn(x, idx, rest):
        if s and look is not None and name in ("fog", "night"):  # the renderer's own look, blended by severity
            target = look(idx, name).to(x.device).float()
            return (x.float().lerp(target, s / len(SEVERITIES))).round().to(torch.uint8)
        return shift_images(x, name, s, seed=1000 * s + int(idx[0]) if len(idx) else 0)

    return MappedSplit(base, fn)


def _attacked(base, family, model, spec, cfg, method: str, eps: float) -> MappedSplit:
    def fn(x, idx, rest):
        return attack_images(family, model, (x, *rest), spec, cfg, method, eps, seed=int(idx[0]) if len(idx) else 0)

    return MappedSplit(base, fn)


def check_images(data: Data, split: str) -> None:
    x = data.split(split).take(torch.arange(1))[0]
    if x.dtype != torch.uint8 or x.ndim != 4:
        raise UserError(
            "--shift and --attack work on image models (uint8 images (B, C, H, W)); "
            f"this run's inputs are {x.dtype} of {x.ndim} dimensions"
        )


def robustness(
    family,
    model: nn.Module,
    data: Data,
    cfg: Config,
    rt: Runtime,
    split: str,
    shifts: list[str] = (),
    severities: tuple[int, ...] = SEVERITIES,
    attacks: list[str] = (),
    eps: list[float] = (),
) -> dict:
    """The family's metric (METRIC[0]) on `split` clean, under each shift at severities 0 and `severities`, and
    under each attack at each eps: {"metric", "split", "clean", "shift": {name: {severity: value}},
    "attack": {method: {eps: value}}}. Evaluation as `deeprecipe eval` runs it (eval mode, no grad, autocast)."""
    from deeprecipe.engine.loop import evaluate

    check_shifts(list(shifts))
    for a in attacks:
        if a not in ATTACKS:
            raise UserError(f"--attack {a}: unknown attack; choose from {', '.join(ATTACKS)}")
    check_images(data, split)
    metric = family.METRIC[0]
    base = data.split(split)
    look = scene_look(cfg.data, split) if shifts else None

    def score(mapped) -> float:
        return float(evaluate(family, model, dataclasses.replace(data, **{split: mapped}), cfg, rt, split)[metric])

    clean = float(evaluate(family, model, data, cfg, rt, split)[metric])
    out = {"metric": metric, "split": split, "clean": clean, "shift": {}, "attack": {}}
    for name in shifts:
        out["shift"][name] = {s: score(_shifted(base, name, s, look)) for s in (0, *severities)}
    for a in attacks:
        out["attack"][a] = {e: score(_attacked(base, family, model, data.spec, cfg, a, e)) for e in eps}
    return out


def table(r: dict) -> list[str]:
    """The result of `robustness` as text lines: a row per shift (a column per severity), a row per attack."""
    lines = [f"{r['split']}_{r['metric']} clean: {r['clean']:.4f}"]
    if r["shift"]:
        sev = sorted({int(s) for v in r["shift"].values() for s in v})
        w = max(len("shift"), *map(len, r["shift"]))
        lines.append(f"{'shift':<{w}}  " + "  ".join(f"sev {s:<3}" for s in sev))
        for name, v in r["shift"].items():
            lines.append(f"{name:<{w}}  " + "  ".join(f"{float(v[k]):<7.4f}" for k in sorted(v, key=int)))
    for a, v in r["attack"].items():
        lines.append(f"{a} " + "  ".join(f"eps {float(e):g}/255: {float(m):.4f}" for e, m in v.items()))
    return lines


def save(r: dict, run_dir: Path) -> dict[str, Path]:
    """robustness.json, plots/robustness.png (metric against severity and against eps) and report-robustness.html
    (the table, for report.html) in the run folder; returns their paths."""
    from deeprecipe.engine import plots

    run_dir = Path(run_dir)
    paths = {"json": run_dir / "robustness.json", "plot": run_dir / "plots" / "robustness.png"}
    r = json.loads(json.dumps(r))  # keys as JSON has them (severities and eps as text)
    if paths["json"].is_file():  # an earlier --shift or --attack of the same split and metric stays beside this one
        old = json.loads(paths["json"].read_text())
        if (old.get("split"), old.get("metric")) == (r["split"], r["metric"]):
            r["shift"], r["attack"] = old["shift"] | r["shift"], old["attack"] | r["attack"]
    atomic_text(paths["json"], json.dumps(r, indent=1))
    n = bool(r["shift"]) + bool(r["attack"])
    fig, axes = plots.plt.subplots(1, n, figsize=(5.5 * n, 4), squeeze=False)
    ax = axes[0]
    if r["shift"]:
        for name, v in r["shift"].items():
            ks = sorted(v, key=int)
            ax[0].plot([int(k) for k in ks], [v[k] for k in ks], marker="o", label=name)
        ax[0].set(xlabel="severity", ylabel=f"{r['split']} {r['metric']}", title="under shift")
        ax[0].legend()
    if r["attack"]:
        a = ax[-1]
        for name, v in r["attack"].items():
            a.plot([0.0, *map(float, v)], [r["clean"], *v.values()], marker="o", label=name)
        a.set(xlabel="eps (pixel levels of 1/255)", ylabel=f"{r['split']} {r['metric']}", title="under attack")
        a.legend()
    plots.save_figure(fig, paths["plot"])
    atomic_text(run_dir / "report-robustness.html", report_section(r))
    return paths


def report_section(r: dict) -> str:
    """The report's Robustness section: the metric per shift and severity, and per attack and eps, as tables."""

    def grid(rows: dict, what: str, col) -> str:
        keys = sorted({k for v in rows.values() for k in v}, key=float)
        head = f"<tr><th>{what}</th>" + "".join(f"<th>{col(k)}</th>" for k in keys) + "</tr>"
        body = "".join(
            f"<tr><th>{html.escape(n)}</th>"
            + "".join(f"<td>{v[k]:.4f}</td>" if k in v else "<td>-</td>" for k in keys)
            + "</tr>"
            for n, v in rows.items()
        )
        return f"<table>{head}{body}</table>"

    metric = html.escape(f"{r['split']} {r['metric']}")
    out = f"<h2>Robustness</h2><p>{metric}: {r['clean']:.4f} clean (robustness.json, plots/robustness.png)</p>"
    if r["shift"]:
        out += grid(r["shift"], "shift", lambda k: f"severity {k}")
    if r["attack"]:
        out += "<p></p>" + grid(r["attack"], "attack", lambda k: f"eps {float(k):g}/255")
    return out
