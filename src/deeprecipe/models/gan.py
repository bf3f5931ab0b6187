"""Generative adversarial nets: the MLP GAN (Goodfellow et al., 2014) and the DCGAN (Radford et al., 2016).

One `GAN` module holds both nets (`generator`, `discriminator`) so that checkpoints, export and the rest of
the project treat it as one model; calling it runs the generator: z (B, latent) [, y (B,)] -> images in
[-1, 1] (B, C, H, W).

DCGAN layout for a square image of S = s0 * 2^n pixels (28 = 7*4, 32 = 4*8, 64 = 4*16):
    G: z -> ConvT(k=s0) -> (B, w*2^(n-1), s0, s0) -> n x [ConvT(4, stride 2) -> BN -> ReLU] ... -> tanh
    D: x -> n x [Conv(4, stride 2) -> BN (not on the first layer) -> LeakyReLU(0.2)] -> Conv(k=s0) -> logit
with weights drawn from N(0, 0.02) and BN scales from N(1, 0.02), as in the paper. Spectral norm (Miyato
et al., 2018) replaces BN in the discriminator when on. The class-conditional variant feeds a label
embedding to the generator (concatenated to z) and uses a projection discriminator (the label embedding
dotted with D's last features, added to the logit).

The training knobs that only a GAN has (loss, label smoothing, how often to draw) live in `GANTraining`,
which both model configs extend; optim.* (lr, betas) and train.* (steps, batch, ema) keep their meaning.

No classifier API (models/head.py): a generator, and a critic whose `head` gives one real/fake logit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn

from deeprecipe.config import ranged
from deeprecipe.core import ConfigError, DataSpec
from deeprecipe.models.dropout import Dropout


@dataclass
class GANTraining:
    """GAN-only training and evaluation settings (see tasks/gan.py)."""

    latent: int = ranged(100, "> 0")  # size of the noise vector z
    conditional: bool = False  # class-conditional G and D (needs a labelled data set)
    spectral_norm: bool = False  # spectral norm on every D layer (and no BatchNorm in D)
    loss: Literal["nonsat", "hinge"] = "nonsat"  # nonsat: L_G = -log D(G(z)) | hinge (families/gan)
    real_label: float = ranged(1.0, "(0, 1]")  # one-sided label smoothing: D's target on real images (often 0.9)
    d_lr_scale: float = ranged(1.0, "> 0")  # D's learning rate = optim.lr * this (TTUR when != 1)
    eval_samples: int = 5000  # generated images for FID/IS (at the end; a tenth of it at each eval)
    feature_recipe: str = "auto"  # domain feature net: a classify recipe trained on this data (auto: <data>-cnn)
    feature_steps: int = 0  # train the feature net this many steps (0: as its recipe says)
    fid_weights: str = ""  # path to the FID Inception weights (pt_inception-2015-12-05-6726825d.pth, pytorch-fid's
    #                         release): the standard FID `fid_standard` as well (never downloaded; common/fid.py)


def _sn(layer: nn.Module, on: bool) -> nn.Module:
    return nn.utils.parametrizations.spectral_norm(layer) if on else layer


def dcgan_init(m: nn.Module) -> None:
    """Weights from N(0, 0.02), BN scale from N(1, 0.02), biases 0 (the DCGAN paper's init)."""
    if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear, nn.Embedding)):
        w = m.parametrizations.weight.original if hasattr(m, "parametrizations") else m.weight
        nn.init.normal_(w, 0.0, 0.02)
        if getattr(m, "bias", None) is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


