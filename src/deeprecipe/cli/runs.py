"""What every verb that opens a run folder shares: its arguments (RUN, --device, --precision, --set), the run's
family, its model with the weights it names, and which weights those are. The verb modules import it, and so does
cli/__init__.py, so no verb module imports the package that lists it. Light: torch and the families are imported
inside the functions.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from deeprecipe.core import UserError

DEVICES = "auto | cpu | cuda | cuda:N | mps"


def family_of(cfg):
    """The family (deeprecipe/family.py) a config names in `task`."""
    from deeprecipe.families import get_family

    return get_family(cfg.task)


def open_run(run: str, device: str = "auto", precision: str = "auto", task: str = ""):
    """(cfg, spec, model with inference weights, runtime, family) of a run folder; says on stderr which weights.
    With `task`, a run of another task is refused before anything is loaded."""
    from deeprecipe.engine.run import load_run, read_config

    cfg = read_config(run)
    if task and cfg.task != task:
        raise UserError(f"{run} is a '{cfg.task}' run; this verb needs a run of task '{task}'")
    family = family_of(cfg)
    loaded = load_run(run, family, device, precision)
    print(f"weights: {weights_of(run).text}", file=sys.stderr, flush=True)
    return (*loaded, family)


def load_run_api(run: str, device: str = "auto", precision: str | None = None):
    """deeprecipe.load(run) (the Python API's Run, its model loaded); says on stderr which weights."""
    from deeprecipe import api

    loaded = api.load(run, device, precision)
    print(f"weights: {loaded.weights.text}", file=sys.stderr, flush=True)
    return loaded


def weights_of(run: str | Path):
    """Which weights are the model of a run (engine/checkpoint.py model_weights), without loading them."""
    from deeprecipe.engine.checkpoint import model_weights

    return model_weights(Path(run), load=False)[1]


def add_run_args(
    s: argparse.ArgumentParser,
    run: str = "run folder",
    device: str | None = "auto",
    precision: str = "",
    overrides: str = "",
) -> None:
    """The arguments of a verb that opens a run folder, in one place: RUN (helped by `run`), --device (None: the
    verb has none), and where the verb takes them --precision (its default) and --set (its help)."""
    s.add_argument("run", help=run)
    if device is not None:
        s.add_argument("--device", default=device, help=f"{DEVICES} (default {device})")
    if precision:
        s.add_argument("--precision", default=precision, help=f"auto | bf16 | fp16 | fp32 (default {precision})")
    if overrides:
        s.add_argument("--set", action="append", metavar="KEY=VALUE", help=overrides)
