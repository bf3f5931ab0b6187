"""Object detection: boxes from the renderer, box-aware augmentation, padded targets, the detector's loss at init,
mAP against a hand-computed AP, NMS from the config, the box-format check, the file readers and predict."""

from __future__ import annotations

import json
import math

import pytest
import torch

from deeprecipe.checks.core import Ctx
from deeprecipe.core import DataError, DataSpec
from deeprecipe.data.boxfiles import BoxFilesData
from deeprecipe.data.core import Data, Draws, TensorSplit, pad_targets, trim_targets
from deeprecipe.data.detect import ScenesDetectData, boxes_from_instances
from deeprecipe.families import get_family
from deeprecipe.families.detect import augment, move_boxes
from deeprecipe.families.detect.checks import boxes as box_check
from deeprecipe.families.detect.metrics import DetectionMetrics, match_misses
from deeprecipe.models import MODELS
from deeprecipe.recipe import load


def test_boxes_are_the_visible_pixels_of_each_instance():
    inst = torch.full((1, 10, 12), -1, dtype=torch.int8)
    label = torch.zeros(1, 10, 12, dtype=torch.uint8)
    inst[0, 2:5, 3:9], label[0, 2:5, 3:9] = 2, 6  # a car: rows 2..4, columns 3..8
    inst[0, 6:10, 0:2], label[0, 6:10, 0:2] = 0, 7  # a sign plate in the corner
    inst[0, 0, 11], label[0, 0, 11] = 4, 5  # one pixel of a pedestrian: too small to count
    b, y = boxes_from_instances(inst, label, min_pixels=2, min_side=1)
    assert y[0].tolist() == [2, 0, -1, -1, -1, -1, -1]  # sign (instance 0) first, then the car; padding last
    assert b[0, 0].tolist() == [0, 6, 2, 10] and b[0, 1].tolist() == [3, 2, 9, 5]
    assert (b[0, 2:] == 0).all()


def test_scenes_detect_is_deterministic_and_has_varying_box_counts():
    cfg = ScenesDetectData(size=(64, 64), train_size=24, val_size=4, test_size=4)
    a, b = cfg.build(), cfg.build()
    for s, t in zip(a.train.tensors, b.train.tensors):
        assert torch.equal(s, t)
    x, boxes, labels = a.train.tensors
    counts = (labels >= 0).sum(1)
    assert counts.min() < counts.max() and labels.max() == 2
    real = labels >= 0
    assert (boxes[real][:, 2:] > boxes[real][:, :2]).all() and boxes[real].max() <= 64
    assert a.spec.extra["boxes"] == "xyxy" and len(a.spec.extra["objects_per_image"]) == 3


def test_pad_and_trim_targets():
    b, y = pad_targets(
        [torch.ones(2, 4), torch.zeros(0, 4)], [torch.tensor([1, 0]), torch.tensor([], dtype=torch.long)], 5
    )
    assert b.shape == (2, 5, 4) and y.tolist() == [[1, 0, -1, -1, -1], [-1] * 5]
    tb, ty = trim_targets(b, y)
    assert tb.shape == (2, 2, 4) and ty.tolist() == [[1, 0], [-1, -1]]
    with pytest.raises(DataError, match="2 boxes but 1 labels"):
        pad_targets([torch.ones(2, 4)], [torch.tensor([1])])


@pytest.mark.parametrize("seed", range(4))
def test_augmented_boxes_frame_the_moved_object(seed):
    """A white rectangle on black, flipped, zoomed and shifted: its moved box is the white pixels' box."""
    x = torch.zeros(6, 3, 40, 48, dtype=torch.uint8)
    boxes = torch.tensor([[10.0, 8.0, 30.0, 20.0]]).repeat(6, 1, 1)
    for i in range(6):
        x[i, :, 8:20, 10:30] = 255
    spec = DataSpec(image_size=(40, 48), extra={"flip": True, "scale": [0.8, 1.3], "crop": 0, "min_visible": 0.0})
    draws = Draws(torch.Generator().manual_seed(seed))
    out, b, y = augment(x, boxes, torch.zeros(6, 1, dtype=torch.long), draws, spec)
    for i in range(6):
        white = out[i, 0] > 127
        if not white.any():
            assert y[i, 0] == -1
            continue
        rows, cols = white.any(1).nonzero().flatten(), white.any(0).nonzero().flatten()
        want = torch.tensor([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1]).float()
        assert y[i, 0] == 0 and (b[i, 0] - want).abs().max() <= 1.01, (b[i, 0], want)


def test_a_box_mostly_cropped_away_loses_its_label():
    boxes = torch.tensor([[[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]]])
    # shift the view right by a quarter of the image (u_in = u_out + 0.5): x -> x - 10 for a 40 px image
    one, half = torch.ones(1), torch.full((1,), 0.5)
    out, y = move_boxes(boxes, torch.tensor([[0, 1]]), (40, 40), (40, 40), one, one, half, torch.zeros(1), 0.4)
    assert y.tolist() == [[-1, 1]] and out[0, 1].tolist() == [10.0, 20.0, 20.0, 30.0]


