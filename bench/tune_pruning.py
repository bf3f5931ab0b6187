"""Pruning against no pruning, over several seeds: the same `deeprecipe tune` of the Fashion-MNIST CNN (learning
rate and dropout, TPE) run once with the median pruner and once without, for each seed, so that a saving (or a
loss) is not one lucky draw. Prints per seed and arm the wall time of the whole tune, the summed training time
of its trials (first to last line of each trial's metrics.jsonl), the best validation accuracy and the trial
counts; then the mean saving and the best-value difference per seed.

    python bench/tune_pruning.py [--seeds 0 100 200] [--trials 8] [--steps 200] [--eval-every 40]
        [--out runs/bench-prune]

Each tune runs in its own subprocess with its own study file (--out/<pruner>-seed<S>/study.db). Seeds should be
far apart: the tuner reseeds its sampler with --seed + the trial count, so seeds 0 and 1 draw the same trials
shifted by one.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

from _budget import machine


def trial_seconds(folder: Path) -> float:
    """Summed training time of a tune's trials: last minus first metrics line's time, per trial folder."""
    total = 0.0
    for m in sorted(folder.glob("trial-*/metrics.jsonl")):
        times = [json.loads(line)["time"] for line in m.read_text().splitlines() if line.strip()]
        if len(times) > 1:
            total += max(times) - min(times)
    return total


def run_arm(args, pruner: str, seed: int) -> dict:
    out = Path(args.out) / f"{pruner}-seed{seed}"
    cmd = [sys.executable, "-m", "deeprecipe.cli", "tune", args.recipe]
    cmd += ["--param", "optim.lr=log:1e-4:3e-1", "--param", "model.dropout=0:0.5"]
    for s in (
        f"train.steps={args.steps}",
        f"train.eval_every={args.eval_every}",
        "train.limit_eval=2000",
        f"train.ckpt_every={args.steps}",
    ):
        cmd += ["--set", s]
    cmd += ["--trials", str(args.trials), "--pruner", pruner, "--prune-after", "3", "--seed", str(seed)]
    cmd += ["--out", str(out)]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"{pruner} seed {seed} failed: {p.stderr.strip().splitlines()[-1:]}")
    best = next((line for line in p.stdout.splitlines() if line.startswith("best: ")), "")
    value = float(best.split("=")[1].split()[0]) if best else float("nan")
    counts = next((line for line in p.stdout.splitlines() if line.startswith("study ")), "")
    return {"wall": wall, "train": trial_seconds(out), "best": value, "counts": counts.split(": ", 1)[-1]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="fashion-mnist-cnn")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 100, 200])
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--eval-every", type=int, default=40)
    ap.add_argument("--out", default="runs/bench-prune")
    args = ap.parse_args()
    print(f"machine: {machine()}, python {platform.python_version()}")
    print(f"{args.recipe}: {args.trials} trials of {args.steps} steps (eval every {args.eval_every}) per arm")
    rows = []
    for seed in args.seeds:
        arms = {pruner: run_arm(args, pruner, seed) for pruner in ("median", "none")}
        rows.append(arms)
        for pruner, r in arms.items():
            print(
                f"seed {seed} {pruner:<6}  wall {r['wall']:7.1f} s  trials' training {r['train']:7.1f} s  "
                f"best val acc {r['best']:.4f}  ({r['counts']})",
                flush=True,
            )
        saved = 1 - arms["median"]["train"] / max(arms["none"]["train"], 1e-9)
        diff = arms["median"]["best"] - arms["none"]["best"]
        print(f"seed {seed}: pruning saved {saved:.0%} of the trials' training time, best {diff:+.4f}", flush=True)
    train = {p: sum(r[p]["train"] for r in rows) for p in ("median", "none")}
    wall = {p: sum(r[p]["wall"] for r in rows) for p in ("median", "none")}
    diffs = [r["median"]["best"] - r["none"]["best"] for r in rows]
    print(
        f"all seeds: pruning saved {1 - train['median'] / max(train['none'], 1e-9):.0%} of the trials' training time "
        f"({1 - wall['median'] / max(wall['none'], 1e-9):.0%} of the wall time); best val acc median - none per "
        f"seed {' '.join(f'{d:+.4f}' for d in diffs)} (mean {sum(diffs) / len(diffs):+.4f}); "
        f"equal or better on {sum(d >= 0 for d in diffs)} of {len(diffs)} seeds"
    )


if __name__ == "__main__":
    main()
