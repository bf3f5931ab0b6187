"""Feature nets trained once from a recipe and cached (the GAN family's domain FID and IS, the image-to-image
family's FIDs): the run folder of a feature net's config in the cache, trained there by the family it names on
first use, and a trained classifier read as a feature extractor.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from deeprecipe.core import cache_dir as core_cache_dir
from deeprecipe.family import Family


def cache_dir() -> Path:
    return core_cache_dir() / "features"


class DomainFeatures(nn.Module):
    """A trained classifier as a feature extractor: images in [-1, 1] (B, C, H, W) of any size ->
    penultimate features (B, F) (`logits=False`) or class logits (B, classes) (`logits=True`)."""

    def __init__(self, classifier: nn.Module, mean, std, size: tuple[int, int], logits: bool = False):
        super().__init__()
        self.net, self.size, self.logits = classifier.eval(), tuple(size), logits
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))
        self._feat = None
        head = classifier.get_classifier()  # (B, F) -> (B, classes): its input is the features
        head.register_forward_pre_hook(lambda m, args: setattr(self, "_feat", args[0]))
        self.num_features = head.out_features if logits else head.in_features

    def both(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(features (B, F), logits (B, classes)) in fp32, from one pass."""
        x = x.float()
        if tuple(x.shape[-2:]) != self.size:
            x = F.interpolate(x, size=self.size, mode="bilinear", antialias=True, align_corners=False)
        x = ((x + 1) / 2 - self.mean) / self.std
        logits = self.net(x).float()
        return self._feat.flatten(1).float(), logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats, logits = self.both(x)
        return logits if self.logits else feats


def classifier_features(fcfg, data_name: str, device: torch.device, family: Family) -> DomainFeatures:
    """The classifier of classify config `fcfg` (trained by `family`, the classify family) as a DomainFeatures, from
    the cache (trained there if needed); `.accuracy` is its best val accuracy."""
    import json

    from deeprecipe.core import DataSpec
    from deeprecipe.engine import checkpoint

    folder = cached_run(fcfg, family, data_name)
    spec = DataSpec(**json.loads((folder / "spec.json").read_text()))
    clf = family.build_model(fcfg, spec)
    clf.load_state_dict(checkpoint.inference_weights(folder))
    net = DomainFeatures(clf, spec.mean, spec.std, tuple(spec.image_size)).to(device)
    net.accuracy = _best_acc(folder)
    return net


def cached_run(fcfg, family, data_name: str) -> Path:
    """The run folder of a feature net's config `fcfg` in the cache (named by a hash of the config), trained there
    with `family` first when it is not there yet; every later run on the same data reuses it."""
    from deeprecipe.config import dump
    from deeprecipe.engine.loop import train

    key = hashlib.sha1(dump(fcfg).encode()).hexdigest()[:10]
    folder = cache_dir() / f"{data_name}-{fcfg.recipe}-{key}"
    if not (folder / "checkpoints" / "best.safetensors").is_file():
        warnings.warn(
            f"training the domain feature net ({fcfg.recipe}, {fcfg.train.steps} steps) into {folder}; "
            "it is reused by every later run on this data",
            stacklevel=3,
        )
        import shutil

        # trained under a name of this process, then renamed: runs that start together (a sweep, a tuner's
        # trials) never read each other's half-written net; the first rename wins, the others use it
        work = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
        shutil.rmtree(work, ignore_errors=True)
        with torch.enable_grad():  # `deeprecipe eval` runs with gradients off
            train(fcfg, family, work, command="(domain feature net for FID/IS)")
        if not (folder / "checkpoints" / "best.safetensors").is_file():
            shutil.rmtree(folder, ignore_errors=True)  # an incomplete folder (an older, killed training)
        try:
            work.rename(folder)
        except OSError:  # another run's net got there first
            shutil.rmtree(work, ignore_errors=True)
    return folder


def _best_acc(folder: Path) -> float:
    from deeprecipe.engine.run import read_status

    return float((read_status(folder).get("best") or {}).get("acc") or float("nan"))