def test_map_equals_a_hand_computed_ap():
    """Three true boxes; detections by score: hit, false alarm, hit (one truth never found). Precision at recall
    1/3 is 1, at 2/3 it is 2/3: COCO's 101-point AP = (34 * 1 + 33 * 2/3) / 101 at every IoU threshold."""
    g = torch.tensor(
        [[[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]], [[5.0, 5.0, 25.0, 25.0], [0.0, 0.0, 0.0, 0.0]]]
    )
    y = torch.tensor([[0, 0], [0, -1]])
    dets = [
        (
            torch.tensor([[0.0, 0.0, 10.0, 10.0], [40.0, 40.0, 50.0, 50.0]]),
            torch.tensor([0.9, 0.8]),
            torch.tensor([0, 0]),
        ),
        (torch.tensor([[5.0, 5.0, 25.0, 25.0]]), torch.tensor([0.7]), torch.tensor([0])),
    ]
    m = DetectionMetrics(1, extended=True)
    m.update(dets, g, y)
    r = m.compute()
    want = (34 + 33 * 2 / 3) / 101
    assert r["map"] == pytest.approx(want, abs=1e-4) and r["map_50"] == pytest.approx(want, abs=1e-4)
    assert r["ap_per_class"] == [pytest.approx(want, abs=1e-4)]
    rec, prec = r["pr_curves"][0]
    assert prec[0] == pytest.approx(1.0) and prec[50] == pytest.approx(2 / 3) and prec[80] == 0
    assert match_misses(dets[0], g[0], y[0], 0.5) == 1 and match_misses(dets[1], g[1, :1], y[1, :1], 0.5) == 0


def tiny_spec(size: int = 32) -> DataSpec:
    return DataSpec(
        num_classes=3,
        class_names=["car", "person", "traffic sign"],
        in_channels=3,
        image_size=(size, size),
        mean=(0.5,) * 3,
        std=(0.25,) * 3,
        extra={"objects_per_image": [2.0, 1.0, 1.0], "box_wh_sample": [[8.0, 6.0], [4.0, 10.0], [5.0, 5.0]]},
    )


@pytest.mark.parametrize(
    "peaks, nms_iou, want, logits",
    [(True, 0.5, [0, 1], [5.0, 3.0]), (False, 0.5, [0, 0, 1], [5.0, 4.0, 3.0]), (False, 0.3, [0, 1], [5.0, 3.0])],
)
def test_decode_keeps_cells_above_the_score_threshold_and_nms_per_class(peaks, nms_iou, want, logits):
    spec = tiny_spec()
    cfg = MODELS["centernet"](width=4, neck=8, max_width=16, score_thresh=0.3, nms_iou=nms_iou, peaks=peaks)
    model = cfg.build(spec).eval()
    out = torch.full((1, 7, 8, 8), -10.0)
    out[:, 3:] = 0.0  # every cell: a 8 x 8 square (2 x stride) around its centre
    out[0, 0, 2, 2] = 5.0  # a car at cell (2, 2)
    out[0, 0, 2, 3] = 4.0  # its neighbour (IoU 1/3): no local maximum; kept by NMS at IoU 0.5, not at 0.3
    out[0, 1, 2, 3] = 3.0  # a person at the same place: another class, kept
    out[0, 2, 6, 6] = -1.0  # a sign scoring 0.27: below score_thresh
    ((b, s, y),) = model.decode(out)
    assert y.tolist() == want and torch.allclose(s, torch.sigmoid(torch.tensor(logits)))
    assert b[0].tolist() == [6.0, 6.0, 14.0, 14.0]


def test_centernet_loss_at_init_matches_its_closed_form():
    cfg = load("scenes-detect", ["data.size=[64,64]", "data.train_size=64", "model.width=8", "model.neck=16"])
    family = get_family("detect")
    data = ScenesDetectData(size=(64, 64), train_size=64, val_size=0, test_size=0).build()
    torch.manual_seed(0)
    model = family.build_model(cfg, data.spec).train()
    batch = family.prepare(data.train.take(torch.arange(64)), data.spec, None)
    with torch.no_grad():
        loss = float(family.loss(model, batch, cfg, "model")[0])
    want, why = family.expected_init_loss(data.spec, cfg)
    assert abs(loss - want) / want < 0.1, (loss, want, why)


def box_ctx(tmp_path, planted=None) -> Ctx:
    cfg = load("scenes-detect", ["train.device=cpu", "model.width=8", "model.neck=16"])
    data = ScenesDetectData(size=(64, 64), train_size=48, val_size=0, test_size=0).build()
    x, b, y = data.train.tensors
    if planted == "xywh":
        b = torch.cat([b[..., :2], b[..., 2:] - b[..., :2]], -1) * (y >= 0)[..., None]
    elif planted == "yx":
        b = b[..., [1, 0, 3, 2]]
    return Ctx(cfg, tmp_path, get_family("detect"), data=Data(data.spec, TensorSplit(x, b, y)))


@pytest.mark.parametrize("planted", [None, "xywh", "yx"])
def test_box_format_check_fails_on_xywh_and_swapped_axes(tmp_path, planted):
    v = box_check(box_ctx(tmp_path, planted))
    assert v.status == ("pass" if planted is None else "fail"), v


# ------------------------------------------------------------------------------------------------ readers


def write_images(folder, names, w=40, h=30):
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for n in names:
        Image.new("RGB", (w, h), (90, 120, 30)).save(folder / n)


def voc_xml(fname, objects, w=40, h=30):
    objs = "".join(
        f"<object><name>{n}</name><bndbox><xmin>{a}</xmin><ymin>{b}</ymin><xmax>{c}</xmax><ymax>{d}</ymax></bndbox></object>"
        for n, (a, b, c, d) in objects
    )
    size = f"<size><width>{w}</width><height>{h}</height></size>"
    return f"<annotation><filename>{fname}</filename>{size}{objs}</annotation>"


def make_voc(tmp, objects):
    (tmp / "Annotations").mkdir(parents=True)
    write_images(tmp / "JPEGImages", ["a.png", "b.png", "c.png"])
    for i, n in enumerate("abc"):
        (tmp / "Annotations" / f"{n}.xml").write_text(
            voc_xml(f"{n}.png", objects if i == 0 else [("car", (1, 1, 4, 4))])
        )
    return BoxFilesData(
        path=str(tmp), format="voc", classes=["car", "person"], size=(30, 40), val_fraction=0, test_fraction=0
    )


