"""What a user sees agrees with itself: one rule for which weights are the model (train's final report, eval,
runs, serve, export), labelled numbers, progress without a terminal, and a CLI whose every flag says what it does."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import TINY, sets
from deeprecipe.engine import checkpoint
from deeprecipe.engine.run import read_status

CNN = [*TINY, "model.channels=[8, 16]", "model.dense=[16]", "train.steps=6", "train.eval_every=2"]


def train(cli, out: Path, *extra: str) -> str:
    code, stdout, err = cli("train", "digits-cnn", "--out", out, *sets(*CNN, *extra))
    assert code == 0, err
    return stdout


def line(text: str, start: str) -> str:
    return next(ln for ln in text.splitlines() if ln.startswith(start))


@pytest.fixture
def val_accs(monkeypatch):
    """fake(a, b, c): the val accuracies of the evaluations at steps 2, 4 and 6 (test and train are real)."""
    from deeprecipe.families.classify import Classify

    real = Classify.evaluate

    def fake(*accs: float) -> None:
        it = iter(accs)

        def evaluate(self, model, data, split, cfg, rt, final):
            out = real(self, model, data, split, cfg, rt, final)
            return out | {"acc": next(it)} if split == "val" else out

        monkeypatch.setattr(Classify, "evaluate", evaluate)

    return fake


# ---------------------------------------------------------------------------------------------- which weights


def test_a_tie_keeps_the_later_step_and_every_verb_names_it(cli, tmp_path, val_accs):
    val_accs(0.5, 0.5, 0.5)
    out = tmp_path / "runs" / "tie"
    stdout = train(cli, out)
    _, about = checkpoint.model_weights(out, load=False)
    assert about.file == "best.safetensors" and about.step == 6
    val_acc = read_status(out)["final"]["val_acc"]
    said = f"weights: best.safetensors (step 6, val acc {val_acc:.4f})"
    assert line(stdout, "weights:") == said and val_acc == 0.5
    code, _, err = cli("eval", out, "--device", "cpu")
    assert code == 0 and said in err.splitlines()
    code, stdout, _ = cli("runs", "--dir", out.parent)
    assert code == 0 and f"best val_acc={val_acc:.4f} @ step 6" in stdout


def test_train_reports_the_model_that_eval_serve_and_export_use(cli, tmp_path, val_accs):
    """The best validation metric comes at step 2 of 6: train's final report (val and test), eval, runs, serve's
    /info and export's summary are all of the step-2 weights, and each says so."""
    from fastapi.testclient import TestClient

    from deeprecipe.cli.runs import open_run
    from deeprecipe.serve.export import export_run
    from deeprecipe.serve.server import ServeOptions, build_app

    val_accs(0.9, 0.5, 0.5)
    out = tmp_path / "runs" / "best2"
    stdout = train(cli, out, "optim.lr=3e-3")
    status = read_status(out)
    final = status["final"]
    assert status["best"] == {"acc": 0.9} and status["best_step"] == 2 and final["val_acc"] == 0.9
    assert line(stdout, "weights:") == "weights: best.safetensors (step 2, val acc 0.9000)"
    printed = dict(kv.split("=") for kv in line(stdout, "val_loss=").split())
    assert set(printed) >= {"val_acc", "val_loss", "test_acc", "test_loss"}  # every number names its split
    assert float(printed["test_loss"]) == pytest.approx(final["test_loss"], abs=1e-4)

    code, stdout, err = cli("eval", out, "--json", "--device", "cpu")
    assert code == 0, err
    m = json.loads(stdout)
    assert m["loss"] == pytest.approx(final["test_loss"], rel=1e-5) and m["acc"] == pytest.approx(final["test_acc"])
    assert m["split"] == "test" and m["step"] == 2 and "weights: best.safetensors (step 2" in err

    code, stdout, _ = cli("runs", "--dir", out.parent)
    assert "best val_acc=0.9000 @ step 2" in stdout

    loaded = open_run(str(out), "cpu", "fp32")
    with TestClient(build_app(str(out), *loaded, ServeOptions())) as c:
        info = c.get("/info").json()
    assert info["step"] == 2 and info["weights"].startswith("best.safetensors (step 2")
    s = export_run(str(out), loaded[-1], loaded[2], loaded[1], "pt2", str(tmp_path / "m.pt2"))
    summary = json.loads((tmp_path / "m.json").read_text())
    assert s["step"] == summary["step"] == 2 and summary["weights"] == info["weights"]


