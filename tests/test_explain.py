"""`deeprecipe explain` (engine/explain.py, Classify.explain) on a briefly trained digits CNN: Integrated Gradients
are complete (their sum is f(x) - f(baseline)), Grad-CAM is a non-negative map of the input's size, occluding a
blank region changes nothing, the overlays land where asked, the saliency sanity check passes Grad-CAM on the
trained model and flags explainers that ignore the weights, and bad input is a one-line error."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY, sets
from deeprecipe.cli import main, open_run
from deeprecipe.core import UserError
from deeprecipe.engine import explain as ex
from deeprecipe.families.classify import prepare
from deeprecipe.family import ExplainOptions, Family


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "digits"
    over = [*TINY, "train.steps=40", "train.batch_size=32", "model.channels=[8,16]", "model.dense=[32]"]
    assert main(["train", "digits-cnn", "--out", str(out), *sets(*over)]) == 0
    return out


@pytest.fixture(scope="module")
def loaded(run_dir):
    cfg, spec, model, rt, family = open_run(str(run_dir), "cpu")
    return cfg, spec, model, rt, family


def digit(i: int = 0, blank_right: int = 0) -> torch.Tensor:
    """A digits image (1, 8, 8) uint8 as the data set makes it; its `blank_right` last columns black."""
    from sklearn.datasets import load_digits

    img = torch.from_numpy((load_digits().images[i] * 16).clip(0, 255).astype(np.uint8))[None]
    if blank_right:
        img[..., -blank_right:] = 0
    return img


def write_png(path, img: torch.Tensor):
    Image.fromarray(img[0].numpy()).save(path)
    return str(path)


def inputs(spec, img: torch.Tensor):
    x = prepare((img[None], None), spec)[0].float().contiguous()
    base = prepare((torch.zeros_like(img)[None], None), spec)[0].float()
    return x, base


def test_integrated_gradients_are_complete(loaded):
    _, spec, model, _, _ = loaded
    m = ex.safe_copy(model)
    x, base = inputs(spec, digit(0))
    target = int(m(x).argmax())
    attr, delta = ex.image_attribution(lambda z: m(z).float(), m, x, target, "ig", base)
    gap = float(m(x)[0, target] - m(base)[0, target])
    assert attr.shape == (1, 8, 8)
    assert abs(float(attr.sum()) - gap) <= 0.05 * abs(gap) + 1e-3, (float(attr.sum()), gap)
    assert abs(float(delta[0])) <= 0.05 * abs(gap) + 1e-3


def test_gradcam_has_the_input_size_and_is_not_negative(loaded):
    _, spec, model, _, _ = loaded
    m = ex.safe_copy(model)
    assert isinstance(ex.last_conv(m), torch.nn.Conv2d)
    x, base = inputs(spec, digit(1))
    cam, delta = ex.image_attribution(lambda z: m(z).float(), m, x, 1, "gradcam", base)
    assert cam.shape == (1, 8, 8) and delta is None
    assert bool((cam >= 0).all()) and float(cam.max()) > 0


def test_occluding_a_blank_region_changes_nothing(loaded):
    _, spec, model, _, _ = loaded
    m = ex.safe_copy(model)
    x, base = inputs(spec, digit(3, blank_right=4))  # columns 4..7 black: windows (2 wide) from column 4 on
    target = int(m(x).argmax())
    attr, _ = ex.image_attribution(lambda z: m(z).float(), m, x, target, "occlusion", base)
    assert float(attr[..., 5:].abs().max()) == 0.0  # covered only by windows of black on black
    assert float(attr[..., :4].abs().max()) > 0  # the ink does matter


@pytest.mark.parametrize("method", ["ig", "gradcam", "occlusion"])
def test_explain_writes_an_overlay_per_file(cli, run_dir, tmp_path, method):
    files = [write_png(tmp_path / f"d{i}.png", digit(i)) for i in range(2)]
    code, out, err = cli("explain", run_dir, *files, "--method", method, "--out", tmp_path / "ex", "--device", "cpu")
    assert code == 0, err
    for i in range(2):
        png = tmp_path / "ex" / f"d{i}.{method}.png"
        assert png.is_file() and png.read_bytes()[:4] == b"\x89PNG"
        assert f"d{i}.png: " in out and str(png) in out
    code, out, err = cli("explain", run_dir, files[0], "--target", "7", "--device", "cpu")  # default: next to it
    assert code == 0, err
    assert (tmp_path / "d0.ig.png").is_file() and ": 7 (" in out


def test_sanity_passes_gradcam_on_the_trained_model(cli, run_dir, tmp_path):
    f = write_png(tmp_path / "d0.png", digit(0))
    code, out, err = cli("explain", run_dir, f, "--method", "gradcam", "--sanity", "--out", tmp_path, "--device", "cpu")
    assert code == 0, err
    assert "sanity: informative" in out
    assert (tmp_path / "d0.gradcam.sanity.png").is_file()


@pytest.fixture(scope="module")
def trained_well(tmp_path_factory):
    """The module's digits CNN trained for 300 steps (a few seconds; test accuracy about 0.95)."""
    out = tmp_path_factory.mktemp("runs") / "digits300"
    over = [*TINY, "train.steps=300", "train.batch_size=32", "model.channels=[8,16]", "model.dense=[32]"]
    assert main(["train", "digits-cnn", "--out", str(out), *sets(*over)]) == 0
    return open_run(str(out), "cpu")