def first_boxes(data):
    x, b, y = data.train.tensors
    return b[0][y[0] >= 0].tolist(), y[0][y[0] >= 0].tolist()


def test_voc_boxes_are_read_in_pixel_edges(tmp_path):
    data = make_voc(tmp_path, [("person", (11, 6, 20, 25)), ("car", (1, 1, 40, 30))]).build()
    assert first_boxes(data) == ([[10.0, 5.0, 20.0, 25.0], [0.0, 0.0, 40.0, 30.0]], [1, 0])


def test_coco_yolo_and_kitti_give_the_same_boxes(tmp_path):
    box = [10.0, 5.0, 20.0, 25.0]  # x1 y1 x2 y2 in a 40 x 30 image
    coco = tmp_path / "coco"
    write_images(coco / "images", ["a.png"])
    doc = {
        "images": [{"id": 7, "file_name": "a.png", "width": 40, "height": 30}],
        "annotations": [{"id": 1, "image_id": 7, "category_id": 3, "bbox": [10, 5, 10, 20]}],
        "categories": [{"id": 1, "name": "car"}, {"id": 3, "name": "person"}],
    }
    (coco / "annotations.json").write_text(json.dumps(doc))
    yolo = tmp_path / "yolo"
    write_images(yolo / "images", ["a.png"])
    (yolo / "labels").mkdir()
    (yolo / "labels" / "a.txt").write_text(f"1 {15 / 40} {15 / 30} {10 / 40} {20 / 30}\n")
    kitti = tmp_path / "kitti"
    write_images(kitti / "image_2", ["a.png"])
    (kitti / "label_2").mkdir()
    (kitti / "label_2" / "a.txt").write_text(
        "Pedestrian 0.00 0 -0.2 10 5 20 25 1.7 0.6 0.8 1 1 9 0.1\nDontCare -1 -1 -10 0 0 3 3 -1 -1 -1 -1 -1 -1 -1\n"
    )
    kw = dict(size=(30, 40), val_fraction=0, test_fraction=0)
    for cfg in (
        BoxFilesData(path=str(coco), format="coco", **kw),
        BoxFilesData(path=str(yolo), format="yolo", classes=["car", "person"], **kw),
        BoxFilesData(path=str(kitti), format="kitti", classes=["Car", "Pedestrian"], **kw),
    ):
        b, y = first_boxes(cfg.build())
        assert y == [1] and b[0] == pytest.approx(box, abs=1e-4), cfg.format


def test_yolo_bad_lines_name_the_file_and_line(tmp_path):
    write_images(tmp_path / "images", ["a.png"])
    (tmp_path / "labels").mkdir()
    lab = tmp_path / "labels" / "a.txt"
    cfg = BoxFilesData(path=str(tmp_path), format="yolo", classes=["car"], val_fraction=0, test_fraction=0)
    for text, msg in (
        ("0 0.5 0.5 0.2 0.2\n0 0.5 0.5 0.2\n", "a.txt:2: 4 fields, expected 5"),
        ("3 0.5 0.5 0.2 0.2\n", "a.txt:1: unknown class 3"),
        ("0 0.5 0.5 -0.2 0.2\n", "a.txt:1: negative width"),
    ):
        lab.write_text(text)
        with pytest.raises(DataError, match=msg.replace(".", r"\.")):
            cfg.build()
    lab.write_text("")  # an empty file: an image without objects, counted; strict refuses it
    with pytest.warns(UserWarning, match="1 images without boxes"):
        cfg.build()
    cfg.strict = True
    with pytest.raises(DataError, match="empty annotation file"):
        cfg.build()


def test_inverted_outside_and_unknown_boxes(tmp_path):
    with pytest.raises(DataError, match=r"a\.xml: object 1 \(car\): box \[20, 5, 10, 25\] has x2 < x1"):
        make_voc(tmp_path / "inv", [("car", (21, 6, 10, 25))]).build()
    with pytest.raises(DataError, match=r"a\.xml: object 1 \(bus\): unknown class 'bus'"):
        make_voc(tmp_path / "unk", [("bus", (1, 1, 5, 5))]).build()
    cfg = make_voc(tmp_path / "out", [("car", (31, 1, 60, 10))])
    with pytest.warns(UserWarning, match="1 boxes clipped"):
        assert first_boxes(cfg.build())[0] == [[30.0, 0.0, 40.0, 10.0]]
    cfg.strict = True
    with pytest.raises(DataError, match="reaches outside the 40x30 image"):
        cfg.build()
    cfg.strict = False
    (tmp_path / "out" / "Annotations" / "b.xml").write_text("")
    with pytest.raises(DataError, match=r"b\.xml: empty annotation file"):
        cfg.build()


def test_kitti_wrong_field_count(tmp_path):
    write_images(tmp_path / "image_2", ["a.png"])
    (tmp_path / "label_2").mkdir()
    (tmp_path / "label_2" / "a.txt").write_text("Car 0 0 0 1 2 3 4\n")
    with pytest.raises(DataError, match=r"a\.txt:1: 8 fields, expected 15"):
        BoxFilesData(path=str(tmp_path), format="kitti").build()


# ------------------------------------------------------------------------------------------------ use


