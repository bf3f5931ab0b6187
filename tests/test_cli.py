"""The verbs end to end on digits: recipes, data, train (tiny), eval, predict, runs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from conftest import TINY, sets
from deeprecipe import config
from deeprecipe.data import image_ops
from deeprecipe.recipe import resolve

CNN = [*TINY, "model.channels=[8, 16]", "model.dense=[16]", "train.steps=6", "train.batch_size=32"]


@pytest.fixture
def run(cli, tmp_path) -> Path:
    out = tmp_path / "runs" / "tiny"
    code, stdout, err = cli("train", "digits-cnn", "--out", out, *sets(*CNN))
    assert code == 0, err
    assert f"run folder: {out}" in stdout and "test_acc=" in stdout
    return out


def test_recipes_lists_each_with_its_description(cli):
    code, out, _ = cli("recipes")
    assert code == 0
    lines = out.splitlines()
    assert len(lines) == len(config.list_recipes())
    for name, desc in config.list_recipes().items():
        assert any(ln.startswith(name + " ") and ln.endswith(desc) for ln in lines)


def test_data_shows_sizes_balance_and_a_grid(cli, tmp_path):
    code, out, err = cli("data", "digits-cnn", "--out", tmp_path / "grid.png")
    assert code == 0, err
    sizes = {ln.split(":")[0].strip(): int(ln.split()[1]) for ln in out.splitlines() if ln.endswith(" examples")}
    assert sum(sizes.values()) == 1797 and set(sizes) == {"train", "val", "test"}
    balance = out.split("class balance (train): ")[1].splitlines()[0]
    assert sum(int(kv.split("=")[1]) for kv in balance.split(", ")) == sizes["train"]
    assert (tmp_path / "grid.png").stat().st_size > 1000
    code, _, _ = cli("data")  # the default recipe, grid into the current folder
    assert code == 0 and Path("data-digits.png").is_file()


def test_train_writes_the_run_folder(run):
    cfg = resolve(yaml.safe_load((run / "config.yaml").read_text()))
    assert cfg.train.steps == 6 and cfg.model.channels == (8, 16)
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 7))
    assert any("val_acc" in r for r in rows)
    assert list((run / "tb").glob("events.out.tfevents.*"))
    for plot in ("curves.png", "confusion.png"):
        assert (run / "plots" / plot).stat().st_size > 1000
    status = json.loads((run / "status.json").read_text())
    assert status["status"] == "done" and status["step"] == 6 and 0 <= status["final"]["test_acc"] <= 1
    report = (run / "report.html").read_text()
    assert "deeprecipe train digits-cnn" in report and "curves.png" in report and "model:" in report
    assert json.loads((run / "spec.json").read_text())["num_classes"] == 10


def test_train_without_out_goes_under_runs(cli):
    code, _, err = cli("train", "digits-mlp", *sets(*TINY, "model.hidden=[8]", "train.steps=1"))
    assert code == 0, err
    made = list(Path("runs").glob("digits-mlp-*/config.yaml"))
    assert len(made) == 1


def test_eval_reports_the_test_split(cli, run):
    code, out, err = cli("eval", run, "--json", "--device", "cpu")
    assert code == 0, err
    m = json.loads(out)
    final = json.loads((run / "status.json").read_text())["final"]
    assert m["acc"] == pytest.approx(final["test_acc"], abs=1e-6)  # the same weights, the same split
    assert 0 <= m["acc"] <= m["top5"] <= 1
    n = sum(map(sum, m["confusion"]))
    assert n == 359 and len(m["precision"]) == len(m["recall"]) == 10
    assert sum(m["confusion"][i][i] for i in range(10)) / n == pytest.approx(m["acc"], abs=1e-6)
    code, out, err = cli("eval", run, "--device", "cpu")
    assert code == 0, err
    assert "test_acc:" in out and "precision  recall" in out and (run / "plots" / "confusion_test.png").is_file()


def test_predict_on_png_files_matches_the_model(cli, run, tmp_path):
    """Labels from `predict` (decode, normalize, forward) equal the model's own argmax on the same images."""
    from torchvision.io import write_png

    from deeprecipe.cli.runs import open_run
    from deeprecipe.data.images import DigitsData

    x, _ = DigitsData().build().test.take(torch.arange(6))
    files = []
    for i, img in enumerate(x):
        write_png(img, str(tmp_path / f"digit{i}.png"))
        files.append(tmp_path / f"digit{i}.png")
    code, out, err = cli("predict", run, *files, "--json", "--device", "cpu", "--top", "3")
    assert code == 0, err
    got = json.loads(out)
    assert [r["file"] for r in got] == [str(f) for f in files]
    for r in got:
        probs = [t["prob"] for t in r["top"]]
        assert len(probs) == 3 and probs == sorted(probs, reverse=True) and sum(probs) <= 1.0001
        assert r["label"] == r["top"][0]["label"]
    assert torch.is_grad_enabled()  # the CLI gives an in-process caller its gradient mode back
    try:
        cfg, spec, model, rt, family = open_run(str(run), "cpu")
        want = model(family.prepare((x, None), spec, None)[0]).argmax(-1)
    finally:
        torch.set_grad_enabled(True)  # in case loading a run turns gradients off for the process
    assert [r["label"] for r in got] == [spec.class_names[i] for i in want]
    code, out, _ = cli("predict", run, files[0], "--device", "cpu")
    assert code == 0 and out.startswith(f"{files[0]}: ")