def test_sanity_passes_gradcam_of_the_trained_net_and_flags_untrained_ones(trained_well):
    """The oracle is training itself: the same architecture trained for a few seconds against freshly built
    (it has learnt nothing). Grad-CAM's map of the trained net stands out from untrained copies' maps on every
    image; an untrained net's map is one of them, so it is flagged on most images (the rank test lets an
    untrained net through on an image with probability at most 1/13; the draws share the copies, so three nets)."""
    from deeprecipe.families.classify import explain_tensor

    cfg, spec, model, rt, family = trained_well
    images = [digit(i) for i in range(6)]
    trained = [explain_tensor(model, spec, rt, img, "gradcam", sanity=True)["sanity"] for img in images]
    assert all(r["verdict"] == "informative" and r["ratio"] > 1 for r in trained), trained
    assert min(r["ratio"] for r in trained) > 5, trained  # far outside the untrained maps, not at the edge
    fresh = []
    for seed in range(3):
        torch.manual_seed(seed)
        untrained = family.build_model(cfg, spec).eval()
        fresh += [explain_tensor(untrained, spec, rt, img, "gradcam", sanity=True)["sanity"] for img in images]
    flagged = [r for r in fresh if r["verdict"] == "uninformative"]
    assert len(flagged) >= 2 * len(fresh) // 3, [(r["ratio"], r["final"]) for r in fresh]
    assert all(r["why"] for r in flagged)


def test_sanity_fails_the_command_when_it_flags(capsys, run_dir, tmp_path):
    """Integrated Gradients from a black image on digits is mostly the input's own ink (Adebayo et al. found the
    same of gradient x input): randomising every layer leaves its ranking nearly unchanged, and explain says so."""
    f = write_png(tmp_path / "d0.png", digit(0))
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["explain", str(run_dir), f, "--method", "ig", "--sanity", "--json", "--device", "cpu"])
    out, err = capsys.readouterr()
    assert e.value.code == 3 and "sanity check failed: 1 of 1" in err

    (r,) = json.loads(out)
    assert r["sanity"]["verdict"] == "uninformative" and r["method"] == "ig" and "map" not in r


