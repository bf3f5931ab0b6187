"""Does pretraining pay? A ResNet pretrained on Fashion-MNIST, fine-tuned on digits with 10 labels per class,
against the same ResNet trained from scratch on the same 100 labels (and a frozen-backbone linear probe).

Every arm is the `deeprecipe train` command printed below; the labeled set is drawn by data.split_seed, and
each seed draws another one (the same for every arm). Test accuracy is on the 359 held-out digits test images;
evaluation runs only at the end (train.eval_every=0), so the validation split picks nothing.

    python bench/finetune_digits.py [--seeds 3] [--pretrain-steps 600] [--mnist DIR]

With --mnist DIR (a folder of the MNIST IDX files, which this project never downloads) the target is 28x28
MNIST with 10 labels per class instead of scikit-learn's 8x8 digits, and both data sets stay at 28x28; test
accuracy is then on MNIST's 10,000 test images.
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

SIZE = 16  # digits: both data sets are resized to 16x16 (digits are 8x8, Fashion-MNIST 28x28); MNIST: 28
MODEL = ["--set", "model.layout=resnet8", "--set", "model.width=16"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--pretrain-steps", type=int, default=600)
    ap.add_argument("--steps", type=int, default=300, help="fine-tuning / scratch steps")
    ap.add_argument("--out", default="runs/bench-finetune")
    ap.add_argument("--mnist", default="", metavar="DIR", help="MNIST IDX files: fine-tune on 28x28 MNIST instead")
    args = ap.parse_args()
    size, what = (28, "MNIST") if args.mnist else (SIZE, "digits")
    target = (
        ["--set", "data.name=mnist", "--set", f"data.path={args.mnist}"]
        if args.mnist
        else ["--set", "data.name=digits"]
    )
    cpu = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text()).group(1)
    print(f"machine: {platform.node()}: {os.cpu_count()} CPUs ({cpu}), load {os.getloadavg()[0]:.2f}")
    print(f"command: {shlex.join([sys.executable, *sys.argv])}")
    out = Path(args.out)
    pre = out / f"pretrain-fashion-{size}"
    if not (pre / "checkpoints").is_dir():
        print("pretraining on Fashion-MNIST (60k labels):")
        m, dt = cli_train(
            [
                "fashion-mnist-resnet",
                "--out",
                str(pre),
                *MODEL,
                "--set",
                f"data.image_size={size}",
                "--set",
                f"train.steps={args.pretrain_steps}",
                "--set",
                "train.eval_every=0",
                "--set",
                "train.limit_eval=2000",
            ]
        )
        print(f"  Fashion-MNIST test acc {m.get('test_acc', float('nan')):.4f} ({dt:.0f} s)")
    arms = {
        "scratch": [],
        "fine-tuned": ["--init-from", str(pre), "--head-lr", "1", "--backbone-lr", "0.3"],
        "linear probe (frozen)": ["--init-from", str(pre), "--freeze", "backbone"],
    }
    acc: dict[str, list[float]] = {k: [] for k in arms}
    for seed in range(args.seeds):
        print(f"seed {seed}: 10 labels per class of {what} (100 images)")
        for name, extra in arms.items():
            run = out / f"{name.split()[0]}-seed{seed}"
            m, dt = cli_train(
                [
                    "fashion-mnist-resnet",
                    "--out",
                    str(run),
                    *target,
                    *MODEL,
                    "--set",
                    "data.flip=false",
                    "--set",
                    "data.crop_pad=1",
                    "--set",
                    f"data.image_size={size}",
                    "--set",
                    "data.per_class=10",
                    "--set",
                    f"data.split_seed={seed}",
                    "--set",
                    f"train.seed={seed}",
                    "--set",
                    f"train.steps={args.steps}",
                    "--set",
                    "train.batch_size=50",
                    "--set",
                    "train.eval_every=0",
                    "--set",
                    "optim.lr=0.003",
                    *extra,
                ]
            )
            acc[name].append(m["test_acc"])
            print(f"    {name}: test acc {m['test_acc']:.4f} ({dt:.0f} s)", flush=True)
    print(
        f"\n{what}, 10 labels per class, ResNet-8 (width 16) at {size}x{size}, {args.steps} steps, {args.seeds} seeds"
    )
    print(f"{'arm':<24} {'test acc mean':>13} {'std':>6}  per seed")
    for name, v in acc.items():
        sd = statistics.stdev(v) if len(v) > 1 else 0.0
        print(f"{name:<24} {statistics.mean(v):>13.4f} {sd:>6.4f}  {', '.join(f'{x:.4f}' for x in v)}")
    gain = 100 * (statistics.mean(acc["fine-tuned"]) - statistics.mean(acc["scratch"]))
    print(f"fine-tuned - scratch: {gain:+.1f} accuracy points (target >= +10)")


if __name__ == "__main__":
    main()