def drawn_three(shift=(0, 0), width=5) -> np.ndarray:
    """A '3' drawn in black on a white 64 x 64 canvas, as a user draws one in a paint program."""
    from PIL import Image, ImageDraw

    im = Image.new("L", (64, 64), 255)
    pen, (dx, dy) = ImageDraw.Draw(im), shift
    pen.arc([14 + dx, 6 + dy, 44 + dx, 32 + dy], 200, 90, fill=0, width=width)
    pen.arc([14 + dx, 28 + dy, 44 + dx, 58 + dy], 270, 160, fill=0, width=width)
    return np.array(im)


def as_drawing(digit: torch.Tensor, at=(4, 18)) -> torch.Tensor:
    """A data set digit (1, 8, 8), light on black, as a drawing: 5x larger, black on white, off-centre in 64 x 64."""
    big = F.interpolate(digit[None].float(), scale_factor=5, mode="bilinear")[0]
    canvas = torch.full((1, 64, 64), 255.0)
    canvas[:, at[0] : at[0] + 40, at[1] : at[1] + 40] = 255 - big
    return canvas.round().clamp(0, 255).to(torch.uint8)


def test_predict_and_serve_read_a_drawing_as_the_digits_were_made(cli, tmp_path):
    """A 64 x 64 drawing of a '3' on white came back '1' (shrunk to 8 x 8 it is a grey smudge on white, where every
    training digit is light ink on black filling the frame). The digits data set records that form in its spec
    (ink_extent); predict and /classify both make a user's image so (image_ops.for_model)."""
    from fastapi.testclient import TestClient
    from PIL import Image

    from deeprecipe.cli.runs import open_run
    from deeprecipe.data.images import DigitsData
    from deeprecipe.serve.server import create_app

    run = tmp_path / "mlp"
    overrides = [*TINY, "train.steps=300", "train.batch_size=64", "train.ckpt_every=300"]
    assert cli("train", "digits-mlp", "--out", run, *sets(*overrides))[0] == 0
    threes = []
    for i, (shift, width) in enumerate([((0, 0), 5), ((-8, -4), 3), ((10, 2), 7)]):
        Image.fromarray(drawn_three(shift, width)).save(tmp_path / f"three{i}.png")
        threes.append(tmp_path / f"three{i}.png")
    code, out, err = cli("predict", run, *threes, "--json", "--device", "cpu")
    assert code == 0, err
    assert [r["label"] for r in json.loads(out)] == ["3", "3", "3"], out
    # digits of the test split drawn black on white, 5x larger and off-centre: read as the model reads the originals
    x = DigitsData().build().test.tensors[0][:40]
    try:
        cfg, spec, model, rt, family = open_run(str(run), "cpu")
        with torch.no_grad():
            want = model(family.prepare((x, None), spec, None)[0]).argmax(-1)
            drawn = torch.stack([image_ops.for_model(as_drawing(d), spec) for d in x])
            seen = model(family.prepare((drawn, None), spec, None)[0]).argmax(-1)
        assert (seen == want).float().mean() >= 0.9
        with TestClient(create_app(model, spec, cfg, rt, family)) as client:
            r = client.post("/classify", files={"image": ("3.png", threes[0].read_bytes(), "image/png")})
        assert r.status_code == 200 and r.json()["label"] == "3", r.text
    finally:
        torch.set_grad_enabled(True)


def test_runs_lists_status_and_best_metric(cli, run):
    code, out, _ = cli("runs", "--dir", run.parent)
    assert code == 0
    line = next(ln for ln in out.splitlines() if str(run) in ln)
    assert "done" in line and "acc=" in line
    code, out, _ = cli("runs", "--dir", "nowhere")
    assert code == 0 and "no runs" in out


@pytest.mark.parametrize("argv", [["--version"], ["--help"], ["train", "--help"], ["translate", "--help"]])
def test_the_parser_imports_neither_torch_nor_a_family(argv, subenv):
    """Starting the command stays light: building the parser (every verb's arguments) and answering --version or
    --help import no torch and no family; a verb imports them when it runs."""
    import subprocess
    import sys

    probe = (
        "import sys\nfrom deeprecipe.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
        "print([m for m in sys.modules if m == 'torch' or m.startswith('deeprecipe.families')])"
    )
    r = subprocess.run([sys.executable, "-c", probe, *argv], env=subenv, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[-1] == "[]", r.stdout
