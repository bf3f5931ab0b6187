"""GAN family: shapes, losses against their closed forms, a CLI run, exact resume, FID/IS properties, health."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from deeprecipe import config
from deeprecipe.cli import main
from deeprecipe.data.core import DataSpec
from deeprecipe.engine import checkpoint
from deeprecipe.models.gan import DCGANConfig, GANConfig
from deeprecipe.tasks import gan, gan_metrics

FAST = ["model.eval_samples=0", "train.log_every=1", "train.eval_every=0", "train.precision=fp32"]


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("DEEPRECIPE_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    yield
    torch.set_grad_enabled(True)  # `deeprecipe sample/eval` turn gradients off for the process


@pytest.mark.parametrize("size", [28, 32, 64])
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("conditional,sn", [(False, False), (True, True)])
def test_dcgan_shapes(size, channels, conditional, sn):
    spec = DataSpec(num_classes=10, in_channels=channels, image_size=(size, size))
    m = DCGANConfig(g_width=8, d_width=8, conditional=conditional, spectral_norm=sn).build(spec)
    z, y = m.noise(3)
    x = m(z, y)
    assert x.shape == (3, channels, size, size) and x.abs().max() <= 1
    out = m.discriminator(x, y)
    assert out.shape == (3,)
    out.sum().backward()  # gradients reach G through D
    assert all(p.grad is not None for p in m.generator.parameters())


@pytest.mark.parametrize("conditional", [False, True])
def test_mlp_gan_shapes(conditional):
    spec = DataSpec(num_classes=10, in_channels=1, image_size=(8, 8))
    m = GANConfig(hidden=(16, 32), conditional=conditional).build(spec)
    z, y = m.noise(4)
    assert m(z, y).shape == (4, 1, 8, 8) and m.discriminator(m(z, y), y).shape == (4,)


def test_losses_match_their_formulas():
    r, f = torch.randn(16), torch.randn(16)
    s = torch.sigmoid
    want_d = -(0.9 * s(r).log() + 0.1 * (1 - s(r)).log()).mean() - (1 - s(f)).log().mean()
    assert torch.allclose(gan.d_loss(r, f, "nonsat", 0.9), want_d, atol=1e-5)
    assert torch.allclose(gan.g_loss(f, "nonsat"), -s(f).log().mean(), atol=1e-5)
    assert torch.allclose(gan.d_loss(r, f, "hinge"), (1 - r).clamp_min(0).mean() + (1 + f).clamp_min(0).mean())
    assert torch.allclose(gan.g_loss(f, "hinge"), -f.mean())


def test_cli_train_eval_sample(tmp_path):
    run = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "digits-gan",
                "--out",
                str(run),
                "--set",
                "train.steps=6",
                "--set",
                "train.log_every=2",
                "--set",
                "train.eval_every=6",
                "--set",
                "model.eval_samples=200",
                "--set",
                "model.feature_steps=5",
                "--set",
                "model.hidden=[16,32]",
                "--set",
                "train.batch_size=16",
            ]
        )
        == 0
    )
    plots = run / "plots"
    for name in ("progress.png", "progress.gif", "interpolation.png", "class_histogram.png", "health.txt"):
        assert (plots / name).is_file(), name
    assert (run / "report.html").read_text().count("class_histogram") >= 1
    assert main(["sample", str(run), "--n", "5", "--out", str(tmp_path / "s"), "--device", "cpu"]) == 0
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == [
        "0000.png",
        "0001.png",
        "0002.png",
        "0003.png",
        "0004.png",
        "grid.png",
    ]


@pytest.mark.parametrize(
    "recipe,extra",
    [
        ("digits-gan", ["model.hidden=[16,32]"]),  # dropout in D: the global RNG state must be restored
        (
            "digits-gan",
            [
                "model.name=dcgan",
                "model.hidden=null",
                "model.image_size=28",
                "model.g_width=8",
                "model.d_width=8",
                "model.conditional=true",
            ],
        ),  # resized on the device, BatchNorm statistics, EMA
    ],
)
def test_resume_is_exact(tmp_path, recipe, extra):
    sets = [*FAST, *extra, "train.batch_size=16", "train.ckpt_every=2", "train.ema=0.9"]

    def load(steps):
        raw, name = config.read_recipe(recipe)
        raw = config.apply_overrides(raw, [*sets, f"train.steps={steps}"])
        raw["model"] = {k: v for k, v in raw["model"].items() if v is not None}
        return config.resolve(raw, name)

    gan.train(load(4), tmp_path / "a")
    gan.train(load(2), tmp_path / "b")
    gan.train(load(4), tmp_path / "b", resume=True)
    wa, _ = checkpoint.load(checkpoint.latest(tmp_path / "a" / "checkpoints"))
    wb, _ = checkpoint.load(checkpoint.latest(tmp_path / "b" / "checkpoints"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def test_nan_is_reported(tmp_path, monkeypatch):
    from deeprecipe.engine.loop import NonFiniteLoss

    monkeypatch.setattr(gan, "g_loss", lambda fake, kind: fake.float().mean() * float("nan"))
    with pytest.raises(NonFiniteLoss, match="NaN"):
        gan.train(config.load("digits-gan", [*FAST, "train.steps=3", "model.hidden=[16]"]), tmp_path / "r")
    assert "NaN" in (tmp_path / "r" / "plots" / "health.txt").read_text()


# ------------------------------------------------------------------------------------------ FID / IS


@pytest.fixture(scope="module")
def digits():
    """Real digits in [-1, 1] and a tiny, fixed random conv net as the feature extractor (fast)."""
    from deeprecipe.models.cnn import CNNConfig

    data = config.load("digits-gan").data.build()
    torch.manual_seed(0)
    clf = CNNConfig(channels=(8, 16), dense=(16,), dropout=0.0).build(data.spec).eval()
    feats = gan_metrics.DomainFeatures(clf, data.spec.mean, data.spec.std, data.spec.image_size)
    x = torch.cat([data.train.tensors[0], data.test.tensors[0]]).float() / 127.5 - 1
    return x, feats


def _score(feats, real, fake):
    ev = gan_metrics.Evaluator(feats)
    ev.add_real(real.split(400))
    return ev.score(fake.split(400))


def test_fid_of_data_against_itself_is_zero(digits):
    x, feats = digits
    out = _score(feats, x, x)
    assert abs(out["fid"]) < 1e-3 and out["spread_ratio"] == pytest.approx(1.0)
    half = _score(feats, x[::2], x[1::2])  # two halves of the same data: small, but not the value of noise
    assert half["fid"] < 0.2 * _score(feats, x[::2], x[1::2] + 0.5 * torch.randn_like(x[1::2]))["fid"]


@pytest.mark.parametrize("kind", ["noise", "blur"])
def test_fid_rises_with_corruption(digits, kind):
    x, feats = digits
    g = torch.Generator().manual_seed(0)
    eps = torch.randn(x.shape, generator=g)

    def corrupt(level):
        if kind == "noise":
            return (x + level * eps).clamp(-1, 1)
        if level == 0:
            return x
        k = torch.exp(-(torch.arange(-2, 3.0) ** 2) / (2 * level**2))
        k = (k[:, None] * k[None]) / k.sum() ** 2
        return F.conv2d(F.pad(x, (2, 2, 2, 2), mode="replicate"), k[None, None])

    levels = [0.0, 0.2, 0.4, 0.8] if kind == "noise" else [0.0, 0.5, 1.0, 2.0]
    fids = [_score(feats, x, corrupt(v))["fid"] for v in levels]
    assert all(a < b for a, b in zip(fids, fids[1:])), fids


def test_inception_score_of_uniform_and_constant_predictions():
    ev = gan_metrics._metrics(torch.nn.Identity(), True)
    ev.update(torch.eye(10).repeat(5000, 1) * 100)  # confident and balanced: IS = number of classes
    assert ev.compute()[0] == pytest.approx(10, rel=0.01)  # (torchmetrics shuffles into 10 splits)
    ev = gan_metrics._metrics(torch.nn.Identity(), True)
    ev.update(torch.zeros(500, 10))  # uninformative: IS = 1
    assert ev.compute()[0] == pytest.approx(1, rel=1e-4)


# ------------------------------------------------------------------------------------------ health


def test_collapse_detected_for_a_constant_generator(digits):
    x, feats = digits
    constant = x[:1].expand(len(x), -1, -1, -1)  # G that outputs one image whatever z is
    found = gan_metrics.collapse(_score(feats, x, constant), [str(i) for i in range(10)])
    assert any("diverse" in f for f in found) and any("classified" in f for f in found)
    real = {k: v for k, v in _score(feats, x, x).items() if k != "class_hist"}  # a random net's classes mean nothing
    assert gan_metrics.collapse(real, [str(i) for i in range(10)]) == []


def test_class_dominance_and_dropping():
    names = [str(i) for i in range(10)]
    dominated = [5, 5, 5, 60, 5, 5, 5, 5, 5, 0]
    assert any("'3'" in f for f in gan_metrics.collapse({"class_hist": dominated}, names))
    dropping = [12, 12, 12, 12, 12, 12, 12, 12, 4, 0]
    assert any("mode dropping" in f and "9" in f for f in gan_metrics.collapse({"class_hist": dropping}, names))
    assert gan_metrics.collapse({"class_hist": [10] * 10}, names) == []


def test_discriminator_watch():
    w = gan_metrics.DiscriminatorWatch(low=0.05, patience=5)
    assert [w.update(v, i) for i, v in enumerate([0.01, 0.02, 1.0, 0.01, 0.01, 0.01, 0.01])] == [None] * 7
    assert "wins outright" in (w.update(0.01, 8) or "")
    assert w.update(0.01, 9) is None  # said once


def test_slerp_ends_and_norm():
    from deeprecipe.tasks.gan_plots import slerp

    a, b = torch.randn(50), torch.randn(50)
    path = slerp(a, b, torch.linspace(0, 1, 5))
    assert torch.allclose(path[0], a, atol=1e-5) and torch.allclose(path[-1], b, atol=1e-5)
    assert not math.isnan(float(path.norm()))


def test_recipes_resolve():
    for name in ("digits-gan", "fashion-mnist-dcgan", "fashion-mnist-cdcgan", "imagefolder-dcgan"):
        cfg = config.load(name)
        assert cfg.task == "gan" and cfg.model.name in ("gan", "dcgan")
    assert Path(config.RECIPES_DIR / "fashion-mnist-cdcgan.yaml").is_file()
