"""After deployment: robustness under shift and attack (engine/robust.py), embeddings (engine/embed.py) and drift
monitoring (engine/drift.py), on a briefly trained digits CNN and on oracle models whose answers are known."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

from conftest import TINY, sets
from deeprecipe.cli import main, open_run
from deeprecipe.core import DataSpec, UserError
from deeprecipe.data.core import Data, TensorSplit
from deeprecipe.data.image_ops import png
from deeprecipe.engine import drift, robust
from deeprecipe.engine.device import setup
from deeprecipe.families import get_family
from deeprecipe.recipe import load

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A digits CNN trained for 200 steps (a few seconds; test accuracy about 0.93)."""
    out = tmp_path_factory.mktemp("runs") / "digits"
    over = [*TINY, "train.steps=200", "train.batch_size=32", "model.channels=[8,16]", "model.dense=[32]"]
    assert main(["train", "digits-cnn", "--out", str(out), *sets(*over)]) == 0
    cfg, spec, model, rt, family = open_run(str(out), "cpu")
    return out, cfg, model, rt, family, cfg.data.build()


def smooth_images(n: int = 6, c: int = 3, size: int = 16) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    low = torch.rand(n, c, 4, 4, generator=g)
    return (torch.nn.functional.interpolate(low, size=size, mode="bilinear") * 200 + 20).round().to(torch.uint8)


@pytest.mark.parametrize("name", list(robust.SHIFTS))
def test_severity_zero_is_the_image_and_the_change_grows_with_severity(name):
    x = smooth_images()
    assert torch.equal(robust.shift_images(x, name, 0), x)
    dist = []
    for s in robust.SEVERITIES:
        y = robust.shift_images(x, name, s)
        assert y.dtype == torch.uint8 and y.shape == x.shape
        dist.append(float((y.float() - x.float()).abs().mean()))
    assert dist[0] > 0 and dist[-1] > dist[0]


class DarkDetector(nn.Module):
    """Class 1 (dark) when the image's mean (in [0, 1]; spec mean 0, std 1) is below 0.5, else class 0."""

    def forward(self, x):
        m = x.flatten(1).mean(1, keepdim=True) - 0.5
        return torch.cat([m, -m], 1) * 100


