"""Language-model quality within a wall-clock budget: train a recipe (default shakespeare-char-gpt) for --budget
seconds, then report the loss on the full val split.

The run has a time budget (train.minutes, engine/clock.py): its lr schedule follows the share of the time spent and
it stops at the step that ends nearest the budget, so no step count is guessed beforehand; 3% of --budget is left
for the final evaluation, checkpoint and report. Prints the machine, the command, the steps it reached and the wall
time including the evaluation.

    python bench/lm_train.py --budget 600                      # target: val loss <= 1.60 on 2 CPU cores
    python bench/lm_train.py --recipe shakespeare-char-lstm --budget 600
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

import deeprecipe


def cpu_name() -> str:
    try:
        lines = open("/proc/cpuinfo").read().splitlines()
        return next(ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default="shakespeare-char-gpt")
    p.add_argument("--budget", type=float, default=600, help="training seconds")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", default="")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    minutes = a.budget * 0.97 / 60  # 3% for the final evaluation, checkpoint and report
    cap = 10**7  # the budget ends the run, not a step count
    sets = {"train.minutes": minutes, "train.steps": cap, "train.eval_every": 0, "train.ckpt_every": cap}
    sets["train.limit_eval"] = 0
    cfg = deeprecipe.configure(a.recipe, [*a.set, *(f"{k}={v}" for k, v in sets.items())])
    out = Path(a.out or f"runs/bench-{a.recipe}-{int(time.time())}")
    print(
        f"machine: {cpu_name()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, load {os.getloadavg()[0]:.1f}"
    )
    print(f"command: python {shlex.join(sys.argv)}")
    print(f"train.minutes={minutes:.3f}: batch {cfg.train.batch_size} x {cfg.data.block_size} tokens")
    t = time.perf_counter()
    run = deeprecipe.train(cfg, out=out, command=f"python {shlex.join(sys.argv)}")
    wall, final = time.perf_counter() - t, run.final
    steps = run.status["step"]
    print(
        f"result: {a.recipe} val_loss {final['val_loss']:.4f} (bpc {final['val_bpc']:.3f}) on the full val split "
        f"after {steps} steps, {wall:.0f} s wall including building the data and the evaluation; run folder {out}"
    )


if __name__ == "__main__":
    main()
