"""Experiment trackers beside TensorBoard (train.loggers): MLflow gets a run's parameters (the resolved config as
dotted keys), every metric the loop logs (with its step), and at the end config.yaml and report.html.

The run goes to MLFLOW_TRACKING_URI when set, else to MLflow's own local default (mlflow.db and mlruns/ in the
working directory; the full mlflow package's `mlflow ui` shows them), in the experiment named after the recipe.
A resumed run continues the same MLflow run (its id is kept in the run folder as mlflow_run_id); a run that stops
on a NaN or raises ends FAILED (deeprecipe.train calls end_failed). Only MlflowClient is used, never MLflow's
process-wide active run, so runs trained one after another in a notebook stay apart.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from deeprecipe.config import Config, to_dict
from deeprecipe.core import require

ID_FILE = "mlflow_run_id"


def flat(tree: Any, prefix: str = "") -> dict[str, str]:
    """{"optim": {"lr": 0.003}} -> {"optim.lr": "0.003"} (MLflow parameters are strings)."""
    if isinstance(tree, dict):
        out: dict[str, str] = {}
        for k, v in tree.items():
            out |= flat(v, f"{prefix}{k}.")
        return out
    return {prefix[:-1]: str(tree)}


class MLflow:
    def __init__(self, run_dir: Path, cfg: Config, resume: bool):
        require("mlflow", "mlflow", "train.loggers: mlflow")
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.client, self.dir = MlflowClient(), Path(run_dir)
        name = cfg.recipe or "deeprecipe"
        found = self.client.get_experiment_by_name(name)
        experiment = found.experiment_id if found else self.client.create_experiment(name)
        id_file = self.dir / ID_FILE
        if resume and id_file.is_file():
            self.run_id = id_file.read_text().strip()
            self.client.update_run(self.run_id, status="RUNNING")
            return
        tags = {"deeprecipe.run_dir": str(self.dir.resolve()), "deeprecipe.task": cfg.task}
        self.run_id = self.client.create_run(experiment, run_name=self.dir.name, tags=tags).info.run_id
        id_file.write_text(self.run_id + "\n")
        params = [Param(k, v[:6000]) for k, v in flat(to_dict(cfg)).items()]  # MLflow's longest parameter value
        for i in range(0, len(params), 100):  # at most 100 parameters per call
            self.client.log_batch(self.run_id, params=params[i : i + 100])

    def log(self, step: int, values: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, step) for k, v in values.items() if _number(v)]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def close(self, status: str = "FINISHED") -> None:
        for name in ("config.yaml", "report.html"):
            if (self.dir / name).is_file():
                self.client.log_artifact(self.run_id, str(self.dir / name))
        self.client.set_terminated(self.run_id, status)


def end_failed(run_dir: Path) -> None:
    """The MLflow run of a run folder whose training raised ends FAILED (unless it already ended)."""
    id_file = Path(run_dir) / ID_FILE
    if not id_file.is_file():
        return
    from mlflow.tracking import MlflowClient

    client, run_id = MlflowClient(), id_file.read_text().strip()
    if client.get_run(run_id).info.status == "RUNNING":
        client.set_terminated(run_id, "FAILED")


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)