def test_sanity_flags_explainers_that_ignore_the_weights(loaded):
    _, spec, model, _, _ = loaded
    x, _ = inputs(spec, digit(0))
    for explainer in (lambda net: x[0].sum(0), lambda net: torch.ones(8, 8)):  # the input itself; a constant
        r = ex.sanity(model, explainer)
        assert r["verdict"] == "uninformative" and r["final"] > ex.SANITY_THRESHOLD, r
        assert len(r["similarity"]) == len(r["layers"]) >= 2
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ex.sanity(model, lambda net: x[0].sum(0))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the run's model untouched


def test_bad_input_is_a_one_line_error(cli, run_dir, tmp_path):
    f = write_png(tmp_path / "d0.png", digit(0))
    bad = tmp_path / "not-an-image.png"
    bad.write_text("hello")
    for args, says in [
        (["--method", "shap"], "unknown method"),
        (["--target", "10"], "--target 10"),
    ]:
        code, out, err = cli("explain", run_dir, f, *args, "--device", "cpu")
        lines = [ln for ln in err.splitlines() if not ln.startswith("weights:")]
        assert code == 2 and len(lines) == 1 and says in lines[0], err
    code, out, err = cli("explain", run_dir, str(bad), "--device", "cpu")
    lines = [ln for ln in err.splitlines() if not ln.startswith("weights:")]
    assert code == 2 and len(lines) == 1 and "could not be decoded" in lines[0], err


def test_a_family_without_explain_refuses():
    with pytest.raises(UserError, match="no explain"):
        Family().explain(None, None, None, None, [], ExplainOptions())


def test_a_segmenter_explains_the_mean_logit_of_its_predicted_class(cli, tmp_path):
    over = ["data.size=[32, 48]", "data.train_size=8", "data.val_size=2", "data.test_size=2", "data.crop=24"]
    over += ["train.steps=2", "train.batch_size=4", "train.eval_every=0", "train.device=cpu"]
    code, _, err = cli(
        "train", "scenes-unet", "--out", tmp_path / "seg", *sets(*over, "model.width=8", "model.depth=2")
    )
    assert code == 0, err
    f = tmp_path / "street.png"
    Image.fromarray((torch.rand(40, 50, 3, generator=torch.Generator().manual_seed(0)) * 255).byte().numpy()).save(f)
    code, out, err = cli(
        "explain", tmp_path / "seg", f, "--method", "gradcam", "--json", "--out", tmp_path, "--device", "cpu"
    )
    assert code == 0, err
    (r,) = json.loads(out)
    assert r["method"] == "gradcam" and 0 <= r["target"] < 8 and 0 < r["score"] <= 1
    assert (tmp_path / "street.gradcam.png").is_file()
    code, out, err = cli("explain", tmp_path / "seg", f, "--target", "8", "--device", "cpu")
    assert code == 2 and "--target 8" in err


def test_a_text_classifier_explains_each_token(cli, capsys, tmp_path):
    words = {"pos": ["good", "great", "fine", "nice"], "neg": ["bad", "awful", "poor", "sad"]}
    rows = [f"{words[lab][i % 4]} day {words[lab][(i + 1) % 4]},{lab}" for i in range(40) for lab in words]
    (tmp_path / "data.csv").write_text("text,label\n" + "\n".join(rows) + "\n")
    over = [*TINY, "train.steps=30", "data.source=files", f"data.path={tmp_path / 'data.csv'}", "data.per_class=0"]
    over += ["data.max_len=32", "model.hidden=16", "model.emb=16"]
    code, _, err = cli("train", "multi30k-langid-lstm", "--out", tmp_path / "txt", *sets(*over))
    assert code == 0, err
    f = tmp_path / "t.txt"
    f.write_text("great day nice\n")
    try:  # a flagged map exits 3 (SystemExit, as test_sanity_fails_the_command_when_it_flags shows)
        code, out, err = cli("explain", tmp_path / "txt", f, "--json", "--sanity", "--out", tmp_path, "--device", "cpu")
    except SystemExit as e:
        code, (out, err) = e.code, capsys.readouterr()
    assert code in (0, 3), err
    (r,) = json.loads(out)
    assert "".join(t for t, _ in r["tokens"]) == "great day nice" and r["method"] == "ig"
    assert abs(r["delta"]) < 0.1 * max(1.0, abs(sum(s for _, s in r["tokens"])))  # complete: sums to f(x) - f(PAD)
    assert r["sanity"]["verdict"] in ("informative", "uninformative") and (tmp_path / "t.ig.sanity.png").is_file()
    code, out, err = cli("explain", tmp_path / "txt", f, "--method", "gradcam", "--device", "cpu")
    lines = [ln for ln in err.splitlines() if not ln.startswith("weights:")]
    assert code == 2 and len(lines) == 1 and "a text classifier takes ig" in lines[0], err


