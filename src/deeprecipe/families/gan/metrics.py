"""Offline evaluation of image generators, and the health checks of a GAN run.

Two FIDs, named for what they are:
- `fid` (the run's metric), the *domain* FID: its features are those of a classifier that deeprecipe trains on the
  same data set (a built-in classify recipe), saved once in a cache folder named by a hash of its config, and
  reused. FID compares the Gaussian statistics of its penultimate features (the input of its `head`) on real and
  generated images; IS is exp(E KL(p(y|x) || p(y))) of its class probabilities, so its ceiling is the number of
  classes. Both go through torchmetrics with that net as the custom feature extractor. Domain values compare only
  between runs that share the feature net (same cache folder); they are not comparable with published FIDs.
- `fid_standard`, only when `model.fid_weights` names the FID Inception weights on disk (common/fid.py): the FID of
  the papers (pytorch-fid, torch-fidelity, torchmetrics' default), comparable with published figures for the same
  reference set and number of samples. Nothing is downloaded.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn as nn

from deeprecipe.common.features import DomainFeatures, classifier_features
from deeprecipe.common.fid import StandardFID
from deeprecipe.core import UserError


def feature_config(cfg):
    """The classify Config of the domain feature net of GAN config `cfg` (its data, a classify recipe)."""
    from deeprecipe.config import list_recipes, read_recipe, to_dict
    from deeprecipe.recipe import resolve

    M = cfg.model
    name = M.feature_recipe
    if name == "auto":
        name = f"{cfg.data.name}-cnn" if f"{cfg.data.name}-cnn" in list_recipes() else "fashion-mnist-cnn"
    raw, rname = read_recipe(name)
    if raw.get("task", "classify") != "classify":
        raise UserError(f"model.feature_recipe={name}: the domain feature net must be a classify recipe")
    aug = {k: v for k, v in (raw.get("data") or {}).items() if k in ("crop_pad", "flip")}
    raw["data"] = {**to_dict(cfg.data), "limit": 0, **aug}
    raw.setdefault("optim", {})["label_smoothing"] = 0.0  # calibrated probabilities: IS reads them
    raw.setdefault("train", {}).update(device=cfg.train.device, ema=0.0, tta="none")  # a feature extractor
    if M.feature_steps:
        raw["train"].update(steps=M.feature_steps, eval_every=M.feature_steps, ckpt_every=M.feature_steps)
    return resolve(raw, rname)


def feature_net(cfg, device: torch.device) -> DomainFeatures:
    """Load the domain feature net of `cfg` from the cache, training it there first if needed."""
    from deeprecipe.families import get_family

    return classifier_features(feature_config(cfg), cfg.data.name, device, get_family("classify"))


# ------------------------------------------------------------------------------------------ FID and IS


def _metrics(features: nn.Module, logits: bool):
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.inception import InceptionScore

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if logits:
            return InceptionScore(feature=features, splits=10)
        return FrechetInceptionDistance(feature=features, reset_real_features=False)


class Evaluator:
    """The domain FID, IS and class histogram of generated images (with `feats`), and the standard FID (with
    `standard`).

    Real statistics are computed once (`add_real`); `score(images)` scores one batch stream of fakes."""

    def __init__(self, feats: DomainFeatures | None, standard: StandardFID | None = None, device="cpu"):
        self.feats, self.standard, self.device = feats, standard, torch.device(device)
        self.fid = _metrics(feats, False).to(self.device) if feats is not None else None
        self.real_spread = None

    @torch.no_grad()
    def add_real(self, batches) -> None:
        """batches: images in [-1, 1] (B, C, H, W)."""
        spreads = []
        for x in batches:
            x = x.to(self.device)
            if self.fid is not None:
                self.fid.update(x, real=True)
                spreads.append(spread(self.feats(x)))
            if self.standard is not None:
                self.standard.update(x, real=True)
        self.real_spread = float(torch.tensor(spreads).mean()) if spreads else None

    @torch.no_grad()
    def score(self, batches) -> dict:
        """FIDs, IS, the class histogram and the feature spread of generated images (batches in [-1, 1])."""
        out, logits, spreads = {}, [], []
        if self.fid is not None:
            self.fid.reset()
            is_metric = _metrics(nn.Identity(), True).to(self.device)  # fed with the logits computed below
        if self.standard is not None:
            self.standard.reset()
        for x in batches:
            x = x.to(self.device)
            if self.fid is not None:
                self.fid.update(x, real=False)
                f, lg = self.feats.both(x)
                logits.append(lg)
                spreads.append(spread(f))
                is_metric.update(lg)
            if self.standard is not None:
                self.standard.update(x, real=False)
        if self.fid is not None:
            out["fid"] = float(self.fid.compute())
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                is_mean, is_std = is_metric.compute()
            out["is"], out["is_std"] = float(is_mean), float(is_std)
            k = logits[0].shape[1]
            out["class_hist"] = torch.bincount(torch.cat(logits).argmax(1), minlength=k).tolist()
            out["spread"] = float(torch.tensor(spreads).mean())
            if self.real_spread:
                out["spread_ratio"] = out["spread"] / self.real_spread
        if self.standard is not None:
            out |= self.standard.compute()
        return out


def spread(f: torch.Tensor) -> float:
    """Mean pairwise L2 distance inside a batch of vectors (B, F): the diversity of a batch."""
    f = f.flatten(1).float()
    n = len(f)
    return float(torch.cdist(f, f).sum() / max(1, n * (n - 1)))


# ------------------------------------------------------------------------------------------ health


def collapse(result: dict, class_names: list[str]) -> list[str]:
    """Mode-collapse findings from a score() result, one line each with advice ([] when healthy)."""
    out = []
    ratio = result.get("spread_ratio")
    if ratio is not None and ratio < 0.5:
        out.append(
            f"mode collapse: generated samples are {ratio:.2f}x as diverse as real ones (feature spread); "
            "G maps many z to few images - try model.loss=hinge, model.spectral_norm=true, a lower optim.lr "
            "or a larger batch"
        )
    hist = result.get("class_hist")
    if hist and len(hist) >= 3 and sum(hist):
        share = max(hist) / sum(hist)
        top = class_names[hist.index(max(hist))] if class_names else str(hist.index(max(hist)))
        if share > max(0.3, 3 / len(hist)):
            out.append(
                f"mode collapse: {share:.0%} of samples are classified '{top}' (uniform would be "
                f"{1 / len(hist):.0%}) - G covers few modes; try model.conditional=true, spectral norm or "
                "more steps"
            )
        missing = [
            class_names[i] if class_names else str(i) for i, c in enumerate(hist) if c < 0.1 * sum(hist) / len(hist)
        ]
        if missing and share <= max(0.3, 3 / len(hist)):
            out.append(
                f"mode dropping: almost no samples look like {', '.join(missing[:5])} - train longer or "
                "try model.conditional=true"
            )
    return out


class DiscriminatorWatch:
    """Flags a discriminator that wins outright: D loss below `low` at `patience` logged steps in a row."""

    def __init__(self, low: float = 0.05, patience: int = 20):
        self.low, self.patience, self.run, self.fired = low, patience, 0, False

    def update(self, d_loss: float, step: int) -> str | None:
        self.run = self.run + 1 if d_loss < self.low else 0
        if self.run >= self.patience and not self.fired:
            self.fired = True
            return (
                f"discriminator wins outright: D loss < {self.low} for {self.run} logged steps up to step {step}, "
                "so G gets no useful gradient - lower D's lr (model.d_lr_scale=0.5), use real_label=0.9, "
                "spectral_norm=true or a smaller d_width"
            )
        return None


def nonfinite(step: int, d_loss: float, g_loss: float) -> str:
    return (
        f"NaN: losses became D={d_loss:.4g} G={g_loss:.4g} at step {step}; training stopped with the last good "
        "checkpoint kept - lower optim.lr, use train.precision=fp32 or model.spectral_norm=true, or set "
        "train.nonfinite=skip"
    )
