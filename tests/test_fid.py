"""The standard FID (common/fid.py): the FID Inception read by path with the network unreachable, equal to
torchmetrics' own FID on the same file; a foreign file is one line naming the file expected; the GAN and
image-to-image families report `fid_standard` when model.fid_weights is set. The weights here are random ones in
the published layout (no real weights offline); Inception runs at 299 x 299, so each set holds 2 images."""

from __future__ import annotations

import io
import socket

import pytest
import torch
import torch.nn as nn

from deeprecipe.common.fid import FID_FILE, StandardFID
from deeprecipe.core import UserError

pytest.importorskip("torch_fidelity")  # the fid extra (in dev)


@pytest.fixture(scope="module")
def fid_file(tmp_path_factory):
    """torch-fidelity's FID Inception with random weights (He-initialised convolutions, so that 2048 features
    neither vanish nor explode), saved as a plain state dict under the published file's name."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class Blank(FeatureExtractorInceptionV3):
        def load_state_dict(self, *args, **kwargs):  # keep the random init: its constructor insists on a file
            return None

    empty = io.BytesIO()
    torch.save({}, empty)
    empty.seek(0)
    torch.manual_seed(0)
    net = Blank("fid", ["2048"], feature_extractor_weights_path=empty)
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    path = tmp_path_factory.mktemp("fid") / FID_FILE
    torch.save(net.state_dict(), path)
    return path


@pytest.fixture
def offline(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network unreachable (test)")

    monkeypatch.setattr(socket.socket, "connect", refuse)


def images(seed: int, n: int = 2, channels: int = 1, high: int = 256) -> torch.Tensor:
    return torch.randint(0, high, (n, channels, 16, 16), generator=torch.Generator().manual_seed(seed)).to(torch.uint8)


def test_standard_fid_reads_the_file_offline_and_equals_torchmetrics_on_it(fid_file, offline):
    """Gray images in [-1, 1] against themselves: ~0; against other images: > 0 and equal to torchmetrics'
    FrechetInceptionDistance(feature=2048) on the same weights file fed the 8-bit RGB originals (the oracle, with
    torch-fidelity's TensorFlow-style resizing, antialias=False)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    a, b = images(0), images(1, high=128)
    ours = StandardFID(str(fid_file))
    ours.update(a.float() / 127.5 - 1, real=True)
    ours.update(a.float() / 127.5 - 1, real=False)
    same = ours.compute()["fid_standard"]
    ours.reset()  # the generated statistics only: the real ones stay
    ours.update(b.float() / 127.5 - 1, real=False)
    other = ours.compute()["fid_standard"]

    oracle = FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=str(fid_file), antialias=False)
    oracle.update(a.expand(-1, 3, -1, -1), real=True)
    oracle.update(b.expand(-1, 3, -1, -1), real=False)
    want = float(oracle.compute())
    assert other > 0 and abs(same) < 1e-4 * other, (same, other)
    assert other == pytest.approx(want, rel=1e-5)
    ours.reset()
    assert ours.compute() == {}  # fewer than 2 generated images: no covariance, no figure


def test_a_foreign_weights_file_is_one_line_naming_the_fid_inception_file(fid_file, tmp_path, offline):
    """Missing, torchvision's ImageNet layout (1000 classes, aux head), not a weights file, and a pickle that would
    run code (read weights-only, so it never does): each a one-line UserError naming the file expected."""
    state = torch.load(fid_file, weights_only=True)
    state["fc.weight"], state["fc.bias"] = torch.zeros(1000, 2048), torch.zeros(1000)
    state["AuxLogits.fc.weight"] = torch.zeros(1000, 768)
    torch.save(state, tmp_path / "inception_v3_google.pth")
    (tmp_path / "notes.pth").write_text("not weights")
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save(Payload(), tmp_path / "payload.pth")
    cases = {
        "missing.pth": "file not found",
        "inception_v3_google.pth": "not the FID Inception layout",
        "notes.pth": "not a weights file",
        "payload.pth": "not a weights file",
    }
    for name, why in cases.items():
        with pytest.raises(UserError) as e:
            StandardFID(str(tmp_path / name))
        msg = str(e.value)
        assert "\n" not in msg and why in msg and FID_FILE in msg and "https://" in msg, msg
    assert not marker.exists()


def test_gan_run_with_fid_weights_reports_fid_standard(fid_file, tmp_path, offline):
    """A tiny GAN run without a domain feature net: its final results hold the standard FID, nothing else named
    FID; a missing weights file stops the run before training."""
    from deeprecipe.api import train

    sets = {"model.hidden": [16, 32], "train.steps": 2, "train.batch_size": 8, "train.eval_every": 0}
    sets |= {"model.eval_samples": 2, "train.limit_eval": 2, "model.feature_recipe": "none"}
    run = train("digits-gan", sets | {"model.fid_weights": str(fid_file)}, out=tmp_path / "run", device="cpu")
    fids = {k for k in run.final if "fid" in k}
    assert fids == {"train_fid_standard"} and run.final["train_fid_standard"] > 0, run.final
    with pytest.raises(UserError, match=FID_FILE):
        train("digits-gan", sets | {"model.fid_weights": str(tmp_path / "nope.pth")}, out=tmp_path / "r2", device="cpu")
    assert not (tmp_path / "r2" / "checkpoints").exists()


def test_img2img_final_evaluation_reports_fid_standard(fid_file, tmp_path, offline):
    """Super-resolution (a mode without a domain FID) gets the standard FID of its outputs at the final
    evaluation only."""
    from test_img2img import family, trained

    ctx, model = trained("scenes-sr4", tmp_path, [f"model.fid_weights={fid_file}", "train.limit_eval=2"])
    f = family()
    assert "fid_standard" not in f.evaluate(model, ctx.data, "val", ctx.cfg, ctx.rt, False)
    m = f.evaluate(model, ctx.data, "val", ctx.cfg, ctx.rt, True)
    assert m["fid_standard"] > 0 and "fid" not in m, m
