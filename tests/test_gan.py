"""GAN family: shapes, losses against their closed forms, a CLI run, exact resume, FID/IS properties, health."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import PYTHON, sets
from deeprecipe import config
from deeprecipe.cli import main
from deeprecipe.data.core import DataSpec
from deeprecipe.engine import checkpoint, loop
from deeprecipe.engine.run import read_metrics, read_status
from deeprecipe.families import gan
from deeprecipe.families.gan import GAN
from deeprecipe.families.gan import metrics as gan_metrics
from deeprecipe.models.gan import DCGANConfig, GANConfig
from deeprecipe.recipe import load, resolve

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
    for name, fmt in [("g.png", "PNG"), ("sub/g.jpg", "JPEG")]:  # an image path is the grid's file, not a folder
        assert main(["sample", str(run), "--n", "4", "--out", str(tmp_path / name), "--device", "cpu"]) == 0
        with Image.open(tmp_path / name) as im:
            assert im.format == fmt and im.size == (70, 70)  # 2 x 2 images of 32 x 32, 2-pixel padding


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

    def cfg_at(steps):
        raw, name = config.read_recipe(recipe)
        raw = config.apply_overrides(raw, [*sets, f"train.steps={steps}"])
        raw["model"] = {k: v for k, v in raw["model"].items() if v is not None}
        return resolve(raw, name)

    loop.train(cfg_at(4), GAN(), tmp_path / "a")
    loop.train(cfg_at(2), GAN(), tmp_path / "b")
    loop.train(cfg_at(4), GAN(), tmp_path / "b", resume=True)
    wa, _ = checkpoint.load(checkpoint.latest(tmp_path / "a" / "checkpoints"))
    wb, _ = checkpoint.load(checkpoint.latest(tmp_path / "b" / "checkpoints"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def test_nan_is_reported(tmp_path, monkeypatch):
    monkeypatch.setattr(gan, "g_loss", lambda fake, kind: fake.float().mean() * float("nan"))
    with pytest.raises(loop.NonFiniteLoss, match="NaN"):
        loop.train(load("digits-gan", [*FAST, "train.steps=3", "model.hidden=[16]"]), GAN(), tmp_path / "r")
    assert "NaN" in (tmp_path / "r" / "plots" / "health.txt").read_text()


# ------------------------------------------------------------------------------------------ the one loop

# the GAN trains through engine/loop.py like every family: accumulation, non-finite handling, early stopping and
# exact resume come from there; these prove them for two parts (D's turn, then G's) on runs of a second each
CPU = [*FAST, "train.device=cpu", "train.workers=0"]


def gan_run(out: Path, *overrides: str, family: GAN | None = None) -> dict:
    return loop.train(load("digits-gan", [*CPU, *overrides]), family or GAN(), out)


def weights_at(run: Path, step: int | None = None) -> dict[str, torch.Tensor]:
    ckpt = run / "checkpoints"
    folder = checkpoint.latest(ckpt) if step is None else ckpt / f"step-{step:07d}"
    return checkpoint.load(folder)[0]


def test_accumulation_equals_the_big_batch(tmp_path):
    """accum=2 micro-batches of 4 give the weights (G, D and the EMA) and logged losses of one batch of 8, both
    turns seeing the same noise per example. No hidden layer: the MLP generator's BatchNorm (batch statistics) and
    the discriminator's dropout would legitimately differ per micro-batch; the conditional nets add the labels."""
    common = ["model.hidden=[]", "model.conditional=true", "train.batch_size=8", "train.steps=3"]
    common += ["train.ckpt_every=1", "train.ema=0.9"]
    gan_run(tmp_path / "big", *common, "train.accum=1")
    gan_run(tmp_path / "acc", *common, "train.accum=2")
    for step in (2, 3):
        big, acc = weights_at(tmp_path / "big", step), weights_at(tmp_path / "acc", step)
        assert big.keys() == acc.keys() and any(k.startswith("ema.generator") for k in big)
        for k in big:
            assert torch.allclose(big[k], acc[k], rtol=1e-5, atol=1e-6), f"step {step}: {k} differs"
    at2 = weights_at(tmp_path / "big", 2)  # and the weights did move (big holds step 3)
    assert not any(
        torch.equal(at2[f"model.{k}"], big[f"model.{k}"])
        for k in ("generator.net.0.weight", "discriminator.head.weight")
    )
    keys = ("d_loss", "g_loss", "d_real", "d_fake")
    logs = [[{k: r[k] for k in keys} for r in read_metrics(tmp_path / run) if "d_loss" in r] for run in ("big", "acc")]
    assert len(logs[0]) == len(logs[1]) == 3
    for a, b in zip(*logs):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-6)


class NaNAt(GAN):
    """The generator's loss is NaN at step `at` (one micro-batch a step: its `at`-th call)."""

    def __init__(self, at: int):
        super().__init__()
        self.at, self.calls = at, 0

    def step(self, model, batches, cfg, update):
        backward = update.backward

        def poisoned(part, loss, logs=None):
            if part == "g":
                self.calls += 1
                if self.calls == self.at:
                    loss = loss * float("nan")
            backward(part, loss, logs)

        update.backward = poisoned
        super().step(model, batches, cfg, update)


