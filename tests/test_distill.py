"""Knowledge distillation (the `distill` config section, families/classify): the soft-target term against the KL
written out, a student equal to its teacher, and a student taught by the teacher alone (no labels); attention
transfer's map against its formula, zero for a student equal to its teacher (also under mirror averaging), a student
taught by it looking where its teacher looks, and its one-line refusals."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from conftest import TINY, sets
from deeprecipe.cli import main, open_run
from deeprecipe.families import get_family
from deeprecipe.families.classify import attention_map, captured, distill_loss
from deeprecipe.recipe import load

pytestmark = pytest.mark.usefixtures("one_thread")
SMALL = ["train.batch_size=32", "model.channels=[8,16]", "model.dense=[32]"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "teacher"
    assert main(["train", "digits-cnn", "--out", str(out), *sets(*TINY, *SMALL, "train.steps=200")]) == 0
    return out


def test_the_soft_target_term_is_the_kl_written_out():
    g = torch.Generator().manual_seed(0)
    s, t, T = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g), 3.0
    p = (t / T).softmax(-1)
    kl = (p * (p.log() - (s / T).log_softmax(-1))).sum(-1).mean() * T * T
    assert distill_loss(s, t, T) == pytest.approx(float(kl), rel=1e-5)
    assert distill_loss(t, t, T) == pytest.approx(0.0, abs=1e-6)


def test_a_student_equal_to_its_teacher_has_only_the_label_term(teacher):
    cfg_t, spec, model, rt, _ = open_run(str(teacher), "cpu")
    family = get_family("classify")
    data = cfg_t.data.build()
    x, y = family.prepare(data.test.take(torch.arange(32)), spec, None)
    for w in (0.0, 0.3, 1.0):
        cfg = load("digits-cnn", [*TINY, *SMALL, f"distill.teacher={teacher}", f"distill.weight={w}"])
        family.build_model(cfg, spec)  # the student's spec, which the teacher is checked against
        student = copy.deepcopy(model)
        loss, logs = family.loss(student, (x, y), cfg, "model")
        with torch.no_grad():
            ce = F.cross_entropy(model(x).float(), y, label_smoothing=cfg.optim.label_smoothing)
        assert float(logs["kd"]) == pytest.approx(0.0, abs=1e-5)
        assert float(loss.detach()) == pytest.approx((1 - w) * float(ce), abs=1e-5)


def test_loading_the_teacher_leaves_the_random_stream_alone(teacher):
    """The teacher loads at the first loss: its init draws must not shift the run's dropout and augmentation."""
    cfg = load("digits-cnn", [*TINY, *SMALL, f"distill.teacher={teacher}"])
    family = get_family("classify")
    student = family.build_model(cfg, cfg.data.build().spec)
    x, y = torch.zeros(2, 1, 8, 8), torch.zeros(2, dtype=torch.long)
    before = torch.get_rng_state()
    family.loss(student.eval(), (x, y), cfg, "model")
    assert torch.equal(torch.get_rng_state(), before)


def test_a_student_learns_from_the_teacher_alone(teacher, tmp_path):
    """weight 1: the labels carry no weight in the loss, so what the student knows comes from the teacher."""
    out = tmp_path / "student"
    over = [*TINY, "train.steps=150", "train.batch_size=32", "model.channels=[4,8]", "model.dense=[16]"]
    over += [f"distill.teacher={teacher}", "distill.weight=1"]
    assert main(["train", "digits-cnn", "--out", str(out), *sets(*over)]) == 0
    final = json.loads((out / "status.json").read_text())["final"]
    assert final["test_acc"] > 0.6  # chance is 0.1


def test_a_bad_teacher_is_one_line(cli, tmp_path):
    code, out, err = cli("train", "digits-cnn", "--out", tmp_path / "r", *sets(*TINY, "distill.teacher=nowhere"))
    assert code == 2 and "distill.teacher=nowhere: not a run folder" in err and len(err.strip().splitlines()) == 1
    code, out, err = cli("train", "scenes-unet", "--out", tmp_path / "s", *sets(*TINY, "distill.teacher=nowhere"))
    assert code == 2 and "distillation is for task classify" in err
    assert not (tmp_path / "r").exists() and not (tmp_path / "s").exists()


