"""The five modes of image-to-image in one table: what differs between them. The family's hooks (__init__.py) and
its use on files (infer.py) look the data spec's mode up in MODES instead of switching on its name.

    mode         the pair the net learns (input -> target)          baseline scored beside it      a file / upload
    sr           bicubic up-sampling of the shrunk image -> image   bicubic (the input itself)     enhance (tiled)
    inpaint      image with holes zeroed + mask channel -> image    the hole's PSNR; Telea         inpaint
    label2image  one-hot label map -> scene                         none                           translate labels
    paired       A -> B                                             the untranslated input         translate
    unpaired     A -> B (CycleGAN, two sets)                        the input (known pairs only)   translate
Translations (label2image, paired, unpaired) also get the domain FID of their outputs (metrics.DomainFID).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

import deeprecipe.families.img2img.degrade as degrade  # the modules, not the package: its __init__ imports this one
import deeprecipe.families.img2img.infer as infer
import deeprecipe.families.img2img.metrics as im
from deeprecipe.core import DataSpec
from deeprecipe.data.core import Draws


@dataclass(frozen=True)
class Mode:
    # (images (B, C, H, W) in [-1, 1], labels (B, H, W), spec, draws) -> (input, target) in [-1, 1]
    pair: Callable[[torch.Tensor, torch.Tensor, DataSpec, Draws], tuple[torch.Tensor, torch.Tensor]]
    # (scores, input, output and target (B, C, H, W) in [0, 1], telea) -> adds the baseline's scores; returns the
    # baseline's own images (B, C, H, W) in [0, 1] for the report's rows, or None
    baseline: Callable[[im.Scores, torch.Tensor, torch.Tensor, torch.Tensor, bool], torch.Tensor | None]
    translation: bool  # a change of look, scored by the domain FID of the outputs
    labels_in: bool  # the input is a label map, not a picture (no FID of the untranslated input)
    read: Callable[[str, DataSpec], tuple]  # predict: a file -> run's arguments after (model, spec, rt)
    run: Callable[..., torch.Tensor]  # (model, spec, rt, *arguments) -> the answer, uint8 (C, H, W)
    endpoint: Callable[..., None]  # (ctx, go) adds the mode's endpoint and widget (infer.serve)


def make_input(x: torch.Tensor, y: torch.Tensor, spec: DataSpec, draws: Draws) -> tuple[torch.Tensor, torch.Tensor]:
    """(input, target) in [-1, 1] of a raw batch (images uint8 (B, C, H, W), labels) for the spec's mode."""
    return MODES[spec.extra["mode"]].pair(degrade.unit(x), y, spec, draws)


# ------------------------------------------------------------------------------------------ pairs


def _shrunk(img: torch.Tensor, y: torch.Tensor, spec: DataSpec, draws: Draws) -> tuple[torch.Tensor, torch.Tensor]:
    e = spec.extra
    return degrade.enlarge(degrade.shrink(img, e["scale"], e["blur"], e["noise"], draws), e["scale"]), img


def _holed(img: torch.Tensor, y: torch.Tensor, spec: DataSpec, draws: Draws) -> tuple[torch.Tensor, torch.Tensor]:
    B, _, H, W = img.shape
    hole = degrade.holes(B, H, W, spec.extra["holes"], spec.extra["hole_fraction"], draws, img.device)
    return torch.cat([img * (1 - hole), hole], 1), img


def _labelled(img: torch.Tensor, y: torch.Tensor, spec: DataSpec, draws: Draws) -> tuple[torch.Tensor, torch.Tensor]:
    return degrade.one_hot(y, spec.num_classes), img


def _a_to_b(img: torch.Tensor, y: torch.Tensor, spec: DataSpec, draws: Draws) -> tuple[torch.Tensor, torch.Tensor]:
    ca = int(spec.extra["channels_a"])  # A and B stacked on the channels
    return img[:, :ca], img[:, ca:]


# ------------------------------------------------------------------------------------------ baselines


def _bicubic(scores: im.Scores, x: torch.Tensor, out: torch.Tensor, t: torch.Tensor, telea: bool) -> None:
    base = im.to_unit(x)  # the bicubic up-sampling is the net's input
    scores.add("psnr_bicubic", im.psnr(base, t))
    scores.add("ssim_bicubic", im.ssim(base, t))


def _telea(scores: im.Scores, x: torch.Tensor, out: torch.Tensor, t: torch.Tensor, telea: bool):
    hole = x[:, -1:]
    scores.add("psnr_hole", im.psnr_masked(out, t, hole))
    extra = im.telea(im.to_unit(x[:, :-1]), hole) if telea else None  # None too without OpenCV
    if extra is not None:
        scores.add("psnr_hole_telea", im.psnr_masked(extra, t, hole))
        scores.add("psnr_telea", im.psnr(extra, t))
        scores.add("ssim_telea", im.ssim(extra, t))
    return extra


def _untranslated(scores: im.Scores, x: torch.Tensor, out: torch.Tensor, t: torch.Tensor, telea: bool) -> None:
    if x.shape[1] == t.shape[1]:  # A and B of as many channels: the input itself as the answer
        scores.add("psnr_input", im.psnr(im.to_unit(x), t))
        scores.add("ssim_input", im.ssim(im.to_unit(x), t))


def _none(scores: im.Scores, x: torch.Tensor, out: torch.Tensor, t: torch.Tensor, telea: bool) -> None:
    return None


MODES: dict[str, Mode] = {
    "sr": Mode(_shrunk, _bicubic, False, False, infer.read_low_res, infer.enhance, infer.serve_enhance),
    "inpaint": Mode(_holed, _telea, False, False, infer.read_with_mask, infer.inpaint, infer.serve_inpaint),
    "label2image": Mode(_labelled, _none, True, True, infer.read_label_map, infer.translate, infer.serve_label_map),
    "paired": Mode(_a_to_b, _untranslated, True, False, infer.read_a, infer.translate, infer.serve_translate),
    "unpaired": Mode(_a_to_b, _untranslated, True, False, infer.read_a, infer.translate, infer.serve_translate),
}