class GAN(nn.Module):
    """Both nets; forward(z, y) = generator(z, y)."""

    def __init__(
        self, generator: nn.Module, discriminator: nn.Module, latent: int, num_classes: int, shape: tuple[int, int, int]
    ):
        super().__init__()
        self.generator, self.discriminator = generator, discriminator
        self.latent, self.num_classes, self.shape = latent, num_classes, shape  # num_classes 0: unconditional

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return self.generator(z, y)

    def noise(
        self, n: int, gen: torch.Generator | None = None, device=None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(z (n, latent), y (n,) or None): labels cycle over the classes so a grid shows every class."""
        z = torch.randn(n, self.latent, generator=gen, device=device)
        y = torch.arange(n, device=device) % self.num_classes if self.num_classes else None
        return z, y


# ------------------------------------------------------------------------------------------ MLP GAN


class MLPGenerator(nn.Module):
    def __init__(self, latent: int, hidden: list[int], shape: tuple[int, int, int], num_classes: int):
        super().__init__()
        self.shape = shape
        self.embed = nn.Embedding(num_classes, latent) if num_classes else None
        layers, width = [], latent * (2 if num_classes else 1)
        for h in hidden:
            layers += [nn.Linear(width, h), nn.BatchNorm1d(h), nn.LeakyReLU(0.2, inplace=True)]
            width = h
        self.net = nn.Sequential(*layers, nn.Linear(width, math.prod(shape)), nn.Tanh())

    def forward(self, z, y=None):  # (B, latent) -> (B, C, H, W)
        if self.embed is not None:
            z = torch.cat([z, self.embed(y)], 1)
        return self.net(z).view(-1, *self.shape)


class MLPDiscriminator(nn.Module):
    def __init__(self, hidden: list[int], shape: tuple[int, int, int], num_classes: int, sn: bool, dropout: float):
        super().__init__()
        layers, width = [nn.Flatten()], math.prod(shape)
        for h in hidden:
            layers += [_sn(nn.Linear(width, h), sn), nn.LeakyReLU(0.2, inplace=True), Dropout(dropout)]
            width = h
        self.body = nn.Sequential(*layers)
        self.head = _sn(nn.Linear(width, 1), sn)
        self.embed = _sn(nn.Embedding(num_classes, width), sn) if num_classes else None

    def forward(self, x, y=None):  # (B, C, H, W) -> (B,) logits
        h = self.body(x)
        out = self.head(h).squeeze(1)
        if self.embed is not None:  # projection discriminator
            out = out + (self.embed(y) * h).sum(1)
        return out


@dataclass
class GANConfig(GANTraining):
    name: str = "gan"
    hidden: tuple[int, ...] = ranged((256, 512, 1024), "> 0")  # generator widths; the discriminator uses them reversed
    dropout: float = ranged(0.3, "[0, 1)")  # in the discriminator

    def build(self, spec: DataSpec) -> GAN:
        shape = (spec.in_channels, *spec.image_size)
        k = _classes(self, spec)
        g = MLPGenerator(self.latent, list(self.hidden), shape, k)
        d = MLPDiscriminator(list(reversed(self.hidden)), shape, k, self.spectral_norm, self.dropout)
        return GAN(g, d, self.latent, k, shape)


# ------------------------------------------------------------------------------------------ DCGAN


def _layout(size: int) -> tuple[int, int]:
    """(s0, n): size = s0 * 2^n with s0 in 4..7, the starting map of G and the last map of D."""
    n = 0
    while size % 2 == 0 and size // 2 >= 4:
        size, n = size // 2, n + 1
    return size, n


class ConvGenerator(nn.Module):
    def __init__(self, latent: int, width: int, size: int, channels: int, num_classes: int):
        super().__init__()
        s0, n = _layout(size)
        self.embed = nn.Embedding(num_classes, latent) if num_classes else None
        w = width * 2 ** (n - 1)
        layers = [
            nn.ConvTranspose2d(latent * (2 if num_classes else 1), w, s0, 1, 0, bias=False),
            nn.BatchNorm2d(w),
            nn.ReLU(inplace=True),
        ]  # (B, w, s0, s0)
        for _ in range(n - 1):  # each doubles the map and halves the width
            layers += [
                nn.ConvTranspose2d(w, w // 2, 4, 2, 1, bias=False),
                nn.BatchNorm2d(w // 2),
                nn.ReLU(inplace=True),
            ]
            w //= 2
        layers += [nn.ConvTranspose2d(w, channels, 4, 2, 1), nn.Tanh()]  # (B, C, size, size)
        self.net = nn.Sequential(*layers)

    def forward(self, z, y=None):  # (B, latent) -> (B, C, H, W)
        if self.embed is not None:
            z = torch.cat([z, self.embed(y)], 1)
        return self.net(z[:, :, None, None])


class ConvDiscriminator(nn.Module):
    def __init__(self, width: int, size: int, channels: int, num_classes: int, sn: bool):
        super().__init__()
        s0, n = _layout(size)
        layers, c_in, w = [], channels, width
        for i in range(n):  # (B, C, S, S) -> (B, width * 2^(n-1), s0, s0)
            layers += [_sn(nn.Conv2d(c_in, w, 4, 2, 1, bias=i == 0 or sn), sn)]
            layers += [nn.BatchNorm2d(w)] if i > 0 and not sn else []
            layers += [nn.LeakyReLU(0.2, inplace=True)]
            c_in, w = w, w * 2
        self.body = nn.Sequential(*layers)
        self.head = _sn(nn.Conv2d(c_in, 1, s0, 1, 0), sn)  # (B, 1, 1, 1)
        self.embed = _sn(nn.Embedding(num_classes, c_in), sn) if num_classes else None

    def forward(self, x, y=None):  # (B, C, H, W) -> (B,) logits
        h = self.body(x)
        out = self.head(h).flatten()
        if self.embed is not None:  # projection discriminator on the pooled last features
            out = out + (self.embed(y) * h.sum((2, 3))).sum(1)
        return out


@dataclass
class DCGANConfig(GANTraining):
    name: str = "dcgan"
    image_size: int = 0  # 28, 32 or 64 (0: the data's size); images are resized on the device to it
    g_width: int = 64  # generator width of the last hidden layer (ngf); it doubles towards z
    d_width: int = 64  # discriminator width of the first layer (ndf); it doubles with depth

    def build(self, spec: DataSpec) -> GAN:
        size = self.image_size or spec.image_size[0]
        if size not in (28, 32, 64):
            raise ConfigError(
                f"model.image_size={size}: dcgan draws 28, 32 or 64 pixel images "
                "(set model.image_size to one of them; the data is resized on the fly)"
            )
        k = _classes(self, spec)
        g = ConvGenerator(self.latent, self.g_width, size, spec.in_channels, k)
        d = ConvDiscriminator(self.d_width, size, spec.in_channels, k, self.spectral_norm)
        model = GAN(g, d, self.latent, k, (spec.in_channels, size, size))
        model.apply(dcgan_init)
        return model


def _classes(cfg: GANTraining, spec: DataSpec) -> int:
    if cfg.conditional and spec.num_classes < 2:
        raise ConfigError("model.conditional=true needs a labelled data set with at least 2 classes")
    return spec.num_classes if cfg.conditional else 0
