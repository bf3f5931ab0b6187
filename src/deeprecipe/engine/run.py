"""The run folder: resolved config, metrics.jsonl, TensorBoard events, status, plots and report.html."""

from __future__ import annotations

import json
import shlex
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from deeprecipe.config import Config, dump
from deeprecipe.engine.checkpoint import atomic_text


def new_run_dir(recipe: str, out: str | None) -> Path:
    if out:
        return Path(out)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{Path(recipe).stem}-{stamp}"


class Run:
    """Writes a run's files (only on the main process; elsewhere every method is a no-op)."""

    def __init__(self, path: Path, cfg: Config, main: bool = True, resume_step: int = 0, command: str = ""):
        self.path, self.cfg, self.main = Path(path), cfg, main
        self.tb = None
        if not main:
            return
        (self.path / "plots").mkdir(parents=True, exist_ok=True)
        atomic_text(self.path / "config.yaml", dump(cfg))
        cmd = command or shlex.join(["deeprecipe", *sys.argv[1:]])
        history = self.path / "commands.txt"
        with open(history, "a") as f:
            f.write(cmd + "\n")
        # on resume, forget what was logged after the checkpoint: those steps are being redone
        self.metrics_path = self.path / "metrics.jsonl"
        if self.metrics_path.exists():
            keep = [ln for ln in self.metrics_path.read_text().splitlines() if ln.strip()
                    and json.loads(ln).get("step", 0) <= resume_step]
            atomic_text(self.metrics_path, "".join(ln + "\n" for ln in keep))
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.path / "tb"), purge_step=resume_step + 1 if resume_step else None)
        except ImportError:  # TensorBoard is optional at run time; metrics.jsonl always has everything
            self.tb = None
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

    def status(self, status: str, **extra: Any) -> None:
        if self.main:
            info = {"status": status, "recipe": self.cfg.recipe, "task": self.cfg.task, **extra}
            atomic_text(self.path / "status.json", json.dumps(info, indent=1))

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_metrics(path: Path) -> list[dict]:
    p = Path(path) / "metrics.jsonl"
    if not p.exists():
        return []
    return [json.loads(ln) for ln in p.read_text().splitlines() if ln.strip()]


def read_status(path: Path) -> dict:
    p = Path(path) / "status.json"
    return json.loads(p.read_text()) if p.exists() else {}