def test_train_predict_writes_json_boxes_and_a_drawing(tmp_path, cli):
    run, out = tmp_path / "run", tmp_path / "pred"
    sets = ["data.size=[48,48]", "data.train_size=8", "data.val_size=4", "data.test_size=4", "model.width=4"]
    sets += ["model.neck=8", "model.max_width=16", "train.steps=2", "train.batch_size=4", "train.eval_every=0"]
    sets += ["train.device=cpu", "model.score_thresh=0.0"]
    code, _, err = cli("train", "scenes-detect", "--out", str(run), *[a for s in sets for a in ("--set", s)])
    assert code == 0, err
    assert (run / "plots" / "detections.png").is_file() and (run / "plots" / "ap.txt").is_file()
    write_images(tmp_path / "img", ["street.png"], w=96, h=64)
    code, printed, err = cli("predict", str(run), str(tmp_path / "img" / "street.png"), "--out", str(out))
    assert code == 0 and "street.json" in printed, err
    got = json.loads((out / "street.json").read_text())
    assert len(got["boxes"]) == len(got["scores"]) == len(got["labels"]) > 0
    b = torch.tensor(got["boxes"])
    assert (b[:, 2] <= 96).all() and (b[:, 3] <= 64).all() and (b[:, :2] >= 0).all()
    assert (out / "street_boxes.png").is_file() and not math.isnan(got["scores"][0])
    # the endpoint answers the same boxes for the same file, with the drawing for the page
    from fastapi.testclient import TestClient

    from deeprecipe.cli.runs import open_run
    from deeprecipe.serve.server import ServeOptions, build_app

    app = build_app(str(run), *open_run(str(run), "cpu", "fp32"), ServeOptions(token="tk"))
    with TestClient(app) as c:
        data = (tmp_path / "img" / "street.png").read_bytes()
        r = c.post("/detect", files={"image": ("s.png", data, "image/png")}, headers={"Authorization": "Bearer tk"})
        assert r.status_code == 200, r.text
        served = r.json()
        assert served["boxes"] == got["boxes"] and served["labels"] == got["labels"] and served["overlay"]
        bad = c.post("/detect", files={"image": ("x.png", b"no", "image/png")}, headers={"Authorization": "Bearer tk"})
        assert bad.status_code == 400
    torch.set_grad_enabled(True)
    # export: the raw maps to ONNX, checked against PyTorch (decoding and NMS stay in Python)
    code, printed, err = cli("export", str(run), "--format", "onnx")
    assert code == 0 and "model.onnx" in printed, err


def test_tv_detector_loads_a_local_weights_file_and_detects(tmp_path):
    from deeprecipe.config import from_dict
    from deeprecipe.core import ConfigError

    spec = tiny_spec(64)
    torch.manual_seed(0)
    a = MODELS["tv-detector"]().build(spec)
    torch.save(a.net.state_dict(), tmp_path / "w.pth")
    torch.manual_seed(1)
    b = MODELS["tv-detector"](weights_path=str(tmp_path / "w.pth")).build(spec)
    assert all(torch.equal(v, b.net.state_dict()[k]) for k, v in a.net.state_dict().items())
    with pytest.raises(ConfigError, match="no such file"):
        MODELS["tv-detector"](weights_path=str(tmp_path / "none.pth")).build(spec)
    with pytest.raises(ConfigError, match="model.arch=yolo: use one of fasterrcnn_mobilenet_v3_large_320_fpn, "):
        from_dict(MODELS["tv-detector"], {"arch": "yolo"}, "model")
    dets = b.eval().detect(torch.randn(2, 3, 64, 64))
    assert len(dets) == 2 and all(d[0].shape[-1] == 4 and len(d[1]) == len(d[2]) for d in dets)


@pytest.mark.parametrize("planted", [False, True])
def test_init_loss_check_catches_a_heat_head_not_started_at_the_prior(tmp_path, planted):
    from deeprecipe.checks.training import init_loss

    cfg = load("scenes-detect", ["train.device=cpu", "model.width=8", "model.neck=16", "model.max_width=32"])
    data = ScenesDetectData(size=(64, 64), train_size=32, val_size=0, test_size=0).build()

    def make(spec):
        model = cfg.model.build(spec)
        if planted:  # a zero bias: every cell starts at p = 0.5 instead of the class prior
            torch.nn.init.zeros_(model.head.bias)
        return model

    v = init_loss(Ctx(cfg, tmp_path, get_family("detect"), data=data, make_model=make, batch_size=16))
    assert v.status == ("fail" if planted else "pass"), v


# ------------------------------------------------------------------------------------------------ files at scale


