"""Language-model quality within a wall-clock budget: train a recipe (default shakespeare-char-gpt) for as many
steps as fit in --budget seconds, then report the loss on the full val split.

The step count is fixed before training (so the cosine schedule ends on time): 100 timed steps of the same
model, batch and precision (~15-20 s, not counted) estimate the step time. On the 2-vCPU test machine the loop's
steps ran up to 25% slower than these probes (bench/RESULTS.md): read the wall time it prints. Prints the
machine, the command and the result.

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
    _, dt = deeprecipe.time_step(a.recipe, a.set, probes=100)  # the loop's step: forward, backward, clipping, update
    steps = max(10, int(a.budget * 0.95 / dt))  # 5% for the final evaluation and checkpoints
    sets = {"train.steps": steps, "train.eval_every": 0, "train.ckpt_every": steps, "train.limit_eval": 0}
    cfg = deeprecipe.configure(a.recipe, [*a.set, *(f"{k}={v}" for k, v in sets.items())])
    out = Path(a.out or f"runs/bench-{a.recipe}-{int(time.time())}")
    print(
        f"machine: {cpu_name()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, load {os.getloadavg()[0]:.1f}"
    )
    print(f"command: python {shlex.join(sys.argv)}")
    print(
        f"estimated step {dt * 1000:.0f} ms -> {cfg.train.steps} steps of {cfg.train.batch_size} x "
        f"{cfg.data.block_size} tokens in {a.budget:.0f} s"
    )
    t = time.perf_counter()
    final = deeprecipe.train(cfg, out=out, command=f"python {shlex.join(sys.argv)}").final
    wall = time.perf_counter() - t
    print(
        f"result: {a.recipe} val_loss {final['val_loss']:.4f} (bpc {final['val_bpc']:.3f}) on the full val split "
        f"after {cfg.train.steps} steps, {wall:.0f} s wall including evaluation; run folder {out}"
    )


if __name__ == "__main__":
    main()
