"""Quality of translated images: PSNR and SSIM (torchmetrics) per image, and the classic baselines.

Images are scored as they would be saved: in [0, 1], rounded to 8 bit. PSNR is per image and then averaged (a
perfect image counts as MAX_PSNR dB); `psnr_masked` is the PSNR over the pixels of a mask (an inpainting's
hole). The inpainting baseline is OpenCV's Telea fast marching (opencv-python-headless, an optional extra:
`telea` returns None without it).

Translations of scenes (label2image, day -> night, clear -> fog) are also scored by a domain FID (`DomainFID`):
the Frechet distance between the features of generated and of real target images, on the encoder of a scene
segmenter that deeprecipe trains on the same scenes (`scene_features`; cached like the GAN family's classifier,
common/features.py). Why a segmenter and not a classifier: a scene has no one class to learn, but every pixel
has one, so a U-Net trained on the renderer's label maps learns what each kind of thing looks like and where it
is, which is what a label map -> scene generator must get right; its features are each encoder level's channel
means (as Inception's FID pools its last level), the shallow levels keeping colour, brightness and contrast
(what a look such as night or fog changes), the deep ones the objects. Translations between two folders of the
user's (data.source=pairs, paired or unpaired) have no label maps: their feature net is a classifier trained to tell
A's images from B's (`pair_features`, common/features.py's DomainFeatures on a classify recipe), whose penultimate
features must see whatever makes B look like B. FID values compare only between runs that share the feature net
(the same cache folder) and the same number of images.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from deeprecipe.core import UserError

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


# ------------------------------------------------------------------------------------------ domain FID of scenes


class SceneFeatures(nn.Module):
    """A scene U-Net's encoder as a feature extractor: images in [-1, 1] (B, 3, H, W) (resized to the size it was
    trained at) -> (B, F): the spatial mean of each encoder level and of the bottleneck, concatenated (F = the sum
    of their widths). Always in eval mode and fp32 (BatchNorm's running statistics, full-precision features)."""

    def __init__(self, unet: nn.Module, mean, std, size: tuple[int, int]):
        super().__init__()
        self.unet, self.size = unet.eval(), tuple(size)
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))
        with torch.no_grad():
            self.num_features = self(torch.zeros(1, len(mean), *self.size)).shape[1]

    def train(self, mode: bool = True):
        return super().train(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            x = x.float()
            if tuple(x.shape[-2:]) != self.size:
                x = F.interpolate(x, size=self.size, mode="bilinear", antialias=True, align_corners=False)
            x = ((x + 1) / 2 - self.mean) / self.std
            feats = []
            for block in self.unet.down:
                x = block(x)  # (B, w_i, H / 2^i, W / 2^i)
                feats.append(x.mean((2, 3)))
                x = F.max_pool2d(x, 2)
            feats.append(self.unet.bottleneck(x).mean((2, 3)))
            return torch.cat(feats, 1)


def scene_feature_config(cfg):
    """The segment Config of the scene feature net of img2img config `cfg`: its recipe (a U-Net on the scenes data
    set) on the scenes of `cfg` (size, seed, training images), without crops (it sees whole images, as FID does)."""
    from deeprecipe.config import read_recipe
    from deeprecipe.recipe import resolve

    name = "scenes-unet" if cfg.model.feature_recipe == "auto" else cfg.model.feature_recipe
    raw, rname = read_recipe(name)
    data, model = raw.get("data") or {}, raw.get("model") or {}
    if raw.get("task") != "segment" or data.get("name") != "scenes" or model.get("name") != "unet":
        raise UserError(f"model.feature_recipe={name}: the scene feature net is a segment recipe of a unet on scenes")
    D = cfg.data
    raw["data"] = {**data, "size": list(D.size), "seed": D.seed, "train_size": D.train_size, "test_size": 0, "crop": 0}
    raw.setdefault("train", {}).update(device=cfg.train.device, ema=0.0, tta="none")  # a feature extractor
    if cfg.model.feature_steps:
        s = cfg.model.feature_steps
        raw["train"].update(steps=s, eval_every=s, ckpt_every=s)
    return resolve(raw, rname)


def scene_features(cfg, device: torch.device) -> SceneFeatures:
    """The scene feature net of `cfg` from the cache, trained there first if needed; `.miou` is its val mIoU."""
    import json

    from deeprecipe.common.features import cached_run
    from deeprecipe.core import DataSpec
    from deeprecipe.engine import checkpoint
    from deeprecipe.engine.run import read_status
    from deeprecipe.families import get_family

    fcfg, segment = scene_feature_config(cfg), get_family("segment")
    with torch.random.fork_rng(devices=[device] if torch.device(device).type == "cuda" else []):
        folder = cached_run(fcfg, segment, "scenes")  # training it must not move the run's random streams
    spec = DataSpec(**json.loads((folder / "spec.json").read_text()))
    unet = segment.build_model(fcfg, spec)
    unet.load_state_dict(checkpoint.inference_weights(folder))
    net = SceneFeatures(unet, spec.mean, spec.std, tuple(spec.image_size)).to(device)
    net.miou = float((read_status(folder).get("best") or {}).get("miou") or float("nan"))
    return net


PAIR_FEATURE_STEPS = 500  # the A-vs-B classifier's steps unless model.feature_steps says (two classes learn fast)


def pair_feature_config(cfg):
    """The classify Config of the feature net of translations between two folders (data.source=pairs): a classify
    recipe (auto: imagefolder-resnet) trained to tell data.path/A's images from data.path/B's, its two classes."""
    from pathlib import Path

    from deeprecipe.config import read_recipe
    from deeprecipe.recipe import resolve

    name = "imagefolder-resnet" if cfg.model.feature_recipe == "auto" else cfg.model.feature_recipe
    raw, rname = read_recipe(name)
    if raw.get("task", "classify") != "classify":
        raise UserError(f"model.feature_recipe={name}: the feature net of folder translations is a classify recipe")
    keep = {k: v for k, v in (raw.get("data") or {}).items() if k in ("crop_pad", "flip", "image_size")}
    root = Path(cfg.data.path).resolve()
    raw["data"] = {"name": "imagefolder", "path": str(root), "channels": 3, "image_size": 32, **keep}
    raw.setdefault("optim", {})["label_smoothing"] = 0.0
    s = cfg.model.feature_steps or PAIR_FEATURE_STEPS
    raw.setdefault("train", {}).update(
        device=cfg.train.device, ema=0.0, tta="none", steps=s, eval_every=s, ckpt_every=s
    )
    return resolve(raw, rname)


def pair_features(cfg, device: torch.device) -> nn.Module:
    """The A-vs-B classifier of `cfg` (pair_feature_config) as a feature net, from the cache (trained there first
    if needed): its penultimate features, as the GAN family's domain FID reads them."""
    from deeprecipe.common.features import classifier_features
    from deeprecipe.families import get_family

    with torch.random.fork_rng(devices=[device] if torch.device(device).type == "cuda" else []):
        return classifier_features(pair_feature_config(cfg), "pairs", device, get_family("classify"))


class DomainFID:
    """Domain FID of generated against real images (both (B, 3, H, W) in [-1, 1], added batch by batch) on one
    feature net (SceneFeatures, or a classifier's DomainFeatures); with `inputs`, also of the untranslated inputs
    against the same real images (`fid_input`: the baseline a translation must beat, and a test that the features
    see the change of look at all)."""

    def __init__(self, feats: nn.Module, inputs: bool = False):
        from torchmetrics.image.fid import FrechetInceptionDistance

        def make():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return FrechetInceptionDistance(feature=feats).to(feats.mean.device)

        self.fids = {"fid": make(), **({"fid_input": make()} if inputs else {})}
        self.n = 0

    def add(self, fake: torch.Tensor, real: torch.Tensor, inputs: torch.Tensor | None = None) -> None:
        with torch.autocast(real.device.type, enabled=False):  # features in fp32
            for name, m in self.fids.items():
                m.update(real.float(), real=True)
                m.update((fake if name == "fid" else inputs).float(), real=False)
        self.n += len(fake)

    def compute(self) -> dict[str, float]:
        """{"fid": ..., "fid_input": ...}; {} with fewer than 2 images (no covariance)."""
        if self.n < 2:
            return {}
        return {name: float(m.compute()) for name, m in self.fids.items()}
