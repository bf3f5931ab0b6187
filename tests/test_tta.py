"""Test-time augmentation (train.tta=flip, families/classify): every door (evaluate, predict, export) gives the mean
of the plain net's logits on an image and on its mirror, computed here by hand as the oracle; bad settings fail
with one line."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import deeprecipe
from deeprecipe.core import ConfigError
from test_api import TINY as API_TINY

pytestmark = pytest.mark.usefixtures("one_thread")
TINY = API_TINY | {"data.flip": True, "train.tta": "flip"}  # the API tests' 20-step digits run, mirrored


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return deeprecipe.train("digits-cnn", TINY, out=tmp_path_factory.mktemp("tta") / "run")


def by_hand(model, x: torch.Tensor) -> torch.Tensor:
    """The oracle: the plain net on the images and on their mirrors, one at a time, averaged."""
    with torch.no_grad():
        return torch.stack([(model(v[None]) + model(v[None].flip(-1)))[0] / 2 for v in x])


def test_flip_average_is_the_mean_over_the_mirror(run):
    from deeprecipe.families.classify import FlipAverage

    model = run.model.eval()
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        got = FlipAverage(model)(x)
        torch.testing.assert_close(got, by_hand(model, x), rtol=1e-5, atol=1e-5)
        sym = torch.cat([x[..., :4], x[..., :4].flip(-1)], -1)  # mirror-symmetric images: the plain logits
        torch.testing.assert_close(FlipAverage(model)(sym), model(sym), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(got, model(x), atol=1e-3)  # the net is not mirror-invariant: TTA changes it


def test_evaluate_scores_the_flip_averaged_logits(run):
    data = deeprecipe.dataset("digits-cnn", {"data.flip": True})
    x, y = data.test.tensors
    spec = run.spec
    mean, std = torch.tensor(spec.mean).view(1, -1, 1, 1), torch.tensor(spec.std).view(1, -1, 1, 1)
    xf = ((x.float() / 255 - mean) / std).reshape(len(x), *[spec.in_channels, *spec.image_size])
    model = run.model.eval()
    acc = (by_hand(model, xf).argmax(-1) == y).float().mean().item()
    with torch.no_grad():
        plain = (model(xf).argmax(-1) == y).float().mean().item()
    assert run.evaluate("test")["acc"] == pytest.approx(acc, abs=1e-6)
    assert run.final["test_acc"] == pytest.approx(acc, abs=1e-6)
    assert acc != plain  # on 360 test digits, a 20-step net's answers change with the mirror


def test_predict_and_onnx_export_give_the_flip_average(run, tmp_path):
    from sklearn.datasets import load_digits

    img = (load_digits().images[7] * 15).astype(np.uint8)
    Image.fromarray(img, mode="L").save(tmp_path / "d.png")
    spec = run.spec
    x = ((torch.from_numpy(img).float()[None, None] / 255 - spec.mean[0]) / spec.std[0]).float()
    want = by_hand(run.model.eval(), x)[0].softmax(-1)
    got = run.predict([str(tmp_path / "d.png")], top=10)[0]
    probs = {t["label"]: t["prob"] for t in got["top"]}  # rounded to 4 places
    for i, name in enumerate(spec.class_names):
        assert probs[name] == pytest.approx(want[i].item(), abs=6e-5)
    path = run.export("onnx", out=tmp_path / "m.onnx")
    import onnxruntime as ort

    out = ort.InferenceSession(str(path)).run(None, {"image": x.numpy()})[0]
    np.testing.assert_allclose(out[0], by_hand(run.model.eval(), x)[0].numpy(), rtol=1e-4, atol=1e-4)


def test_flip_tta_without_flipped_training_images_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"^train.tta=flip .*data.flip is off.*: set data.flip=true"):
        deeprecipe.train("digits-cnn", TINY | {"data.flip": False}, out=tmp_path / "r")
    assert not (tmp_path / "r").exists()


def test_tta_on_a_family_without_it_is_refused(tmp_path):
    sets = {"train.steps": 1, "train.tta": "flip", "train.device": "cpu"}
    with pytest.raises(ConfigError, match=r"^train.tta=flip: task 'lm' has no test-time augmentation"):
        deeprecipe.train("shakespeare-char-gpt", sets, out=tmp_path / "r")


def test_a_flip_teacher_teaches_its_mirror_average(run):
    """distill.teacher trained with train.tta=flip: the soft targets are the teacher's mirror-averaged logits."""
    import copy

    from deeprecipe.families import get_family
    from deeprecipe.families.classify import distill_loss
    from deeprecipe.recipe import load

    cfg = load("digits-cnn", [f"{k}={v}" for k, v in TINY.items() if k != "train.tta"] + [f"distill.teacher={run.dir}"])
    family = get_family("classify")
    family.build_model(cfg, run.spec)
    x, y = torch.randn(6, 1, 8, 8), torch.arange(6)
    student = copy.deepcopy(run.model).eval()  # the plain net: its logits differ from the teacher's average
    _, logs = family.loss(student, (x, y), cfg, "model")
    with torch.no_grad():
        want = distill_loss(student(x).float(), by_hand(run.model.eval(), x), cfg.distill.temperature)
    assert float(logs["kd"]) == pytest.approx(float(want), abs=2e-5)
    assert float(want) > 1e-3  # a plain teacher (the student itself) would give 0
