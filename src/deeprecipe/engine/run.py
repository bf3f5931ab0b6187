"""The run folder: resolved config, metrics.jsonl, TensorBoard events, status, plots and report.html."""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import shutil
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from deeprecipe.config import Config, apply_overrides, dump, read_recipe
from deeprecipe.core import DataSpec, UserError
from deeprecipe.engine.atomic import atomic_text
from deeprecipe.recipe import resolve


def new_run_dir(recipe: str, out: str | None) -> Path:
    if out:
        return Path(out)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{Path(recipe).stem}-{stamp}"


def clean_temporaries(run_dir: Path) -> list[Path]:
    """Remove what a writer killed mid-write left behind in a run folder (a run starting or resuming calls it):
    `.NAME.tmp<PID>` files of processes that are gone (engine/atomic.py) and `.step-N.partial` folders
    (checkpoint.save). A temporary of a live process (an `eval` writing a plot) is left alone."""
    removed = []
    for p in Path(run_dir).rglob(".*.tmp*"):
        pid = p.name.rsplit(".tmp", 1)[-1]
        if p.is_file() and pid.isdigit() and not process_alive(int(pid)):
            p.unlink(missing_ok=True)
            removed.append(p)
    for p in (Path(run_dir) / "checkpoints").glob(".step-*.partial"):
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    return removed


def process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists but belongs to someone else
        return True
    return True


class Run:
    """Writes a run's files (only on the main process; elsewhere every method is a no-op)."""

    def __init__(
        self, path: Path, cfg: Config, main: bool = True, resume_step: int = 0, command: str = "", why: str = ""
    ):
        self.path, self.cfg, self.main = Path(path), cfg, main
        self.tb = self.mlflow = None
        if not main:
            return
        (self.path / "plots").mkdir(parents=True, exist_ok=True)
        clean_temporaries(self.path)
        # `why`: the choices the engine made for this machine (precision auto -> ...), as a comment the loader skips
        atomic_text(self.path / "config.yaml", "".join(f"# {line}\n" for line in why.splitlines() if line) + dump(cfg))
        cmd = command or shlex.join(["deeprecipe", *sys.argv[1:]])
        history = self.path / "commands.txt"
        with open(history, "a") as f:
            f.write(cmd + "\n")
        # on resume, forget what was logged after the checkpoint: those steps are being redone
        self.metrics_path = self.path / "metrics.jsonl"
        if self.metrics_path.exists():
            keep = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
            atomic_text(self.metrics_path, "".join(json.dumps(r) + "\n" for r in keep))
        try:
            from torch.utils.tensorboard import SummaryWriter

            if "tensorboard" in cfg.train.loggers:
                self.tb = SummaryWriter(str(self.path / "tb"), purge_step=resume_step + 1 if resume_step else None)
        except ImportError:  # TensorBoard is optional at run time; metrics.jsonl always has everything
            self.tb = None
        if "mlflow" in cfg.train.loggers:
            from deeprecipe.engine.tracking import MLflow

            self.mlflow = MLflow(self.path, cfg, resume=resume_step > 0)
        self.status("running", step=resume_step)

    def log(self, step: int, **values: Any) -> None:
        if not self.main:
            return
        row = {"step": step, "time": round(time.time(), 3), **values}
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, step)
        if self.mlflow is not None:
            self.mlflow.log(step, values)

    def status(self, status: str, **extra: Any) -> None:
        if self.main:
            info = {"status": status, "recipe": self.cfg.recipe, "task": self.cfg.task, **extra}
            atomic_text(self.path / "status.json", json.dumps(info, indent=1))
        if status == "failed" and self.mlflow is not None:
            self.mlflow.close("FAILED")
            self.mlflow = None

    def close(self) -> None:
        """The end of a run, after its report is written (a tracker keeps the report with the run)."""
        if self.tb is not None:
            self.tb.close()
        if self.mlflow is not None:
            self.mlflow.close()


def read_metrics(path: Path) -> list[dict]:
    p = Path(path) / "metrics.jsonl"
    if not p.exists():
        return []
    rows = []
    for ln in p.read_text().splitlines():
        try:
            rows.append(json.loads(ln))
        except json.JSONDecodeError:  # a line cut short by a killed process
            pass
    return rows


def read_status(path: Path) -> dict:
    p = Path(path) / "status.json"
    return json.loads(p.read_text()) if p.exists() else {}


def read_config(run: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """The resolved config of a run folder (config.yaml), with `overrides` applied."""
    run_dir = Path(run)
    if not (run_dir / "config.yaml").is_file():
        raise UserError(f"{run}: not a run folder (no config.yaml); list runs with 'deeprecipe runs'")
    raw, _ = read_recipe(str(run_dir / "config.yaml"))
    return resolve(apply_overrides(raw, list(overrides)), raw.get("recipe", ""))


def without_start(cfg: Config) -> Config:
    """The config with no pretrained start (model.weights ""): the run's checkpoint holds every tensor, so a run
    is loaded without the weights file or a download, on any machine (spec.json keeps the inputs they asked)."""
    if "weights" not in {f.name for f in dataclasses.fields(cfg.model)} or not cfg.model.weights:
        return cfg
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, weights=""))


def load_run(run: str | Path, family, device: str = "auto", precision: str = "auto"):
    """(cfg, spec, model with its inference weights in eval mode, runtime) of a finished or running run folder.
    `family` (deeprecipe/family.py) builds the model; the caller resolves it from cfg.task."""
    from deeprecipe.engine import checkpoint
    from deeprecipe.engine.device import setup

    cfg = read_config(run)
    spec_path = Path(run) / "spec.json"
    if not spec_path.is_file():
        raise UserError(f"{run}: spec.json is missing; the run did not get as far as building its model")
    spec = DataSpec(**json.loads(spec_path.read_text()))
    spec.image_size = tuple(spec.image_size)
    rt = setup(device, precision)
    model = family.build_model(without_start(cfg), spec)
    weights = checkpoint.inference_weights(Path(run))
    try:
        missing, unexpected = model.load_state_dict(weights, strict=False)
    except RuntimeError as e:  # shapes differ: e.g. a tokenizer (vocabulary) that is not the checkpoint's
        raise UserError(
            f"{run}: checkpoint does not match the model of config.yaml and spec.json "
            f"({str(e).splitlines()[-1].strip()[:200]})"
        ) from None
    if missing or unexpected:
        raise UserError(
            f"{run}: checkpoint does not match the model of config.yaml "
            f"(missing {list(missing)[:3]}, unexpected {list(unexpected)[:3]})"
        )
    model.to(rt.device).eval()
    return cfg, spec, model, rt
