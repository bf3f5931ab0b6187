"""The standard FID (`fid_standard`), for the GAN and image-to-image families: torchmetrics'
FrechetInceptionDistance on the 2048 pool features of the FID Inception, the TensorFlow Inception-v3 of the original
FID code ported to PyTorch (`pt_inception-2015-12-05-6726825d.pth`, the weights pytorch-fid, torch-fidelity and
torchmetrics' default use), with torch-fidelity's resizing to 299 x 299 (TensorFlow 1.x bilinear, no antialiasing:
the antialias=True default of torchmetrics 1.8 and later is not what the published figures used). Figures then
compare with published ones computed on the same reference images and the same number of samples (FID is biased: it
falls as the number of images grows).

The weights are a local file the user names (`model.fid_weights`); nothing is downloaded. The file is read here
weights-only (torch-fidelity itself would unpickle it in full) and handed on re-serialized in memory; a strict load
into torch-fidelity's network checks its layout. A missing or foreign file is one line naming the file expected
and where it is published.

Images enter as (B, C, H, W) in [-1, 1], C = 1 or 3: rounded to 8 bit as a saved PNG would be (the published
protocol scores image files; torchmetrics' normalize=True would truncate instead of round) and gray repeated to
three channels.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import torch

from deeprecipe.core import UserError, require

FID_FILE = "pt_inception-2015-12-05-6726825d.pth"
FID_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{FID_FILE}"
CHUNK = 64  # images per Inception pass: a GAN's batch of 500 at 299 x 299 would need tens of GB of activations


def _wrong(field: str, path: str, why: str) -> UserError:
    return UserError(f"{field}={path}: {why}; it must be the FID Inception weights {FID_FILE} (from {FID_URL})")


def check_file(path: str, field: str = "model.fid_weights") -> None:
    """Fail at once (before training) when the weights file of the standard FID is not there."""
    if not Path(path).expanduser().is_file():
        raise _wrong(field, path, "file not found")


def fid_metric(path: str, field: str = "model.fid_weights"):
    """torchmetrics' FrechetInceptionDistance(feature=2048) with the FID Inception weights from `path`; it takes
    uint8 images (B, 3, H, W) and keeps the real statistics across reset()."""
    check_file(path, field)
    require("torch_fidelity", "fid", f"{field}: the standard FID")
    from torchmetrics.image.fid import FrechetInceptionDistance

    try:
        state = torch.load(Path(path).expanduser(), map_location="cpu", weights_only=True)
    except Exception as e:  # not a torch file, or one that needs more than tensors to load
        raise _wrong(field, path, f"not a weights file readable weights-only ({type(e).__name__})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise _wrong(field, path, "not a state dict of tensors")
    buf = io.BytesIO()
    torch.save(state, buf)  # tensors only, read weights-only above: safe for torch-fidelity's full unpickling
    buf.seek(0)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return FrechetInceptionDistance(
                feature=2048, reset_real_features=False, feature_extractor_weights_path=buf, antialias=False
            )
    except RuntimeError as e:  # the strict load_state_dict: missing or unexpected keys, other shapes
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        detail = lines[1] if len(lines) > 1 else lines[0] if lines else ""
        raise _wrong(field, path, f"not the FID Inception layout ({detail[:120]})") from None


def to_uint8_rgb(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) in [-1, 1], C = 1 or 3 -> (B, 3, H, W) uint8, rounded as a PNG writer would."""
    x = ((x.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


class StandardFID:
    """The standard FID of generated against real images, both (B, C, H, W) in [-1, 1] added batch by batch.
    The real statistics stay until a new StandardFID is made; reset() forgets the generated ones only."""

    def __init__(self, path: str, device="cpu", field: str = "model.fid_weights"):
        self.metric = fid_metric(path, field).to(device)
        self.device = torch.device(device)

    @torch.no_grad()
    def update(self, x: torch.Tensor, real: bool) -> None:
        with torch.autocast(self.device.type, enabled=False):  # the published network runs in fp32
            for part in x.split(CHUNK):
                self.metric.update(to_uint8_rgb(part.to(self.device)), real=real)

    def reset(self) -> None:
        self.metric.reset()

    def compute(self) -> dict[str, float]:
        """{"fid_standard": value}; {} with fewer than 2 real or 2 generated images (no covariance)."""
        if min(int(self.metric.real_features_num_samples), int(self.metric.fake_features_num_samples)) < 2:
            return {}
        return {"fid_standard": float(self.metric.compute())}