def draw_set(folder, n, w=40, h=30, box=(8, 6, 20, 18)):
    """n images w x h, each a black picture with one bright rectangle at `box` (pixel edges, shifted by i % 5)
    in a colour of its own: (image paths, YOLO lines)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        img = Image.new("RGB", (w, h), (0, 0, 0))
        x1, y1, x2, y2 = (v + i % 5 for v in box)
        img.paste((255, (37 * i) % 256, 200), (x1, y1, x2, y2))
        img.save(folder / f"{i:03d}.png")
        lines.append(f"{i % 2} {(x1 + x2) / 2 / w} {(y1 + y2) / 2 / h} {(x2 - x1) / w} {(y2 - y1) / h}\n")
    return lines


def yolo_set(root, n, **kw):
    lines = draw_set(root / "images", n, **kw)
    (root / "labels").mkdir(parents=True, exist_ok=True)
    for i, line in enumerate(lines):
        (root / "labels" / f"{i:03d}.txt").write_text(line)
    return root


def yolo_cfg(root, **kw):
    base = dict(path=str(root), format="yolo", classes=["a", "b"], size=(24, 32), val_fraction=0.25, test_fraction=0)
    return BoxFilesData(**(base | kw))


def test_a_streamed_set_gives_the_batches_of_the_in_memory_one_and_resumes_exactly(tmp_path):
    from deeprecipe.data.core import StreamSplit, train_batches

    yolo_set(tmp_path, 12)
    held, streamed = yolo_cfg(tmp_path).build(), yolo_cfg(tmp_path, in_memory_mb=0).build()
    assert isinstance(held.train, TensorSplit) and isinstance(streamed.train, StreamSplit)
    assert held.spec.extra["objects_per_image"] == streamed.spec.extra["objects_per_image"]
    cpu = torch.device("cpu")
    want = list(train_batches(held.train, 3, range(4), 5, cpu))
    got = list(train_batches(streamed.train, 3, range(4), 5, cpu, workers=2))
    resumed = list(train_batches(streamed.train, 3, range(2, 4), 5, cpu, workers=2))
    for a, b in zip(want, got):
        assert all(torch.equal(s, t) for s, t in zip(a, b))
    for a, b in zip(want[2:], resumed):
        assert all(torch.equal(s, t) for s, t in zip(a, b))


def test_building_a_streamed_set_decodes_only_the_statistics_sample(tmp_path, monkeypatch):
    from deeprecipe.data import boxfiles

    yolo_set(tmp_path, 90, w=16, h=16, box=(2, 2, 8, 8))
    decoded = []
    monkeypatch.setattr(boxfiles, "read", lambda p, c, read=boxfiles.read: decoded.append(p) or read(p, c))
    with pytest.warns(UserWarning, match="90 images streamed from disk"):
        data = yolo_cfg(tmp_path, size=(16, 16), val_fraction=0, in_memory_mb=0).build()
    assert len(data.train) == 90 and len(decoded) == 64


def test_the_image_cache_is_written_once_reused_and_replaced_when_files_change(tmp_path, monkeypatch):
    import os

    from deeprecipe.data import boxfiles

    yolo_set(tmp_path, 6)
    cfg = yolo_cfg(tmp_path, val_fraction=0, in_memory_mb=0, cache=True)
    plain = yolo_cfg(tmp_path, val_fraction=0, in_memory_mb=0).build().train.dataset
    first = cfg.build().train.dataset
    want = [first[i][0] for i in range(6)]  # decoded and written
    assert all(torch.equal(a, plain[i][0]) for i, a in enumerate(want))
    decoded = []
    monkeypatch.setattr(boxfiles, "read", lambda p, c, read=boxfiles.read: decoded.append(p) or read(p, c))
    again = cfg.build().train.dataset
    assert all(torch.equal(again[i][0], w) for i, w in enumerate(want)) and decoded == []
    cache_dir = tmp_path / ".deeprecipe-cache"
    before = sorted(p.name for p in cache_dir.iterdir())
    st = os.stat(tmp_path / "images" / "002.png")
    os.utime(tmp_path / "images" / "002.png", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    cfg.build()
    after = sorted(p.name for p in cache_dir.iterdir())
    assert len(after) == len(before) == 2 and after != before  # a new cache replaces the old one
    cfg.size = (16, 16)
    assert cfg.build().train.dataset[0][0].shape == (3, 16, 16)


def test_letterbox_keeps_the_aspect_and_boxes_come_back_at_their_pixels(tmp_path):
    """An 80 x 40 image with a bright rectangle over columns 20..39, rows 10..29, letterboxed into 32 x 32: the
    image is scaled by 0.4 and centred (8 rows of padding above); a detector that reports the bright pixels'
    box in the model's image gets it back at the rectangle's own pixels through predict's mapping."""
    from deeprecipe.data.detect import placement, to_image_boxes, to_model_boxes
    from deeprecipe.families.detect import detect_images

    yolo_set(tmp_path, 1, w=80, h=40, box=(20, 10, 40, 30))
    data = yolo_cfg(tmp_path, size=(32, 32), letterbox=True, val_fraction=0).build()
    x, b, y = data.train.tensors
    assert b[0, 0].tolist() == pytest.approx([8.0, 12.0, 16.0, 20.0]) and y[0, 0] == 0
    assert (x[0, :, :8] == 114).all() and (x[0, :, 24:] == 114).all()  # the padding, above and below
    place = placement(80, 40, (32, 32), True)
    assert place == (0.4, 0.4, 0.0, 8.0)
    back = to_image_boxes(to_model_boxes(torch.tensor([[20.0, 10.0, 40.0, 30.0]]), place), place, 80, 40)
    assert back.tolist() == [[20.0, 10.0, 40.0, 30.0]]

    class Bright(torch.nn.Module):  # "detects" the red pixels of the (normalized) image
        def detect(self, x):
            rows, cols = (x[0, 0] > 1.0).any(1).nonzero().flatten(), (x[0, 0] > 1.0).any(0).nonzero().flatten()
            box = torch.tensor([[cols[0], rows[0], cols[-1] + 1, rows[-1] + 1]]).float()
            return [(box, torch.ones(1), torch.zeros(1, dtype=torch.long))]

    class Runtime:
        device = torch.device("cpu")

        def autocast(self):
            import contextlib

            return contextlib.nullcontext()

    spec = DataSpec(image_size=(32, 32), class_names=["a", "b"], mean=(0.2,) * 3, std=(0.3,) * 3, extra=data.spec.extra)
    from deeprecipe.data.image_ops import read

    got = detect_images(Bright(), spec, Runtime(), [read(tmp_path / "images" / "000.png", 3)])[0]["boxes"][0]
    assert got == pytest.approx([20.0, 10.0, 40.0, 30.0], abs=2.5)
    squashed = yolo_cfg(tmp_path, size=(32, 32), val_fraction=0).build()
    assert squashed.train.tensors[1][0, 0].tolist() == pytest.approx([8.0, 8.0, 16.0, 24.0])


