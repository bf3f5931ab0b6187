"""Experiment trackers (train.loggers, engine/tracking.py): what MLflow receives equals what the run folder holds
(metrics.jsonl is the oracle), and a missing extra is one line naming it."""

from __future__ import annotations

import sys

import pytest

import deeprecipe
from deeprecipe.core import UserError

pytestmark = pytest.mark.usefixtures("one_thread")
TINY = {
    "train.steps": 4,
    "train.batch_size": 16,
    "train.device": "cpu",
    "train.precision": "fp32",
    "train.eval_every": 2,
    "train.ckpt_every": 4,
    "train.log_every": 1,
    "train.workers": 0,
}


def test_mlflow_gets_the_parameters_every_metric_the_config_and_the_report(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file:{tmp_path / 'mlruns'}")  # a local file store
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps the file store behind this switch
    run = deeprecipe.train("digits-cnn", TINY | {"train.loggers": ["mlflow"]}, out=tmp_path / "run")
    client = MlflowClient()
    run_id = (run.dir / "mlflow_run_id").read_text().strip()
    got = client.get_run(run_id)
    assert got.info.status == "FINISHED" and got.info.run_name == "run"
    assert client.get_experiment(got.info.experiment_id).name == "digits-cnn"
    assert got.data.params["optim.lr"] == str(run.config.optim.lr) and got.data.params["train.steps"] == "4"
    assert got.data.params["model.channels"] == str(list(run.config.model.channels))
    for key in ("loss", "lr", "val_acc"):
        want = [(r["step"], r[key]) for r in run.metrics if key in r]
        history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
        assert [s for s, _ in history] == [s for s, _ in want] and len(want) >= 2
        assert [v for _, v in history] == pytest.approx([v for _, v in want])
    assert {a.path for a in client.list_artifacts(run_id)} >= {"config.yaml", "report.html"}
    assert not (run.dir / "tb").exists()  # TensorBoard only when train.loggers names it


def test_a_missing_mlflow_is_one_line_naming_the_extra_and_leaves_no_run(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # `import mlflow` raises ImportError
    with pytest.raises(UserError, match=r"pip install 'deeprecipe\[mlflow\]'") as e:
        deeprecipe.train("digits-cnn", TINY | {"train.loggers": ["tensorboard", "mlflow"]}, out=tmp_path / "run")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "run").exists()


def test_an_unknown_logger_names_the_choices():
    with pytest.raises(UserError, match="did you mean 'mlflow'"):
        deeprecipe.configure("digits-cnn", {"train.loggers": ["mlflw"]})


def test_a_resumed_run_continues_its_mlflow_run(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file:{tmp_path / 'mlruns'}")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    sets = TINY | {"train.steps": 2, "train.ckpt_every": 2, "train.loggers": ["mlflow"]}
    first = deeprecipe.train("digits-cnn", sets, out=tmp_path / "run")
    run_id = (first.dir / "mlflow_run_id").read_text().strip()
    run = deeprecipe.train(first.dir, {"train.steps": 4}, resume=True)
    assert (run.dir / "mlflow_run_id").read_text().strip() == run_id
    client = MlflowClient()
    assert client.get_run(run_id).info.status == "FINISHED"
    steps = sorted(m.step for m in client.get_metric_history(run_id, "loss"))
    assert steps == [r["step"] for r in run.metrics if "loss" in r] == [1, 2, 3, 4]


def test_a_run_folder_from_before_train_loggers_resumes(tmp_path):
    run = deeprecipe.train("digits-cnn", TINY | {"train.steps": 2, "train.ckpt_every": 2}, out=tmp_path / "run")
    text = (run.dir / "config.yaml").read_text()
    old = "".join(ln for ln in text.splitlines(keepends=True) if "loggers" not in ln and "- tensorboard" not in ln)
    assert old != text
    (run.dir / "config.yaml").write_text(old)  # as written before the field existed: its default applies
    assert deeprecipe.train(run.dir, {"train.steps": 4}, resume=True).status["step"] == 4


def test_a_run_that_raises_ends_its_mlflow_run_failed(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    from deeprecipe.engine import loop

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file:{tmp_path / 'mlruns'}")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    made = []

    def stopped(*args):  # stopped during the first step, after the MLflow run was made
        def step(batches):
            made.append((tmp_path / "run" / "mlflow_run_id").read_text().strip())
            raise KeyboardInterrupt

        return step

    monkeypatch.setattr(loop, "stepper", stopped)
    with pytest.raises(KeyboardInterrupt):
        deeprecipe.train("digits-cnn", TINY | {"train.loggers": ["mlflow"]}, out=tmp_path / "run")
    assert MlflowClient().get_run(made[0]).info.status == "FAILED"
