"""Shared by the bench scripts: fit a recipe's step count to a wall-clock budget, train it, report."""

from __future__ import annotations

import argparse
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import deeprecipe


def cli_train(args: list[str]) -> tuple[dict, float]:
    """`deeprecipe train ARGS` on the CPU in a subprocess, printed first: (final metrics, wall seconds)."""
    cmd = [sys.executable, "-m", "deeprecipe.cli", "train", *args, "--set", "train.device=cpu"]
    print("  $ deeprecipe " + shlex.join(cmd[3:]), flush=True)
    t0 = time.time()
    src = Path(__file__).resolve().parent.parent / "src"
    p = subprocess.run(cmd, env={**os.environ, "PYTHONPATH": str(src)}, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"failed:\n{p.stderr[-2000:]}")
    metrics = {k: float(v) for k, v in re.findall(r"(\w+)=([0-9.]+)", p.stdout.splitlines()[-3])}
    return metrics, time.time() - t0


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), else what the platform module knows."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def overrides(pairs: list[str]) -> dict:
    """`--set KEY=VALUE` strings -> {key: value}, each value read as YAML ("100" -> 100, "[16, 32]" -> a list)."""
    import yaml

    return {k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in pairs)}


def machine() -> str:
    return f"{cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, threads {torch.get_num_threads()}"


def step_time(recipe, overrides=None, probes: int = 4) -> tuple[float, float]:
    """(seconds to build the data, seconds per training step) measured with the loop's own step (every part of
    the family: a GAN's D and G turns too) on the recipe's model and batch."""
    return deeprecipe.time_step(recipe, overrides, probes)


def budget_args(recipe: str, budget: float) -> argparse.Namespace:
    """The command line every time-budget bench takes: --budget, --recipe, --set k=v (repeated), --no-cap."""
    p = argparse.ArgumentParser()
    p.add_argument("--budget", type=float, default=budget, help="seconds")
    p.add_argument("--recipe", default=recipe)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--no-cap", action="store_true", help="let the budget raise the step count above the recipe's")
    return p.parse_args()


def run(recipe: str, budget: float, overrides: list[str], eval_share: float = 0.12, no_cap: bool = False) -> dict:
    cfg = deeprecipe.configure(recipe, overrides)
    t_data, t_step = step_time(cfg)
    # what is left after building the data (twice: probe and run), evaluations and the final test pass
    usable = (budget - 2 * t_data) * (1 - eval_share)
    steps = max(20, int(usable / t_step))
    steps = steps if no_cap else min(steps, cfg.train.steps)
    every = max(1, steps // 3)
    overrides = [*overrides, f"train.steps={steps}", f"train.eval_every={every}", f"train.ckpt_every={steps}"]
    print(f"machine: {machine()}")
    print(f"recipe {recipe} {' '.join(overrides)}")
    print(f"data build {t_data:.1f}s, step {t_step:.3f}s -> {steps} steps for a {budget:.0f}s budget", flush=True)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        final = deeprecipe.train(recipe, overrides, out=Path(d) / "run").final
    wall = time.perf_counter() - t0
    print(
        f"wall {wall:.0f}s (budget {budget:.0f}s) "
        + " ".join(f"{k}={v:.4f}" for k, v in final.items() if isinstance(v, float))
    )
    return {"wall": wall, **final}