def voc_split_set(root, difficult_in_test=True):
    """A VOC folder with official lists: train a b, val c, test d; d's person is difficult, test has no car."""
    (root / "Annotations").mkdir(parents=True)
    (root / "ImageSets" / "Main").mkdir(parents=True)
    write_images(root / "JPEGImages", [f"{n}.png" for n in "abcd"], w=48, h=48)
    objs = {
        "a": [("car", (3, 3, 20, 20)), ("person", (25, 5, 40, 40))],
        "b": [("car", (5, 5, 30, 30))],
        "c": [("person", (5, 5, 30, 30))],
        "d": [("person", (5, 5, 30, 30)), ("person", (32, 32, 46, 46))],
    }
    for n, o in objs.items():
        xml = voc_xml(f"{n}.png", o, w=48, h=48)
        if n == "d" and difficult_in_test:
            xml = xml.replace("</name>", "</name><difficult>1</difficult>", 1)
        (root / "Annotations" / f"{n}.xml").write_text(xml)
    for k, ids in (("train", "a\nb\n"), ("val", "c\n"), ("test", "d\n")):
        (root / "ImageSets" / "Main" / f"{k}.txt").write_text(ids)
    return root


def test_voc_official_lists_and_difficult_boxes_mAP_ignores(tmp_path):
    voc_split_set(tmp_path)
    data = BoxFilesData(path=str(tmp_path), format="voc", classes=["car", "person"], size=(48, 48)).build()
    assert (len(data.train), len(data.val), len(data.test)) == (2, 1, 1)
    x, b, y = data.test.tensors
    assert y[0].tolist() == [-3, 1]  # the difficult person: ignored(1) = -3
    truth = b[0, 1]
    m = DetectionMetrics(2)
    hit = (truth[None], torch.tensor([0.5]), torch.tensor([1]))
    m.update([hit], b, y)
    assert m.compute()["map"] == pytest.approx(1.0)  # the difficult one is not a miss
    m = DetectionMetrics(2)
    on_difficult = (torch.stack([b[0, 0], truth]), torch.tensor([0.9, 0.5]), torch.tensor([1, 1]))
    m.update([on_difficult], b, y)
    assert m.compute()["map"] == pytest.approx(1.0)  # nor is a detection on it a false alarm
    counted = DetectionMetrics(2)
    counted.update([hit], b, y.clamp_min(-1).abs())  # the same box counted as a person: missed
    assert counted.compute()["map_50"] == pytest.approx(0.5, abs=0.01)


def test_coco_official_layout_maps_category_ids_and_keeps_its_split(tmp_path):
    (tmp_path / "annotations").mkdir()
    for split, names in (("train2017", ["a.png", "b.png"]), ("val2017", ["c.png"])):
        write_images(tmp_path / split, names)
        doc = {
            "images": [{"id": i, "file_name": n, "width": 40, "height": 30} for i, n in enumerate(names)],
            "annotations": [
                {"id": i, "image_id": i, "category_id": 7 if i else 3, "bbox": [1, 2, 10, 10], "iscrowd": int(i == 1)}
                for i in range(len(names))
            ],
            "categories": [{"id": 7, "name": "bus"}, {"id": 3, "name": "car"}],
        }
        (tmp_path / "annotations" / f"instances_{split}.json").write_text(json.dumps(doc))
    data = BoxFilesData(path=str(tmp_path), format="coco", size=(30, 40)).build()
    assert data.spec.class_names == ["car", "bus"] and len(data.train) == 2 and len(data.val) == 1
    assert data.test is None and data.train.tensors[2][:, 0].tolist() == [0, -3]  # b's bus is a crowd region


