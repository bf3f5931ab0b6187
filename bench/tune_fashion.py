"""Does tuning pay? The recipe's default against the best configuration of a timed `deeprecipe tune`, both trained
at the recipe's own step budget and scored on the held-out test split.

    python bench/tune_fashion.py [--recipe fashion-mnist-cnn] [--minutes 30] [--trial-steps 1400] [--seeds 0]
        [--out runs/bench-tune]

1. default: `deeprecipe train RECIPE` (the recipe as shipped) for each seed -> test accuracy.
2. tune: `deeprecipe tune RECIPE --minutes M --pruner median` over learning rate, weight decay, dropout, label
   smoothing and warm-up, each trial `--trial-steps` steps (about a minute on 2 CPU cores), validated every fifth.
3. best: `deeprecipe train OUT/tune/best.yaml` with the recipe's step, evaluation and checkpoint budget restored,
   for each seed -> test accuracy.
Prints the machine, each stage's wall time and the gain in points. Stages whose folder already holds a finished
run are read back, not rerun (so an interrupted bench resumes).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import yaml

from _budget import machine

SPACE = [
    "optim.lr=log:1e-3:2e-2",
    "optim.weight_decay=log:1e-5:1e-2",
    "model.dropout=0:0.4",
    "optim.label_smoothing=0:0.2",
    "optim.warmup=0.05:0.4",
]


def cli(*args: str) -> str:
    cmd = [sys.executable, "-m", "deeprecipe.cli", *args]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"failed: {' '.join(args)}\n{p.stderr.strip()[-2000:]}")
    return p.stdout


def test_acc(run: Path, recipe: str, seed: int, budget: list[str]) -> tuple[float, float]:
    """Train (unless the run already finished) and read the final test accuracy from status.json."""
    status = run / "status.json"
    t0 = time.perf_counter()
    if not (status.exists() and json.loads(status.read_text()).get("status") == "done"):
        cli("train", recipe, "--out", str(run), "--set", f"train.seed={seed}", *budget)
    return json.loads(status.read_text())["final"]["test_acc"], time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="fashion-mnist-cnn")
    ap.add_argument("--minutes", type=float, default=30)
    ap.add_argument("--trial-steps", type=int, default=1400)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--out", default="runs/bench-tune")
    args = ap.parse_args()
    out = Path(args.out)
    print(f"machine: {machine()}, python {platform.python_version()}")

    import deeprecipe

    train = deeprecipe.configure(args.recipe).train
    budget = [f"train.{k}={getattr(train, k)}" for k in ("steps", "eval_every", "ckpt_every")]
    budget = [x for b in budget for x in ("--set", b)]

    default = {}
    for s in args.seeds:
        default[s], secs = test_acc(out / f"default-seed{s}", args.recipe, s, budget)
        print(f"default seed {s}: test acc {default[s]:.4f} ({secs:.0f} s)", flush=True)

    steps = args.trial_steps
    t0 = time.perf_counter()
    tune_args = ["tune", args.recipe, "--minutes", str(args.minutes), "--trials", "1000", "--pruner", "median"]
    for p in SPACE:
        tune_args += ["--param", p]
    for s in (f"train.steps={steps}", f"train.eval_every={steps // 5}", f"train.ckpt_every={steps}"):
        tune_args += ["--set", s]
    text = cli(*tune_args, "--out", str(out / "tune"))
    lines = [line for line in text.splitlines() if line.startswith(("study", "best"))]
    print(f"tune ({time.perf_counter() - t0:.0f} s): " + " | ".join(lines), flush=True)
    best_yaml = out / "tune" / "best.yaml"
    chosen = yaml.safe_load(best_yaml.read_text())
    print(
        "best trial's config: " + ", ".join(f"{p.split('=')[0]}={_get(chosen, p.split('=')[0]):.4g}" for p in SPACE),
        flush=True,
    )

    best = {}
    for s in args.seeds:
        best[s], secs = test_acc(out / f"best-seed{s}", str(best_yaml), s, budget)
        print(f"best seed {s}: test acc {best[s]:.4f} ({secs:.0f} s)", flush=True)
    gains = [100 * (best[s] - default[s]) for s in args.seeds]
    print(
        f"gain over the recipe's default at {train.steps} steps: "
        f"{' '.join(f'{g:+.2f}' for g in gains)} points (mean {sum(gains) / len(gains):+.2f}; target >= +0.30)"
    )


def _get(raw: dict, path: str):
    for k in path.split("."):
        raw = raw[k]
    return raw


if __name__ == "__main__":
    main()
