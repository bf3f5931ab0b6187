"""Workers on one study: the wall time of a fixed number of trials run by one `deeprecipe tune` process against two
processes sharing one SQLite study file, and whether any trial was lost or run twice.

    python bench/tune_workers.py [--recipe fashion-mnist-cnn] [--trials 8] [--steps 300] [--out runs/bench-workers]

Arms (no pruning, so that every trial does the same work):
- one worker, all cores (torch's default threads),
- one worker, one thread (OMP_NUM_THREADS=1),
- two workers, one thread each, started together on the same --out (so the same study.db).
On a machine with two cores, two one-thread workers use the cores the way one worker's two threads would; the
speed-up of the third arm over the first is what running a second worker buys on such a machine. Every arm checks
that the study ends with exactly --trials complete trials, each with its own run folder and finished run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from _budget import machine


def command(args, out: Path) -> list[str]:
    cmd = [sys.executable, "-m", "deeprecipe.cli", "tune", args.recipe, "--param", "optim.lr=log:1e-3:1e-2"]
    cmd += ["--param", "model.dropout=0:0.4", "--trials", str(args.trials), "--pruner", "none", "--out", str(out)]
    for s in (f"train.steps={args.steps}", f"train.eval_every={args.steps}", f"train.ckpt_every={args.steps}"):
        cmd += ["--set", s]
    return cmd + ["--set", "train.limit_eval=2000"]


def run_arm(args, name: str, workers: int, threads: int | None) -> dict:
    out = Path(args.out) / name
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    t0 = time.perf_counter()
    procs = []
    for w in range(workers):
        procs.append(subprocess.Popen(command(args, out), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
        if w == 0 and workers > 1:
            time.sleep(3)  # the first worker creates the study; the others join it
    errors = [p.communicate()[1].decode().strip().splitlines()[-1:] for p in procs if p.wait() != 0]
    wall = time.perf_counter() - t0
    if errors:
        raise SystemExit(f"{name}: a worker failed: {errors}")
    with sqlite3.connect(out / "study.db") as db:
        states = [s for (s,) in db.execute("select state from trials")]
        # a worker that asked for a trial after the other took the budget's last one gives it back (FAIL, marked)
        back = db.execute("select count(*) from trial_user_attributes where key = 'over_budget'").fetchone()[0]
    done = [d for d in sorted(out.glob("trial-*")) if (d / "status.json").exists()]
    finished = [d for d in done if json.loads((d / "status.json").read_text()).get("status") == "done"]
    return {
        "wall": wall,
        "complete": states.count("COMPLETE"),
        "states": len(states) - back,
        "given_back": back,
        "folders": len(done),
        "finished": len(finished),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="fashion-mnist-cnn")
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--out", default="runs/bench-workers")
    args = ap.parse_args()
    print(f"machine: {machine()}, python {platform.python_version()}")
    print(f"{args.recipe}: {args.trials} trials of {args.steps} steps, no pruning", flush=True)
    rows = {}
    for name, workers, threads in (("one-worker", 1, None), ("one-worker-1thread", 1, 1), ("two-workers", 2, 1)):
        r = rows[name] = run_arm(args, name, workers, threads)
        ok = r["complete"] == r["states"] == r["folders"] == r["finished"] == args.trials
        print(
            f"{name:<20} wall {r['wall']:7.1f} s  trials: {r['complete']} complete of {r['states']} run "
            f"({r['given_back']} asked over budget and given back), "
            f"{r['folders']} folders, {r['finished']} finished runs -> {'none lost or doubled' if ok else 'MISMATCH'}",
            flush=True,
        )
    one, two = rows["one-worker"]["wall"], rows["two-workers"]["wall"]
    print(
        f"two workers: {one / two:.2f}x the speed of one worker with all threads "
        f"({rows['one-worker-1thread']['wall'] / two:.2f}x one single-thread worker); target about 2x"
    )


if __name__ == "__main__":
    main()