def test_without_a_val_split_every_number_says_train(cli, tmp_path):
    """Without a val split the evaluations watch the training split (as a GAN's FID does): the best weights are
    chosen there, and the final report, the weights line and runs say train, not val."""
    out = tmp_path / "runs" / "noval"
    stdout = train(cli, out, "data.val_fraction=0")
    final, status = read_status(out)["final"], read_status(out)
    assert "train_acc" in final and "test_acc" in final and not any(k.startswith("val_") for k in final)
    said = f"weights: best.safetensors (step {status['best_step']}, train acc {status['best']['acc']:.4f})"
    assert line(stdout, "weights:") == said
    code, _, err = cli("eval", out, "--device", "cpu")
    assert code == 0 and said in err.splitlines()
    code, stdout, _ = cli("runs", "--dir", out.parent)
    assert f"best train_acc={status['best']['acc']:.4f}" in stdout


def test_without_an_evaluation_metric_the_model_is_the_last_checkpoint(tmp_path):
    out = tmp_path / "run"
    checkpoint.save(out / "checkpoints", 7, {"model.w": torch.ones(2), "ema.w": torch.zeros(2)}, {"step": 7})
    weights, about = checkpoint.model_weights(out)
    assert about == ("step-0000007/model.safetensors", 7, "last checkpoint (step 7, EMA)")
    assert torch.equal(weights["w"], torch.zeros(2))  # the EMA weights, as evaluated


# ---------------------------------------------------------------------------------------------- progress


def test_training_prints_progress_lines_without_a_terminal(cli, tmp_path, monkeypatch):
    from deeprecipe.engine import loop

    monkeypatch.setattr(loop, "PROGRESS_EVERY", 0.0)  # a line every step (the default: every 10 seconds)
    code, _, err = cli("train", "digits-cnn", "--out", tmp_path / "r", *sets(*CNN))
    assert code == 0, err  # capsys: stderr is not a terminal, so tqdm draws nothing
    lines = [ln for ln in err.splitlines() if ln.startswith("step ")]
    assert [ln.split()[1] for ln in lines] == [f"{k}/6" for k in range(1, 7)]
    assert "loss " in lines[-1] and " ex/s" in lines[-1] and lines[-1].endswith("ETA 0:00:00")


def test_lr_find_prints_progress(cli, tmp_path):
    code, _, err = cli("lr-find", "digits-mlp", "--out", tmp_path / "lr", "--steps", "20", *sets(*TINY))
    assert code == 0, err
    assert err.splitlines()[0].startswith("lr-find digits-mlp: 20 steps")
    steps = [ln.split()[1] for ln in err.splitlines() if ln.startswith("  step ")]
    assert steps[:3] == ["2/20", "4/20", "6/20"]


# ---------------------------------------------------------------------------------------------- the CLI


def test_every_argument_of_every_verb_has_help():
    import argparse

    from deeprecipe.cli import build_parser

    parser = build_parser()
    [verbs] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    missing = [
        f"{verb} {a.option_strings[0] if a.option_strings else a.dest}"
        for verb, p in verbs.choices.items()
        for a in p._actions
        if not isinstance(a, argparse._HelpAction) and not a.help
    ]
    assert not missing, f"arguments without help=: {missing}"


def test_version(capsys):
    from importlib.metadata import version

    from deeprecipe.cli import main

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    want = f"deeprecipe {version('deeprecipe')}"  # pyproject.toml's version, as installed
    assert e.value.code == 0 and capsys.readouterr().out.strip() == want


@pytest.mark.skipif(not shutil.which("make"), reason="make is not installed")
def test_make_demo_says_what_it_does_runs_again_and_ends_with_the_report():
    root = Path(__file__).resolve().parents[1]
    cmd = ["make", "--no-print-directory", "-n", "-B", "demo", "TORCH_INDEX=https://download.pytorch.org/whl/cpu"]
    lines = subprocess.run(cmd, cwd=root, capture_output=True, text=True, check=True).stdout.splitlines()
    setup = lines[: next(i for i, ln in enumerate(lines) if "deeprecipe train" in ln)]
    assert setup[0].startswith("echo ") and "--index-url https://download.pytorch.org/whl/cpu torch" in "\n".join(setup)
    [install] = [ln for ln in setup if "-e '.[dev]'" in ln]
    assert " -q" not in install  # pip shows what it downloads the first time
    [train] = [ln for ln in lines if "deeprecipe train digits-cnn" in ln]
    run = train.split("--out ")[1].split()[0]
    assert f"rm -rf {run}" in lines[lines.index(train) - 1]  # a second make demo starts a fresh run
    assert lines[-1] == f'echo "report: {run}/report.html"'
