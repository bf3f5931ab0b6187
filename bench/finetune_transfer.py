"""Does pretraining pay on images? A class-disjoint transfer on Fashion-MNIST: a CNN pretrained on classes 0-4
(T-shirt, trouser, pullover, dress, coat) with all their labels, fine-tuned on classes 5-9 (sandal, shirt, sneaker,
bag, ankle boot) with 10 labels per class, against the same CNN trained from scratch on the same 50 labels (and a
frozen-backbone linear probe).

Every arm is the `deeprecipe train` command printed below; the labeled set is drawn by data.split_seed, and each
seed draws another one (the same for every arm). Test accuracy is on the 5,000 Fashion-MNIST test images of
classes 5-9; evaluation runs only at the end (train.eval_every=0), so the validation split picks nothing.

    python bench/finetune_transfer.py [--seeds 3] [--pretrain-steps 1000] [--steps 300]
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shlex
import statistics
import sys
from pathlib import Path

from _budget import cli_train

SOURCE, TARGET = "[0,1,2,3,4]", "[5,6,7,8,9]"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--pretrain-steps", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=300, help="fine-tuning / scratch steps")
    ap.add_argument("--out", default="runs/bench-transfer")
    args = ap.parse_args()
    cpu = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text()).group(1)
    print(f"machine: {platform.node()}: {os.cpu_count()} CPUs ({cpu}), load {os.getloadavg()[0]:.2f}")
    print(f"command: {shlex.join([sys.executable, *sys.argv])}")
    out = Path(args.out)
    pre = out / "pretrain-classes-0-4"
    if not (pre / "checkpoints").is_dir():
        print("pretraining on Fashion-MNIST classes 0-4 (all ~30k labels):")
        m, dt = cli_train(
            ["fashion-mnist-cnn", "--out", str(pre), "--set", f"data.class_ids={SOURCE}"]
            + ["--set", f"train.steps={args.pretrain_steps}", "--set", "train.eval_every=0"]
        )
        print(f"  classes 0-4 test acc {m.get('test_acc', float('nan')):.4f} ({dt:.0f} s)")
    arms = {
        "scratch": [],
        "fine-tuned": ["--init-from", str(pre), "--head-lr", "1", "--backbone-lr", "0.3"],
        "linear probe (frozen)": ["--init-from", str(pre), "--freeze", "backbone"],
    }
    acc: dict[str, list[float]] = {k: [] for k in arms}
    for seed in range(args.seeds):
        print(f"seed {seed}: 10 labels per class of classes 5-9 (50 images)")
        for name, extra in arms.items():
            run = out / f"{name.split()[0]}-seed{seed}"
            sets = [f"data.class_ids={TARGET}", "data.per_class=10", f"data.split_seed={seed}", f"train.seed={seed}"]
            sets += [f"train.steps={args.steps}", "train.batch_size=50", "train.eval_every=0", "optim.lr=0.003"]
            m, dt = cli_train(
                ["fashion-mnist-cnn", "--out", str(run), *(a for s in sets for a in ("--set", s)), *extra]
            )
            acc[name].append(m["test_acc"])
            print(f"    {name}: test acc {m['test_acc']:.4f} ({dt:.0f} s)", flush=True)
    print(
        f"\nFashion-MNIST classes 5-9, 10 labels per class, fashion-mnist-cnn, {args.steps} steps, {args.seeds} seeds"
    )
    print(f"{'arm':<24} {'test acc mean':>13} {'std':>6}  per seed")
    for name, v in acc.items():
        sd = statistics.stdev(v) if len(v) > 1 else 0.0
        print(f"{name:<24} {statistics.mean(v):>13.4f} {sd:>6.4f}  {', '.join(f'{x:.4f}' for x in v)}")
    gain = 100 * (statistics.mean(acc["fine-tuned"]) - statistics.mean(acc["scratch"]))
    print(f"fine-tuned - scratch: {gain:+.1f} accuracy points (target >= +10)")


if __name__ == "__main__":
    main()
