"""Time to accuracy: train a built-in Fashion-MNIST recipe and report wall time, images/s and test accuracy.

    python bench/fashion_accuracy.py [--recipe fashion-mnist-cnn] [--set train.steps=6000 ...]
    python bench/fashion_accuracy.py --set train.minutes=4.7 --set train.steps=100000   # a 5-minute budget

Training time counts the steps only (from the first to the last logged step, evaluations included);
start-up (reading the IDX files) is reported separately.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import deeprecipe
from classify_speed import machine


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipe", default="fashion-mnist-cnn")
    ap.add_argument("--set", action="append", default=[])
    a = ap.parse_args()
    cfg = deeprecipe.configure(a.recipe, a.set)
    print(f"machine: {machine()}")
    print(f"command: python bench/fashion_accuracy.py --recipe {a.recipe} " + " ".join(f"--set {s}" for s in a.set))
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        run = deeprecipe.train(a.recipe, a.set, out=Path(d) / "run")
        total = time.perf_counter() - t0
        final, rows, reached = run.final, run.metrics, run.status["step"]
    steps = [r for r in rows if "examples_per_s" in r]
    span = steps[-1]["time"] - rows[0]["time"]
    ips = (steps[-1]["step"] - steps[0]["step"]) * cfg.train.batch_size / (steps[-1]["time"] - steps[0]["time"])
    for r in rows:
        if "val_acc" in r:
            print(f"  step {r['step']:6d}  val acc {r['val_acc']:.4f}")
    print(
        f"{a.recipe}: test acc {final['test_acc']:.4f}  train time {span:.0f} s  total {total:.0f} s  "
        f"{ips:.0f} images/s  ({reached} steps of {cfg.train.batch_size})"
    )


if __name__ == "__main__":
    main()
