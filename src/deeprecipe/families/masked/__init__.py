"""Masked-image pretraining of a dense net on unlabelled images: the self-supervised start of a segmenter whose
decoder learns too (SimCLR, families/pretrain, trains a trunk only).

A batch is (images uint8 (B, C, H, W), whatever labels the data set has): the labels are never read. `prepare`
takes a random resized crop and flip of every image (pretrain.crop_scale; none at evaluation) and hides a random
pretrain.mask_ratio of its pretrain.mask_patch-pixel cells (mask.py) -> (hidden image, image, mask), both images
normalized, the hidden pixels 0. The model is the recipe's dense net (unet-resnet18, unet) built with one output
channel per image channel; the loss is the squared error over the hidden pixels (mask.py masked_error).
Evaluation uses fixed masks (the same at every evaluation), so `mse` (per hidden pixel and channel, in normalized
units; lower is better) compares across steps; `psnr` is the same error in [0, 1] pixel units, in dB.

What transfers: the run's weights load by name into the same net built for another task
(`finetune.init_from RUN`: a segmenter gets encoder and decoder; its head, sized to its classes, starts fresh);
`finish` also writes the encoder alone as RUN/backbone.safetensors (unet-resnet18: torchvision's ResNet-18 layout,
so `model.weights` of a tv-resnet18 or a CenterNet's backbone reads it).
"""

import dataclasses
from pathlib import Path

import torch
import torch.nn as nn
from torchvision.utils import make_grid

from deeprecipe.checks.data import configured_batch
from deeprecipe.config import Config
from deeprecipe.core import DataSpec
from deeprecipe.data import image_ops
from deeprecipe.data.core import Data, Draws, eval_batches
from deeprecipe.data.image_ops import denormalize
from deeprecipe.data.views import resized_crop
from deeprecipe.families.masked.mask import cell_mask, masked_error
from deeprecipe.family import Family, ServeContext
from deeprecipe.runtime import Runtime

BACKBONE_FILE = "backbone.safetensors"  # the encoder alone


def eval_draws(device: torch.device, k: int = 0) -> Draws:
    """The fixed random numbers of evaluation batch k's masks."""
    return Draws(torch.Generator(device=device).manual_seed(2_000_003 + k))


def prepare(batch: tuple, spec: DataSpec, cfg: Config, draws: Draws | None, k: int = 0) -> tuple:
    """Raw images (B, C, H, W) uint8 -> (hidden image, image, mask (B, 1, H, W)); with draws, each image is first
    cropped and flipped at random (pretrain.crop_scale)."""
    x = batch[0].float() / 255
    if draws is not None:
        x = resized_crop(x, draws, cfg.pretrain.crop_scale)
    shape = (1, -1, 1, 1)
    x = (x - torch.tensor(spec.mean, device=x.device).view(shape)) / torch.tensor(spec.std, device=x.device).view(shape)
    p = cfg.pretrain
    mask = cell_mask(x.shape, draws if draws is not None else eval_draws(x.device, k), p.mask_ratio, p.mask_patch)
    return x * (1 - mask), x, mask