def test_the_attention_map_is_the_unit_channel_mean_of_squares():
    a = torch.randn(3, 5, 4, 6, generator=torch.Generator().manual_seed(0))
    want = torch.stack([(a[i] ** 2).sum(0).flatten() / (a[i] ** 2).sum(0).flatten().norm() for i in range(3)])
    assert torch.allclose(attention_map(a), want, atol=1e-6)
    assert torch.allclose(attention_map(7 * a), want, atol=1e-6)  # the scale of the activations does not count


@pytest.fixture(scope="module")
def mirrored_teacher(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "mirrored"
    over = [*TINY, *SMALL, "train.steps=100", "data.flip=true", "train.tta=flip"]
    assert main(["train", "digits-cnn", "--out", str(out), *sets(*over)]) == 0
    return out


@pytest.mark.parametrize("which", ["plain", "mirrored"])
def test_a_student_equal_to_its_teacher_looks_where_it_looks(which, teacher, mirrored_teacher):
    """Attention term 0 for a copy of the teacher; under train.tta=flip the teacher's maps are those of the images
    as given (its mirrored half would differ); a changed student gets a term > 0 with a gradient."""
    run = teacher if which == "plain" else mirrored_teacher
    _, spec, model, _, _ = open_run(str(run), "cpu")
    family = get_family("classify")
    x, y = family.prepare(load("digits-cnn", TINY).data.build().test.take(torch.arange(32)), spec, None)
    cfg = load("digits-cnn", [*TINY, *SMALL, f"distill.teacher={run}", "distill.weight=0", "distill.attention=50"])
    family.build_model(cfg, spec)
    student = copy.deepcopy(model)
    loss, logs = family.loss(student, (x, y), cfg, "model")
    assert float(logs["at"]) == pytest.approx(0.0, abs=1e-10)
    with torch.no_grad():
        student.features[0].weight.mul_(-1)
    loss, logs = family.loss(student, (x, y), cfg, "model")
    assert float(logs["at"]) > 1e-4
    loss.backward()
    assert student.features[0].weight.grad.abs().sum() > 0


def test_a_student_taught_by_attention_looks_more_like_its_teacher(teacher, tmp_path):
    """Trained on the attention term alone (weight 0: soft targets off), a student's maps come closer to the
    teacher's on test images than those of the same student trained on the labels alone."""
    small = [*TINY, "train.steps=150", "train.batch_size=32", "model.channels=[4,8]", "model.dense=[16]"]
    runs = {"alone": [], "taught": [f"distill.teacher={teacher}", "distill.weight=0", "distill.attention=100"]}
    for name, extra in runs.items():
        assert main(["train", "digits-cnn", "--out", str(tmp_path / name), *sets(*small, *extra)]) == 0
    _, spec, t_model, _, _ = open_run(str(teacher), "cpu")
    x, _ = get_family("classify").prepare(load("digits-cnn", TINY).data.build().test.take(torch.arange(128)), spec)

    def maps(net):
        with torch.no_grad(), captured(net.stage_outputs()) as out:
            net(x)
        return [attention_map(o) for o in out]

    ref = maps(t_model)
    dist = {}
    for name in runs:
        model = open_run(str(tmp_path / name), "cpu")[2]
        dist[name] = sum(float((a - b).pow(2).mean()) for a, b in zip(maps(model), ref))
    assert dist["taught"] < 0.5 * dist["alone"], dist


def test_attention_transfer_refusals_are_one_line(cli, teacher, tmp_path):
    cases = [
        (["distill.attention=10"], "attention transfer needs a teacher"),
        ([f"distill.teacher={teacher}", "distill.attention=10", "train.compile=true"], "set train.compile=false"),
        ([f"distill.teacher={teacher}", "distill.attention=10", "model.name=mlp", "model.hidden=[16]"], "no stage"),
        ([f"distill.teacher={teacher}", "distill.attention=10", "model.channels=[4,8,16]"], "do not pair up"),
    ]
    for i, (extra, said) in enumerate(cases):
        base = [*TINY, "train.batch_size=32"] if "model.name=mlp" in extra else [*TINY, *SMALL]
        code, out, err = cli("train", "digits-cnn", "--out", tmp_path / f"r{i}", *sets(*base, *extra))
        assert code != 0 and said in err and len(err.strip().splitlines()) == 1, (extra, err)
        assert not (tmp_path / f"r{i}").exists()