def test_yolo_split_folders_and_a_label_without_its_image(tmp_path):
    for k, n in (("train", 4), ("val", 2)):
        lines = draw_set(tmp_path / "images" / k, n)
        (tmp_path / "labels" / k).mkdir(parents=True)
        for i, line in enumerate(lines):
            (tmp_path / "labels" / k / f"{i:03d}.txt").write_text(line)
    (tmp_path / "labels" / "train" / "lost.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    cfg = yolo_cfg(tmp_path)
    with pytest.warns(UserWarning, match=r"1 label files without an image skipped \(e\.g\. .*lost\.txt"):
        data = cfg.build()
    assert (len(data.train), len(data.val), data.test) == (4, 2, None)
    cfg.strict = True
    with pytest.raises(DataError, match=r"lost\.txt: a label file without its image .*images/train/lost"):
        cfg.build()


def test_kitti_split_lists(tmp_path):
    write_images(tmp_path / "image_2", [f"{i:06d}.png" for i in range(3)])
    (tmp_path / "label_2").mkdir()
    for i in range(3):
        (tmp_path / "label_2" / f"{i:06d}.txt").write_text("Car 0.00 0 -0.2 10 5 20 25 1.7 0.6 0.8 1 1 9 0.1\n")
    (tmp_path / "ImageSets").mkdir()
    (tmp_path / "ImageSets" / "train.txt").write_text("000000\n000002\n")
    (tmp_path / "ImageSets" / "val.txt").write_text("000001\n")
    data = BoxFilesData(path=str(tmp_path), format="kitti", size=(30, 40)).build()
    assert (len(data.train), len(data.val), data.test) == (2, 1, None)
    (tmp_path / "ImageSets" / "val.txt").write_text("000001\n000009\n")
    with pytest.raises(DataError, match=r"val\.txt:2: no image .*000009"):
        BoxFilesData(path=str(tmp_path), format="kitti", size=(30, 40)).build()


def test_map_with_crowd_regions_equals_pycocotools_cocoeval(tmp_path):
    """A COCO set of 4 images (two categories with ids 2 and 9, crowd regions, boxes of every size) and
    detections near them, some on crowd regions, some false: the family's mAP numbers (the file read by
    boxfiles, the metric by DetectionMetrics) equal COCOeval's on the same JSON within 1e-4."""
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    g = torch.Generator().manual_seed(0)
    W, H = 240, 200
    write_images(tmp_path / "images", [f"{i}.png" for i in range(4)], w=W, h=H)
    anns, dets, k = [], [], 0
    for i in range(4):
        for j in range(5):
            w, h = (6 + 110 * torch.rand(2, generator=g)).tolist()
            x, y = float(torch.rand(1, generator=g)) * (W - w), float(torch.rand(1, generator=g)) * (H - h)
            cat, crowd = (2, 9)[(i + j) % 2], int(j == 4)
            k += 1
            anns.append(
                {"id": k, "image_id": i, "category_id": cat, "bbox": [x, y, w, h], "area": w * h, "iscrowd": crowd}
            )
            for _ in range(2):  # two noisy detections per object, one sometimes of the wrong class
                n = (torch.randn(4, generator=g) * 0.12 * torch.tensor([w, h, w, h])).tolist()
                wrong = float(torch.rand(1, generator=g)) < 0.2
                dets.append(
                    {
                        "image_id": i,
                        "category_id": (9, 2)[(i + j) % 2] if wrong else cat,
                        "bbox": [x + n[0], y + n[1], max(w + n[2], 2.0), max(h + n[3], 2.0)],
                        "score": round(float(torch.rand(1, generator=g)), 4),
                    }
                )
        dets.append({"image_id": i, "category_id": 2, "bbox": [5.0, 5.0, 30.0, 30.0], "score": 0.55})
    doc = {
        "images": [{"id": i, "file_name": f"{i}.png", "width": W, "height": H} for i in range(4)],
        "annotations": anns,
        "categories": [{"id": 9, "name": "bus"}, {"id": 2, "name": "car"}],
    }
    (tmp_path / "annotations.json").write_text(json.dumps(doc))
    data = BoxFilesData(path=str(tmp_path), format="coco", size=(H, W), val_fraction=0, test_fraction=0).build()
    _, boxes, labels = data.train.tensors
    contiguous = {2: 0, 9: 1}
    per_image = []
    for i in range(4):
        d = [e for e in dets if e["image_id"] == i]
        b = torch.tensor(
            [[e["bbox"][0], e["bbox"][1], e["bbox"][0] + e["bbox"][2], e["bbox"][1] + e["bbox"][3]] for e in d]
        )
        per_image.append(
            (b, torch.tensor([e["score"] for e in d]), torch.tensor([contiguous[e["category_id"]] for e in d]))
        )
    m = DetectionMetrics(2)
    m.update(per_image, boxes, labels)
    ours = m.compute()
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(tmp_path / "annotations.json"))
        ev = COCOeval(gt, gt.loadRes(dets), "bbox")
        ev.evaluate(), ev.accumulate(), ev.summarize()
    names = ["map", "map_50", "map_75", "map_small", "map_medium", "map_large"]
    for name, ref in zip(names, ev.stats[:6]):
        assert ours[name] == pytest.approx(ref, abs=1e-4), name
    assert ours["mar_100"] == pytest.approx(ev.stats[8], abs=1e-4)
    for c, cat in ((0, 2), (1, 9)):  # per class: COCOeval's precision table at that category
        p = ev.eval["precision"][:, :, ev.params.catIds.index(cat), 0, -1]
        assert ours["ap_per_class"][c] == pytest.approx(float(p[p > -1].mean()), abs=1e-4)
    assert 0.1 < ours["map"] < 0.9  # neither trivial nor empty


def test_a_class_without_test_boxes_is_reported_not_a_crash(tmp_path, cli):
    """Train on a streamed VOC set whose test split holds no car: the run finishes and says so."""
    root = voc_split_set(tmp_path / "voc", difficult_in_test=False)
    run = tmp_path / "run"
    sets = ["data.name=boxfiles", f"data.path={root}", "data.format=voc", "data.classes=[car,person]"]
    sets += ["data.size=[48,48]", "data.in_memory_mb=0", "model.width=4", "model.neck=8", "model.max_width=16"]
    sets += ["train.steps=2", "train.batch_size=2", "train.eval_every=0", "train.device=cpu", "train.workers=0"]
    code, _, err = cli("train", "scenes-detect", "--out", str(run), *[a for s in sets for a in ("--set", s)])
    assert code == 0, err
    ap = (run / "plots" / "ap.txt").read_text()
    assert "car              AP n/a (no boxes of class car in test)" in ap and "person           AP 0." in ap
    assert "no boxes of class car in test" in err


def coco_doc(**change):
    doc = {
        "images": [{"id": 1, "file_name": "a.png", "width": 40, "height": 30}],
        "annotations": [{"id": 5, "image_id": 1, "category_id": 1, "bbox": [1, 1, 5, 5]}],
        "categories": [{"id": 1, "name": "car"}],
    }
    return json.dumps(doc | change)