class Masked(Family):
    """Masked-image pretraining (see the module docstring)."""

    METRIC = ("mse", "min")
    CHECKS_SKIP = {
        "labels": "pretraining never reads the data set's labels",
        "balance": "pretraining never reads the data set's labels",
        "init_prior": "the model reconstructs pixels; it predicts no classes",
    }
    EXTRA_CHECKS = {"batch": configured_batch}

    def __init__(self):
        self._cfg: Config | None = None  # the mask's options for prepare, which takes no config

    def check_config(self, cfg: Config) -> None:
        cfg.pretrain.check_for("masked")
        self._cfg = cfg

    def build_model(self, cfg: Config, spec: DataSpec) -> nn.Module:
        """The recipe's dense net with one output channel per channel of the normalized image (gray data under a
        three-channel mean/std is three channels of the gray image, as prepare makes it)."""
        self._cfg = cfg
        return cfg.model.build(dataclasses.replace(spec, num_classes=max(spec.in_channels, len(spec.mean or ()))))

    def prepare(self, batch: tuple, spec: DataSpec, draws: Draws | None) -> tuple:
        if self._cfg is None:
            raise RuntimeError("Masked.prepare before check_config or build_model gave it the mask's options")
        return prepare(batch, spec, self._cfg, draws)

    def loss(self, model: nn.Module, batch: tuple, cfg: Config, part: str) -> tuple[torch.Tensor, dict]:
        hidden, x, mask = batch
        return masked_error(model(hidden), x, mask).mean(), {}

    def per_example_loss(self, model: nn.Module, batch: tuple, cfg: Config) -> torch.Tensor:
        hidden, x, mask = batch
        return masked_error(model(hidden), x, mask)

    def expected_init_loss(self, spec: DataSpec, cfg: Config) -> tuple[float, str] | None:
        """The net starts near 0 (a zero-mean head), so its error is the hidden pixels' mean square, ~1 in
        normalized units only where the data's mean and std are its own: not a closed form here."""
        return None

    def evaluate(self, model: nn.Module, data: Data, split: str, cfg: Config, rt: Runtime, final: bool) -> dict:
        err, pix, n = 0.0, 0.0, 0
        std = torch.tensor(data.spec.std, device=rt.device).view(1, -1, 1, 1)
        batches = eval_batches(data.split(split), cfg.train.eval_batch_size, rt.device, cfg.train.limit_eval)
        for k, batch in enumerate(batches):
            hidden, x, mask = prepare(batch, data.spec, cfg, None, k)
            out = model(hidden).float()
            err += float(masked_error(out, x, mask).sum())
            pix += float(masked_error(out * std, x * std, mask).sum())  # the same error in [0, 1] pixel units
            n += len(x)
        mse, pixel = err / max(n, 1), pix / max(n, 1)
        return {"mse": mse, "psnr": 10 * torch.log10(torch.tensor(1 / max(pixel, 1e-12))).item()}

    def show_batch(self, batch: tuple, spec: DataSpec) -> tuple[torch.Tensor, list[str]]:
        """The first images hidden and whole, side by side (de-normalized)."""
        hidden, x = (denormalize(v[:8], spec) for v in batch[:2])
        pairs = torch.stack([hidden, x], 1).flatten(0, 1)
        return pairs, [f"{i} {k}" for i in range(len(hidden)) for k in ("hidden", "image")]

    def snapshot(self, model: nn.Module, data: Data, cfg: Config, rt: Runtime) -> dict[str, torch.Tensor]:
        """Rows of (hidden image, reconstruction with the visible pixels kept, image) for the first held-out images."""
        split = data.split("val" if data.val is not None else "train")
        raw = split.take(torch.arange(min(8, len(split))))
        hidden, x, mask = prepare(tuple(t.to(rt.device) for t in raw), data.spec, cfg, None)
        filled = torch.where(mask.bool(), model(hidden).float(), x)
        rows = [denormalize(v, data.spec).float().cpu() for v in (hidden, filled, x)]
        return {"reconstruction": make_grid(torch.cat(rows), nrow=len(x), padding=1)}

    def finish(self, model: nn.Module, data: Data, cfg: Config, rt: Runtime, run_dir: Path, results: dict) -> dict:
        """The final split's metrics, and the encoder alone as run_dir/backbone.safetensors (the whole net where it
        has no `encoder`)."""
        from deeprecipe.engine import checkpoint

        state = checkpoint.plain_state(model)
        trunk = {k[len("encoder.") :]: v for k, v in state.items() if k.startswith("encoder.")} or state
        checkpoint.save_weights(Path(run_dir) / BACKBONE_FILE, trunk, {"format": "pt", "source": "deeprecipe masked"})
        split = data.final_split()
        with torch.no_grad(), rt.autocast():
            m = self.evaluate(model, data, split, cfg, rt, True)
        return {f"{split}_{k}": v for k, v in m.items()}

    def serve(self, ctx: ServeContext) -> None:
        """POST /reconstruct: an image (made as the training images were) -> the image with the cells of evaluation
        batch 0's first mask hidden, the net's reconstruction (visible pixels kept) as PNGs (base64), and the PSNR
        of the hidden pixels in dB: what the pretraining learnt, on the user's own pictures."""
        from fastapi import File, UploadFile

        def reconstruct(img: torch.Tensor) -> dict:
            with torch.no_grad(), ctx.rt.autocast():
                return reconstruct_image(ctx.model, ctx.spec, ctx.cfg, img.to(ctx.rt.device))

        @ctx.router.post("/reconstruct", summary="Hide cells of an image and fill them in (PNG, JPEG, ...)")
        async def reconstruct_one(image: UploadFile = File(..., description="the image file")):
            got = await ctx.locked(reconstruct, await ctx.read_image(image))
            return {
                "text": f"hidden pixels filled in at {got['psnr']:.2f} dB PSNR",
                "psnr": round(got["psnr"], 4),
                "hidden": image_ops.png_base64(got["hidden"]),
                "reconstruction": image_ops.png_base64(got["reconstruction"]),
            }

        ctx.widget("/reconstruct", "image", "Hide cells of an image and fill them in")


def reconstruct_image(model: nn.Module, spec: DataSpec, cfg: Config, img: torch.Tensor) -> dict:
    """uint8 (C, H, W) -> {hidden, reconstruction: (C, H, W) in [0, 1], psnr: of the hidden pixels, dB}, the cells
    of evaluation batch 0's first mask hidden."""
    hidden, x, mask = prepare((img[None],), spec, cfg, None, 0)
    filled = torch.where(mask.bool(), model(hidden).float(), x)
    a, b = denormalize(filled, spec), denormalize(x, spec)
    err = float(((a - b).square().sum(1, keepdim=True) * mask).sum() / (mask.sum() * x.shape[1]).clamp(min=1))
    psnr = 10 * torch.log10(torch.tensor(1 / max(err, 1e-12))).item()
    return {"hidden": denormalize(hidden, spec)[0].cpu(), "reconstruction": a[0].cpu(), "psnr": psnr}