def test_nonfinite_stops_or_skips(tmp_path):
    """stop: the run fails at the NaN step with the last good checkpoint kept. skip: only G's update of that step
    is dropped (D's turn came first and was finite), and training goes on to the end with finite weights."""
    common = ["model.hidden=[16,32]", "train.batch_size=16", "train.steps=4", "train.ckpt_every=1"]
    stop, skip = tmp_path / "stop", tmp_path / "skip"
    with pytest.raises(loop.NonFiniteLoss, match="NaN.* at step 3"):
        gan_run(stop, *common, family=NaNAt(3))
    assert read_status(stop)["status"] == "failed" and read_status(stop)["step"] == 3
    assert (stop / "checkpoints" / "latest").read_text() == "step-0000002"
    assert "NaN" in (stop / "plots" / "health.txt").read_text()
    good = weights_at(stop)
    assert all(torch.isfinite(w).all() for w in good.values())

    gan_run(skip, *common, "train.nonfinite=skip", family=NaNAt(3))
    assert read_status(skip)["status"] == "done" and read_status(skip)["step"] == 4
    rows = read_metrics(skip)
    assert [r["step"] for r in rows if r.get("skipped_batch")] == [3]
    assert [r["step"] for r in rows if "g_loss" in r] == [1, 2, 4]  # training went on after the skipped step
    assert all(math.isfinite(r[k]) for r in rows for k in ("d_loss", "g_loss", "d_real", "d_fake") if k in r)
    at3, at4 = weights_at(skip, 3), weights_at(skip, 4)
    assert all(torch.isfinite(w).all() for w in at4.values())
    # the same run as `stop` up to step 2; at step 3 G's parameters stay (the NaN update dropped), D's move on
    for k, w in good.items():
        if k.startswith("model.generator.") and not any(b in k for b in ("running_", "num_batches")):
            assert torch.equal(w, at3[k]), f"{k}: G was updated by a NaN step"
            assert not torch.equal(at3[k], at4[k]), f"{k}: G stopped training after the skipped step"
        elif k.startswith("model.discriminator."):
            assert not torch.equal(w, at3[k]), f"{k}: D's finite turn was dropped too"


class FlatFID(GAN):
    """An FID that never improves (the real one needs a feature net; the loop only reads the number)."""

    def evaluate(self, model, data, split, cfg, rt, final):
        return {"fid": 1.0}


def test_early_stop_when_fid_does_not_improve(tmp_path):
    run = tmp_path / "run"
    gan_run(
        run,
        "model.hidden=[16,32]",
        "train.batch_size=16",
        "train.steps=20",
        "train.eval_every=1",
        "train.early_stop=1",
        "train.ckpt_every=10",
        family=FlatFID(),
    )
    # evaluation 1 sets the best FID; evaluation 2 does not beat it -> stop at step 2 (of 20)
    status = read_status(run)
    assert status["status"] == "done" and status["step"] == 2 and status["best"] == {"fid": 1.0}
    assert (run / "checkpoints" / "latest").read_text() == "step-0000002"  # the stop is checkpointed
    _, state = checkpoint.load(checkpoint.latest(run / "checkpoints"))
    assert state["step"] == 2 and state["best"] == 1.0 and state["bad_evals"] == 1
    assert max(r["step"] for r in read_metrics(run)) == 2
    assert [r["step"] for r in read_metrics(run) if "val_fid" in r] == [1, 2]
    assert (run / "checkpoints" / "best.safetensors").is_file()
    grids = sorted(p.name for p in (run / "plots" / "grids").iterdir())  # the snapshot hook at each evaluation
    assert grids == ["step-0000001.png", "step-0000002.png"]
    assert (run / "plots" / "health.txt").is_file()  # and the family's finish ran


KILL = [*CPU, "model.hidden=[64,128]", "train.batch_size=64", "train.steps=120", "train.ckpt_every=15"]
KILL += ["train.ema=0.9"]


def test_sigkill_then_resume_is_bitwise_identical(tmp_path, subenv):
    """Kill a real GAN run with SIGKILL after its first checkpoint (somewhere between two), resume it: the
    weights of both nets, the EMA and every logged loss equal those of a run never stopped."""
    run = tmp_path / "killed"

    def start(*args):
        cmd = [PYTHON, "-m", "deeprecipe.cli", "train", *args]
        return subprocess.Popen(cmd, env=subenv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    proc = start("digits-gan", "--out", str(run), *sets(*KILL))
    while checkpoint.latest(run / "checkpoints") is None:
        assert proc.poll() is None, f"the run ended before its first checkpoint: {proc.stderr.read()[-2000:]}"
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it was killed"
    proc.stderr.close()
    proc = start("--resume", str(run))
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]

    ref = tmp_path / "ref"
    loop.train(load("digits-gan", KILL), GAN(), ref)
    a, b = weights_at(ref), weights_at(run)
    assert a.keys() == b.keys() and any(k.startswith("ema.") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    keys = ("d_loss", "g_loss", "d_real", "d_fake")
    logged = [{r["step"]: [r[k] for k in keys] for r in read_metrics(d) if "d_loss" in r} for d in (ref, run)]
    assert logged[0] == logged[1] and sorted(logged[1]) == list(range(1, 121))  # each step logged once
    assert read_status(run)["status"] == "done"


# ------------------------------------------------------------------------------------------ FID / IS


@pytest.fixture(scope="module")
def digits():
    """Real digits in [-1, 1] and a tiny, fixed random conv net as the feature extractor (fast)."""
    from deeprecipe.models.cnn import CNNConfig

    data = load("digits-gan").data.build()
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
    from deeprecipe.families.gan.plots import slerp

    a, b = torch.randn(50), torch.randn(50)
    path = slerp(a, b, torch.linspace(0, 1, 5))
    assert torch.allclose(path[0], a, atol=1e-5) and torch.allclose(path[-1], b, atol=1e-5)
    assert not math.isnan(float(path.norm()))


def test_recipes_resolve():
    for name in ("digits-gan", "fashion-mnist-dcgan", "fashion-mnist-cdcgan", "imagefolder-dcgan"):
        cfg = load(name)
        assert cfg.task == "gan" and cfg.model.name in ("gan", "dcgan")
    assert Path(config.RECIPES_DIR / "fashion-mnist-cdcgan.yaml").is_file()