MALFORMED = {
    "COCO not JSON": ("coco", "annotations.json", '{"images": [\n  oops', r"annotations\.json: line 2: not valid JSON"),
    "COCO bbox not numbers": (
        "coco",
        "annotations.json",
        coco_doc(annotations=[{"id": 5, "image_id": 1, "category_id": 1, "bbox": ["a", 1, 5, 5]}]),
        r"annotations\.json: annotation 0 \(id 5\): bbox must be \[x, y, width, height\] numbers",
    ),
    "COCO image without file_name": (
        "coco",
        "annotations.json",
        coco_doc(images=[{"id": 1}]),
        r"annotations\.json: image 0: needs an id and a file_name",
    ),
    "COCO unknown image": (
        "coco",
        "annotations.json",
        coco_doc(annotations=[{"id": 5, "image_id": 9, "category_id": 1, "bbox": [1, 1, 5, 5]}]),
        r"annotation 0 \(id 5\): image_id 9 is not in images",
    ),
    "VOC list names a missing id": (
        "voc",
        "ImageSets/Main/train.txt",
        "a\nzz\n",
        r"train\.txt:2: no annotation .*zz\.xml",
    ),
    "VOC not XML": ("voc", "Annotations/a.xml", "<annotation><object>", r"a\.xml: line 1: not valid XML"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_a_malformed_annotation_file_is_one_line_naming_file_and_place(tmp_path, case):
    fmt, rel, text, message = MALFORMED[case]
    write_images(tmp_path / ("images" if fmt == "coco" else "JPEGImages"), ["a.png"])
    if fmt == "voc":
        (tmp_path / "Annotations").mkdir()
        (tmp_path / "Annotations" / "a.xml").write_text(voc_xml("a.png", [("car", (1, 1, 5, 5))]))
    (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / rel).write_text(text)
    with pytest.raises(DataError, match=message) as e:
        BoxFilesData(path=str(tmp_path), format=fmt, classes=["car"], size=(30, 40)).build()
    assert "\n" not in str(e.value)


def test_the_detection_checks_read_a_streamed_set_without_decoding_all_of_it(tmp_path, monkeypatch):
    from deeprecipe.data import boxfiles
    from deeprecipe.families.detect.checks import labels as label_check

    yolo_set(tmp_path, 80, w=32, h=32, box=(6, 6, 20, 22))
    cfg = load("scenes-detect", ["train.device=cpu", "model.width=8", "model.neck=16"])
    data = yolo_cfg(tmp_path, size=(32, 32), in_memory_mb=0).build()
    decoded = []
    monkeypatch.setattr(boxfiles, "read", lambda p, c, read=boxfiles.read: decoded.append(p) or read(p, c))
    ctx = Ctx(cfg, tmp_path / "check", get_family("detect"), data=data)
    assert label_check(ctx).status == "pass" and decoded == []  # the labels come from the annotations
    v = box_check(ctx)
    assert v.status == "pass", v
    assert len(decoded) == len(data.train) < 80  # the boxes check reads the first images of train only


@pytest.mark.slow
def test_a_resumed_streamed_run_equals_an_uninterrupted_one(tmp_path):
    from deeprecipe.engine import checkpoint, loop

    yolo_set(tmp_path / "set", 12, w=32, h=32, box=(6, 6, 20, 22))
    sets = ["data.name=boxfiles", f"data.path={tmp_path / 'set'}", "data.format=yolo", "data.classes=[a,b]"]
    sets += ["data.size=[32,32]", "data.in_memory_mb=0", "model.width=4", "model.neck=8", "model.max_width=16"]
    sets += ["train.batch_size=4", "train.ckpt_every=1", "train.eval_every=0", "train.device=cpu", "train.workers=2"]
    sets += ["train.limit_eval=4", "optim.schedule=constant"]  # the same lr at step 1 whether 1 or 2 steps
    loop.train(load("scenes-detect", [*sets, "train.steps=2"]), get_family("detect"), tmp_path / "a")
    loop.train(load("scenes-detect", [*sets, "train.steps=1"]), get_family("detect"), tmp_path / "b")
    loop.train(load("scenes-detect", [*sets, "train.steps=2"]), get_family("detect"), tmp_path / "b", resume=True)
    wa, _ = checkpoint.load(checkpoint.latest(tmp_path / "a" / "checkpoints"))
    wb, _ = checkpoint.load(checkpoint.latest(tmp_path / "b" / "checkpoints"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_duplicates_and_leakage_hash_the_files_of_a_streamed_set(tmp_path):
    import shutil

    from deeprecipe.checks.data import duplicates, leakage

    for k, n, box in (("train", 8, (8, 6, 20, 18)), ("val", 3, (2, 2, 12, 12))):
        yolo_set(tmp_path / k, n, box=box)
        shutil.move(tmp_path / k / "images", tmp_path / "images" / k)
        shutil.move(tmp_path / k / "labels", tmp_path / "labels" / k)
    train, val = tmp_path / "images" / "train", tmp_path / "images" / "val"
    shutil.copy(train / "003.png", train / "103.png")  # one image twice, annotated another way
    (tmp_path / "labels" / "train" / "103.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    shutil.copy(train / "005.png", val / "105.png")  # a training image in val
    (tmp_path / "labels" / "val" / "105.txt").write_text((tmp_path / "labels" / "train" / "005.txt").read_text())
    data = yolo_cfg(tmp_path, in_memory_mb=0).build()
    ctx = Ctx(load("scenes-detect", ["train.device=cpu"]), tmp_path / "check", get_family("detect"), data=data)
    assert duplicates(ctx).measured.startswith("1 exact (11.1%), 1 with conflicting labels")
    assert leakage(ctx).measured == "val: 1 of 4 also in train"


def test_coco_split_files_given_by_name(tmp_path):
    write_images(tmp_path / "images", ["a.png", "b.png"])
    for k, name in (("tr", "a.png"), ("va", "b.png")):
        doc = json.loads(coco_doc())
        doc["images"][0]["file_name"] = name
        (tmp_path / f"{k}.json").write_text(json.dumps(doc))
    cfg = BoxFilesData(path=str(tmp_path), format="coco", size=(30, 40), train_ann="tr.json", val_ann="va.json")
    data = cfg.build()
    assert (len(data.train), len(data.val), data.test) == (1, 1, None)
    cfg.train_ann = ""
    with pytest.raises(DataError, match="without data.train_ann"):
        cfg.build()