def test_the_report_has_gradcam_of_the_worst_mistakes_and_an_mlp_has_none(cli, run_dir, tmp_path):
    """The finish hook's plots/worst_mistakes_gradcam.png (the first 8 of worst_mistakes.png, Grad-CAM of the
    predicted class) on the digits CNN; an MLP has no conv layer: no such plot, and its run still finishes."""
    plots = run_dir / "plots"
    assert (plots / "worst_mistakes.png").is_file()  # 40 steps leave mistakes
    png = plots / "worst_mistakes_gradcam.png"
    assert png.is_file() and png.read_bytes()[:4] == b"\x89PNG"
    code, _, err = cli("train", "digits-mlp", "--out", tmp_path / "mlp", *sets(*TINY, "model.hidden=[8]"))
    assert code == 0, err
    assert (tmp_path / "mlp" / "plots" / "worst_mistakes.png").is_file()
    assert not (tmp_path / "mlp" / "plots" / "worst_mistakes_gradcam.png").exists()


def test_the_served_explain_gives_the_overlay_that_explain_writes(cli, run_dir, tmp_path):
    """POST /explain?method=gradcam answers the label, its probability and the overlay that `deeprecipe explain RUN
    FILE --method gradcam` writes for the same file; a bad method is a 422 and no token a 401."""
    import base64
    import io

    from fastapi.testclient import TestClient

    from deeprecipe.serve.server import ServeOptions, build_app

    f = write_png(tmp_path / "d0.png", digit(0))
    code, out, err = cli("explain", run_dir, f, "--method", "gradcam", "--json", "--out", tmp_path, "--device", "cpu")
    assert code == 0, err
    (want,) = json.loads(out)
    app = build_app(str(run_dir), *open_run(str(run_dir), "cpu", "fp32"), ServeOptions(token="tk"))  # as serve does
    auth = {"Authorization": "Bearer tk"}
    upload = {"image": ("d0.png", open(f, "rb").read(), "image/png")}
    try:
        with TestClient(app) as c:
            r = c.post("/explain?method=gradcam", files=upload, headers=auth)
            assert r.status_code == 200, r.text
            got = r.json()
            assert (got["label"], got["prob"], got["method"]) == (want["label"], want["score"], "gradcam")
            served = np.asarray(Image.open(io.BytesIO(base64.b64decode(got["overlay"]))), dtype=np.int16)
            written = np.asarray(Image.open(tmp_path / "d0.gradcam.png"), dtype=np.int16)
            assert served.shape == written.shape and np.abs(served - written).max() <= 2
            assert c.post("/explain?method=ig", files=upload, headers=auth).json()["method"] == "ig"
            bad = c.post("/explain?method=shap", files=upload, headers=auth)
            assert bad.status_code == 422 and "method" in bad.text
            assert c.post("/explain?method=gradcam", files=upload).status_code == 401
            widgets = {w["path"]: w for w in c.get("/info", headers=auth).json()["endpoints"]}
            assert widgets["/explain"]["kind"] == "image" and widgets["/explain"]["methods"][0] == "gradcam"
    finally:
        torch.set_grad_enabled(True)  # in case loading a run turns autograd off for the process
