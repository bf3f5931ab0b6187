"""`deeprecipe explain` for a detector (families/detect explain_detection) on a centernet trained for a few seconds
on generated scenes: the explained scalar stands for its box (mean-grey over the box lowers it far more than over
any other window of the box's size), the attributions of IG and occlusion lie in the box far above its area
share (Grad-CAM above it), IG is complete, --target picks the N-th detection, the overlay and the served
/explain agree, and no detection or an out-of-range --target is a one-line error."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY, sets
from deeprecipe.cli import main, open_run
from deeprecipe.data.detect import ScenesDetectData
from deeprecipe.data.image_ops import normalize
from deeprecipe.families.detect import DRAW_THRESH, explain_detection

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE, TRAIN = 64, 32  # 150 steps on 32 scenes: the best detection in each of them scores 0.5 to 0.75
IMAGES = range(6)  # the training scenes explained


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, one_thread):
    out = tmp_path_factory.mktemp("runs") / "det"
    over = [*TINY, "train.steps=150", "train.batch_size=8", f"data.size=[{SIZE},{SIZE}]", f"data.train_size={TRAIN}"]
    over += ["data.val_size=4", "data.test_size=4", "data.flip=false", "data.scale=[1.0,1.0]", "train.ckpt_every=150"]
    over += ["model.width=8", "model.neck=16", "model.max_width=32", "optim.weight_decay=0.0"]
    assert main(["train", "scenes-detect", "--out", str(out), *sets(*over)]) == 0
    return out


@pytest.fixture(scope="module")
def loaded(run_dir):
    cfg, spec, model, rt, family = open_run(str(run_dir), "cpu")
    torch.set_grad_enabled(True)
    scenes = ScenesDetectData(size=(SIZE, SIZE), train_size=TRAIN, val_size=0, test_size=0).build().train.tensors[0]
    return spec, model, rt, scenes


def inside(box: list[float]) -> torch.Tensor:
    """The pixels (SIZE, SIZE) whose centres lie in box xyxy."""
    c = torch.arange(SIZE) + 0.5
    x1, y1, x2, y2 = box
    return ((c[:, None] > y1) & (c[:, None] < y2)) & ((c[None] > x1) & (c[None] < x2))


def best_detection(model, spec, img: torch.Tensor) -> tuple[list[float], float, int, int]:
    """(box, score, class, cell) of the best detection in uint8 img (3, SIZE, SIZE)."""
    with torch.no_grad():
        b, s, y, cell = model.decode(model(normalize(img[None], spec)), cells=True)[0]
    k = int(s.argmax())
    return b[k].tolist(), float(s[k]), int(y[k]), int(cell[k])


def logit(model, spec, img: torch.Tensor, c: int, cell: int) -> float:
    with torch.no_grad():
        return float(model(normalize(img[None], spec))[0, c].flatten()[cell])


def test_decode_names_the_cell_whose_logit_scored_each_box():
    """Planted logits: decode(cells=True) gives each box the flat cell index of its own logit, and the boxes,
    scores and labels it gives without cells."""
    from deeprecipe.core import DataSpec
    from deeprecipe.models import MODELS

    spec = DataSpec(num_classes=3, in_channels=3, image_size=(32, 32), mean=(0.5,) * 3, std=(0.25,) * 3)
    model = MODELS["centernet"](width=4, neck=8, max_width=16, score_thresh=0.3).build(spec).eval()
    out = torch.full((1, 7, 8, 8), -10.0)
    out[:, 3:] = 0.0
    planted = {(0, 2, 2): 5.0, (1, 2, 3): 3.0, (2, 6, 5): 1.0}  # (class, row, column): logit
    for (c, i, j), v in planted.items():
        out[0, c, i, j] = v
    ((b, s, y, cell),) = model.decode(out, cells=True)
    assert len(cell) == 3
    for k in range(3):
        assert float(out[0, y[k]].flatten()[cell[k]]) == planted[(int(y[k]), int(cell[k]) // 8, int(cell[k]) % 8)]
        assert torch.isclose(torch.sigmoid(out[0, y[k]].flatten()[cell[k]]), s[k])
    ((b0, s0, y0),) = model.decode(out)
    assert torch.equal(b0, b) and torch.equal(s0, s) and torch.equal(y0, y)


def test_the_explained_logit_stands_for_its_box(loaded):
    """The oracle for the scalar: filling the explained box with the data's mean colour (what IG and occlusion
    take away) lowers that logit more than filling any other window of the box's size that misses the box,
    and by at least 1 (the box's evidence is in it, not around it)."""
    spec, model, rt, scenes = loaded
    grey = (torch.tensor(spec.mean) * 255).round().to(torch.uint8)[:, None, None]
    for i in IMAGES:
        img = scenes[i]
        box, score, c, cell = best_detection(model, spec, img)
        full = logit(model, spec, img, c, cell)
        assert abs(float(torch.sigmoid(torch.tensor(full))) - score) < 1e-5  # the logit is the box's score
        x1, y1, x2, y2 = [int(round(v)) for v in box]
        h, w = y2 - y1, x2 - x1
        covered = img.clone()
        covered[:, y1:y2, x1:x2] = grey
        drop = full - logit(model, spec, covered, c, cell)
        elsewhere = []
        for top in range(0, SIZE - h + 1, max(1, h // 2)):
            for left in range(0, SIZE - w + 1, max(1, w // 2)):
                if top + h <= y1 or top >= y2 or left + w <= x1 or left >= x2:
                    other = img.clone()
                    other[:, top : top + h, left : left + w] = grey
                    elsewhere.append(full - logit(model, spec, other, c, cell))
        assert drop > 1 and drop > max(elsewhere, default=0), (i, drop, max(elsewhere))


def test_attributions_lie_in_the_explained_box(loaded):
    """The share of each map's mass inside the box against the box's share of the image: IG (|attribution|) and
    occlusion (the drops) at least 3x it on every image and 6x on the median; Grad-CAM, whose gradient is
    averaged over the map (so it shows the class's evidence everywhere), at least 2x on the median. (Measured:
    IG 5-26x, median 9x; occlusion 4.4-28x, median 10x; Grad-CAM 2.4-7.3x, median 4x.)"""
    spec, model, rt, scenes = loaded
    ratios = {m: [] for m in ("ig", "occlusion", "gradcam")}
    for i in IMAGES:
        for method in ratios:
            r = explain_detection(model, spec, rt, scenes[i], method)
            assert r["target"] == 0 and r["score"] >= DRAW_THRESH and r["map"].shape == (SIZE, SIZE)
            a = r["map"].abs() if method == "ig" else r["map"].clamp_min(0)
            box = inside(r["box"])
            ratios[method].append(float(a[box].sum() / a.sum()) / float(box.float().mean()))
    median = {m: float(np.median(v)) for m, v in ratios.items()}
    assert min(ratios["ig"]) > 3 and min(ratios["occlusion"]) > 3, ratios
    assert median["ig"] > 6 and median["occlusion"] > 6 and median["gradcam"] > 2, median


def test_integrated_gradients_of_a_detection_are_complete(loaded):
    """The map sums to the logit's gap between the image and the baseline (the data's mean colour, zero once
    normalized)."""
    spec, model, rt, scenes = loaded
    r = explain_detection(model, spec, rt, scenes[0], "ig")
    _, _, c, cell = best_detection(model, spec, scenes[0])
    mean = (torch.tensor(spec.mean) * 255)[:, None, None].expand(3, SIZE, SIZE)
    gap = logit(model, spec, scenes[0], c, cell) - logit(model, spec, mean, c, cell)
    assert abs(float(r["map"].sum()) - gap) <= 0.05 * abs(gap) + 1e-3, (float(r["map"].sum()), gap)
    assert abs(r["delta"]) <= 0.05 * abs(gap) + 1e-3


def write_png(path, img: torch.Tensor) -> str:
    Image.fromarray(img.permute(1, 2, 0).numpy()).save(path)
    return str(path)


def test_explain_writes_the_overlay_and_target_picks_the_nth_detection(cli, run_dir, loaded, tmp_path):
    spec, model, rt, scenes = loaded
    f = write_png(tmp_path / "street.png", scenes[0])
    code, out, err = cli(
        "explain", run_dir, f, "--method", "occlusion", "--json", "--out", tmp_path / "ex", "--device", "cpu"
    )
    assert code == 0, err
    (best,) = json.loads(out)
    png = tmp_path / "ex" / "street.occlusion.png"
    assert best["out"] == str(png) and png.read_bytes()[:4] == b"\x89PNG"
    assert best["target"] == 0 and best["label"] in spec.class_names and len(best["box"]) == 4
    code, out, err = cli("explain", run_dir, f, "--target", "1", "--json", "--device", "cpu")  # IG, next to the input
    assert code == 0, err
    (second,) = json.loads(out)
    assert (tmp_path / "street.ig.png").is_file() and second["target"] == 1
    assert DRAW_THRESH <= second["score"] <= best["score"] and second["box"] != best["box"]


def test_sanity_tells_the_trained_detector_from_untrained_copies(cli, run_dir, loaded, tmp_path):
    _, _, _, scenes = loaded
    f = write_png(tmp_path / "street.png", scenes[1])
    code, out, err = cli(
        "explain", run_dir, f, "--method", "gradcam", "--sanity", "--json", "--out", tmp_path, "--device", "cpu"
    )
    assert code in (0, 3), err
    (r,) = json.loads(out)
    assert r["sanity"]["ratio"] > 1 and (tmp_path / "street.gradcam.sanity.png").is_file()


def test_no_detection_or_a_target_out_of_range_is_a_one_line_error(cli, run_dir, loaded, tmp_path):
    spec, _, _, scenes = loaded
    grey = write_png(
        tmp_path / "grey.png", (torch.tensor(spec.mean) * 255).round().byte()[:, None, None].expand(3, 64, 64)
    )
    street = write_png(tmp_path / "street.png", scenes[0])
    for args, says in [
        ([street, "--target", "99"], "--target 99"),
        ([grey], f"no detection scoring at least {DRAW_THRESH}"),
        ([street, "--method", "attention"], "a detector takes"),
    ]:
        code, out, err = cli("explain", run_dir, *args, "--device", "cpu")
        lines = [ln for ln in err.splitlines() if not ln.startswith("weights:")]
        assert code == 2 and len(lines) == 1 and says in lines[0], err


def test_the_served_explain_gives_what_explain_writes(cli, run_dir, loaded, tmp_path):
    """POST /explain?method=ig answers the label, score, box and overlay that `deeprecipe explain` gives for the
    same file; an image with nothing detected is a 422 that says so."""
    from fastapi.testclient import TestClient

    from deeprecipe.serve.server import ServeOptions, build_app

    spec, _, _, scenes = loaded
    f = write_png(tmp_path / "street.png", scenes[2])
    code, out, err = cli("explain", run_dir, f, "--json", "--out", tmp_path, "--device", "cpu")
    assert code == 0, err
    (want,) = json.loads(out)
    app = build_app(str(run_dir), *open_run(str(run_dir), "cpu", "fp32"), ServeOptions(token="tk"))
    auth = {"Authorization": "Bearer tk"}
    grey = io.BytesIO()
    Image.new("RGB", (64, 64), tuple(round(255 * m) for m in spec.mean)).save(grey, "PNG")
    try:
        with TestClient(app) as c:
            r = c.post(
                "/explain?method=ig", files={"image": ("s.png", open(f, "rb").read(), "image/png")}, headers=auth
            )
            assert r.status_code == 200, r.text
            got = r.json()
            assert (got["label"], got["score"], got["box"]) == (want["label"], want["score"], want["box"])
            served = np.asarray(Image.open(io.BytesIO(base64.b64decode(got["overlay"]))), dtype=np.int16)
            written = np.asarray(Image.open(tmp_path / "street.ig.png"), dtype=np.int16)
            assert served.shape == written.shape and np.abs(served - written).max() <= 2
            bad = c.post("/explain", files={"image": ("g.png", grey.getvalue(), "image/png")}, headers=auth)
            assert bad.status_code == 422 and "no detection" in bad.text
            widgets = {w["path"]: w for w in c.get("/info", headers=auth).json()["endpoints"]}
            assert widgets["/explain"]["methods"] == ["ig", "gradcam", "occlusion"] and "/detect" in widgets
    finally:
        torch.set_grad_enabled(True)