def test_brightness_never_raises_the_accuracy_of_a_dark_detector_on_dark_images():
    """Oracle: adjust_brightness scales every pixel by 1 + 0.3 s (rounded and clipped, both monotone), so no image's
    mean falls as s grows: a dark image the detector got wrong stays wrong, and the accuracy cannot rise."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(10, 120, (200, 1, 8, 8), generator=g, dtype=torch.uint8)
    y = torch.ones(200, dtype=torch.long)
    spec = DataSpec(in_channels=1, image_size=(8, 8), num_classes=2, class_names=["light", "dark"])
    spec.mean, spec.std = [0.0], [1.0]
    data = Data(spec, TensorSplit(x, y), None, TensorSplit(x, y))
    cfg = load("digits-cnn", TINY)
    rt = setup("cpu", "fp32")
    r = robust.robustness(get_family("classify"), DarkDetector(), data, cfg, rt, "test", ["brightness"])
    acc = [r["shift"]["brightness"][s] for s in (0, *robust.SEVERITIES)]
    assert acc[0] == r["clean"] == 1.0
    assert all(b <= a for a, b in zip(acc, acc[1:])), acc
    assert acc[-1] < 0.5  # the oracle is not vacuous: over-exposure does turn dark images light


def test_scenes_fog_and_night_are_the_renderers_looks_blended_by_severity():
    from deeprecipe.data.scenes import SPLIT_BASE, ScenesData, render_scenes

    cfg = ScenesData(size=(32, 32), train_size=2, val_size=0, test_size=3)
    data = cfg.build()
    look = robust.scene_look(cfg, "test")
    idx = torch.arange(3)
    clean = data.test.take(idx)[0]
    for name in ("fog", "night"):
        assert torch.equal(robust._shifted(data.test, name, 0, look).take(idx)[0], clean)
        want = render_scenes(SPLIT_BASE["test"] + idx, (32, 32), name)[0]
        assert torch.equal(robust._shifted(data.test, name, 5, look).take(idx)[0], want)
    assert robust.scene_look(load("digits-cnn").data, "test") is None


def test_attacks_stay_in_the_ball_and_the_pixel_range_and_raise_the_loss(trained):
    _, cfg, model, rt, family, data = trained
    batch = data.test.take(torch.arange(64))
    clean = family.per_example_loss(model, family.prepare(batch, data.spec, None), cfg).sum()
    for method in robust.ATTACKS:
        adv = robust.attack_images(family, model, batch, data.spec, cfg, method, 8.0)
        assert (adv - batch[0].float()).abs().max() <= 8.0 + 1e-4
        assert adv.min() >= 0 and adv.max() <= 255
        with torch.no_grad():
            loss = family.per_example_loss(model, family.prepare((adv, batch[1]), data.spec, None), cfg).sum()
        assert loss > clean
    assert torch.equal(robust.attack_images(family, model, batch, data.spec, cfg, "fgsm", 0.0), batch[0].float())


def test_eval_shift_and_attack_table_json_plot_and_report(trained, cli):
    run, *_ = trained
    code, out, err = cli("eval", run, "--device", "cpu", "--shift", "blur,noise", "--severity", "1,5")
    assert code == 0, err
    assert "blur" in out and "noise" in out
    code, out, err = cli("eval", run, "--device", "cpu", "--attack", "fgsm", "--eps", "0,32/255")
    assert code == 0, err
    r = json.loads((run / "robustness.json").read_text())
    for name in ("blur", "noise"):
        assert r["shift"][name]["0"] == r["clean"]  # severity 0 through the same path is the clean metric exactly
    assert set(r["shift"]) == {"blur", "noise"}  # the attack's run kept the shifts beside it
    assert r["attack"]["fgsm"]["0.0"] == r["clean"]  # FGSM with eps 0 is the clean model
    assert r["attack"]["fgsm"]["32.0"] < r["clean"] - 0.3  # a large eps breaks a small digits CNN
    assert (run / "plots" / "robustness.png").stat().st_size > 0
    assert "<h2>Robustness</h2>" in (run / "report.html").read_text()


@pytest.mark.parametrize(
    "flags, says",
    [
        (["--shift", "fgo"], "did you mean 'fog'"),
        (["--shift", "blur", "--severity", "0,6"], "severities are 1..5"),
        (["--attack", "fgsm", "--eps", "300"], "out of range"),
        (["--attack", "pgd", "--eps=-1/255"], "out of range"),
        (["--attack", "fgsm", "--eps", "0.03"], "looks like a fraction"),
        (["--attack", "fgsm", "--eps", "eight"], "not a number"),
        (["--attack", "fgsm"], "needs --eps"),
        (["--eps", "8"], "name the attack"),
    ],
)
def test_bad_robustness_flags_are_one_line(trained, cli, flags, says):
    code, out, err = cli("eval", trained[0], "--device", "cpu", *flags)
    assert code == 2 and says in err and len(err.strip().splitlines()) == 1, err


def test_embed_features_separate_the_classes(trained, cli):
    run = trained[0]
    code, out, err = cli("embed", run, "--device", "cpu", "--points", "200")
    assert code == 0, err
    r = json.loads((run / "embedding.json").read_text())
    assert r["knn_acc"] > 0.8 and r["chance"] < 0.2  # 10 classes: chance about 0.1
    assert (run / "plots" / "embedding.png").stat().st_size > 0
    assert "<h2>Embedding</h2>" in (run / "report.html").read_text()


def test_mmd_is_small_for_one_distribution_and_large_for_two():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(200, 8, generator=g), torch.randn(60, 8, generator=g)
    same, p_same = drift.mmd_test(a, b)
    moved, p_moved = drift.mmd_test(a, b + 1.0)
    assert p_same > 0.05 and p_moved < 0.01 and moved > 5 * same
    assert drift.mmd_test(a, a.clone())[0] == pytest.approx(0, abs=1e-9)


def test_windows_cover_every_image_once():
    for n, size in [(10, 64), (64, 64), (100, 64), (150, 64), (129, 64)]:
        ws = drift.windows(n, size)
        assert [i for w in ws for i in w] == list(range(n))
        assert all(len(w) >= min(n, size / 2) for w in ws)


def test_monitor_flags_fog_but_not_fresh_images_of_the_same_distribution(trained):
    """The reference is the val split's; the test split's images are new draws from the same distribution."""
    run, cfg, model, rt, family, data = trained
    assert (run / drift.FILE).is_file()
    images = list(data.test.take(torch.arange(len(data.test)))[0])
    n = len(images)
    (same,) = drift.monitor(family, model, data.spec, cfg, rt, run, images, window=n)
    (fogged,) = drift.monitor(family, model, data.spec, cfg, rt, run, list(robust.fog(torch.stack(images), 5)), n)
    assert not same["drift"] and same["p_features"] > 0.01
    assert fogged["drift"] and fogged["p_features"] < 0.01 and fogged["mmd2"] > 5 * same["mmd2"]


def test_monitor_verb_scores_a_folder_and_refuses_an_empty_one(trained, cli, tmp_path, capsys):
    run, cfg, model, rt, family, data = trained
    (tmp_path / "empty").mkdir()
    code, out, err = cli("monitor", run, tmp_path / "empty", "--device", "cpu")
    assert code == 2 and "no images" in err and len(err.strip().splitlines()) == 1
    new = tmp_path / "new"
    new.mkdir()
    for i, img in enumerate(robust.blur(data.test.take(torch.arange(40))[0], 5)):  # fog would be undone by as_ink
        (new / f"{i:03d}.png").write_bytes(png(img))
    with pytest.raises(SystemExit) as e:  # exit 3: drift
        main(["monitor", str(run), str(new), "--device", "cpu", "--window", "20", "--json"])
    out, err = capsys.readouterr()
    assert e.value.code == 3 and "warning: drift in 2 of 2 windows" in err
    assert [w["n"] for w in json.loads(out)] == [20, 20]
    saved = json.loads((run / "drift.json").read_text())
    assert saved["source"] == str(new) and [w["drift"] for w in saved["windows"]] == [True, True]
    assert (run / "plots" / "drift.png").stat().st_size > 0
    assert "<h2>Drift</h2>" in (run / "report.html").read_text()


def test_a_run_without_reference_is_one_line(cli, tmp_path):
    with pytest.raises(UserError, match="no drift_reference"):
        drift.load_reference(tmp_path)


def test_server_keeps_a_drift_window_per_endpoint_on_metrics_and_info(trained):
    """Blurred digits sent to /classify drift; the first 31 images are too few to test (no score yet)."""
    from fastapi.testclient import TestClient

    from deeprecipe.serve import drift as serve_drift
    from deeprecipe.serve.server import build_app

    run, cfg, model, rt, family, data = trained
    app = build_app(str(run), cfg, data.spec, model, rt, family)
    images = robust.blur(data.test.take(torch.arange(48))[0], 5)
    with TestClient(app) as c:
        for i, img in enumerate(images):
            assert c.post("/classify", files={"image": ("d.png", png(img), "image/png")}).status_code == 200
            if i == 30:
                early = c.get("/info").json()["drift"]["classify"]
                assert early["mmd2"] is None and early["images"] == 31
        # explain runs the model many times outside the batcher: none of it enters the window
        assert c.post("/explain?method=occlusion", files={"image": ("d.png", png(images[0]), "image/png")}).is_success
        text = c.get("/metrics").text
        live = c.get("/info").json()["drift"]
    assert live["reference"] == serve_drift.drift.FILE
    assert live["classify"]["drift"] and live["classify"]["images"] == live["classify"]["seen"] == 48
    assert 'deeprecipe_drift_drift{endpoint="classify"} 1.0' in text
    assert 'deeprecipe_drift_images{endpoint="classify"} 48.0' in text


@pytest.mark.parametrize("recipe", ["scenes-unet", "scenes-detect"])
def test_segmenters_and_detectors_take_shifts_and_attacks(recipe):
    """The same path for every image family (untrained nets: only the identities are known): severity 0 and eps 0
    give the clean metric exactly, and the attack moves the images (the loss rises)."""
    sizes = ["data.size=[48,48]", "data.train_size=4", "data.val_size=0", "data.test_size=4"]
    cfg = load(recipe, [*TINY, *sizes])
    family, data = get_family(cfg.task), cfg.data.build()
    model = family.build_model(cfg, data.spec).eval()
    rt = setup("cpu", "fp32")
    r = robust.robustness(family, model, data, cfg, rt, "test", ["fog"], (5,), ["fgsm"], [0.0, 8.0])
    assert r["shift"]["fog"][0] == r["attack"]["fgsm"][0.0] == r["clean"]
    batch = data.test.take(torch.arange(4))
    adv = robust.attack_images(family, model, batch, data.spec, cfg, "fgsm", 8.0)
    with torch.no_grad():
        before = family.per_example_loss(model, family.prepare(batch, data.spec, None), cfg).sum()
        after = family.per_example_loss(model, family.prepare((adv, *batch[1:]), data.spec, None), cfg).sum()
    assert after > before
