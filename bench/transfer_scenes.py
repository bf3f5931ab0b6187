"""Does a pretrained start pay on driving scenes with 50 labels? Segmentation and detection, each from scratch and
from a ResNet-18 trunk pretrained on another task, fine-tuned with the `finetune` section, equal steps (so equal
time: the same network), 3 seeds.

- Segmentation target: `unet-resnet18` (torchvision ResNet-18 encoder) on 50 labelled scenes (scenes-unet's data).
  Pretrained start: the trunk of a CenterNet (`backbone=tv-resnet18`) trained on the *detection* labels of
  --pretrain-scenes other scenes (finetune.init_from reads its `backbone.*` as the U-Net's `encoder.*`).
- Detection target: CenterNet `backbone=tv-resnet18` on 50 labelled scenes (scenes-detect's data). Pretrained
  start: the encoder of a `unet-resnet18` trained on the *segmentation* labels of --pretrain-scenes scenes.
- --ssl RUN adds a third start for both targets: a self-supervised run (task pretrain, SimCLR: its trunk; task
  masked, scenes-masked: the U-Net's encoder and decoder for segmentation, the encoder for detection).

Seed s draws its own scenes (data.seed = s + 1: train, val and test ranges no pretraining run saw) and its own
initialisation (train.seed = s); the arms of one seed share both. Metrics are on --test held-out scenes after the
last step (train.eval_every=0: nothing is selected on the test scenes).

    python bench/transfer_scenes.py [--seeds 3] [--steps 300] [--pretrain-steps 1500] [--pretrain-scenes 4000]
        [--only seg,det] [--ssl RUN] [--ft-set finetune.freeze=backbone ...]

--ft-set KEY=VALUE (repeatable) adds config overrides to the pretrained arms only (e.g. freezing the trunk first);
their run folders are named after them. --set KEY=VALUE changes every target arm, scratch included (e.g. the
learning rate: the recipe's 0.004 is low for 50 scenes and 300 steps, so compare at a tuned one); the folders are
not named after it, so give a new --out.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from pathlib import Path

import deeprecipe
from _budget import machine, overrides

SEG = {"model.name": "unet-resnet18", "train.channels_last": True}
DET = {"model.backbone": "tv-resnet18", "model.neck": 64, "train.channels_last": True}


def train(recipe: str, sets: dict, out: Path) -> tuple[dict, float]:
    if (out / "status.json").is_file():
        run = deeprecipe.load(out, device="cpu")
        if run.status.get("status") == "done":
            return run.final, 0.0
    t0 = time.time()
    args = " ".join(f"--set {k}={v}" for k, v in sets.items())
    print(f"  $ deeprecipe train {recipe} --out {out} {args}", flush=True)
    run = deeprecipe.train(recipe, sets, out=out, device="cpu")
    return run.final, time.time() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=300, help="fine-tuning (and scratch) steps of each target run")
    p.add_argument("--labelled", type=int, default=50, help="labelled training scenes of each target")
    p.add_argument("--test", type=int, default=400, help="held-out scenes each target is scored on")
    p.add_argument("--pretrain-steps", type=int, default=1500)
    p.add_argument("--pretrain-scenes", type=int, default=4000)
    p.add_argument("--only", default="seg,det")
    p.add_argument("--ssl", default="", help="a pretrain run folder: its trunk is a third start")
    p.add_argument("--backbone-lr", type=float, default=0.3, help="lr multiplier of the pretrained trunk")
    p.add_argument("--ft-set", action="append", default=[], help="KEY=VALUE for the pretrained arms only")
    p.add_argument("--set", action="append", default=[], help="KEY=VALUE for every target arm (use a new --out)")
    p.add_argument("--out", default="runs/bench-transfer-scenes")
    a = p.parse_args()
    print(f"machine: {machine()}")
    print(f"command: {shlex.join([sys.executable, *sys.argv])}")
    out = Path(a.out)
    pre_common = {"data.train_size": a.pretrain_scenes, "data.val_size": 100, "data.test_size": 100}
    pre_common |= {"train.steps": a.pretrain_steps, "train.eval_every": a.pretrain_steps}
    pre_common |= {"train.ckpt_every": a.pretrain_steps}
    targets = {
        "seg": ("scenes-unet", SEG, "test_miou", "scenes-detect", DET),
        "det": ("scenes-detect", DET, "test_map_50", "scenes-unet", SEG),
    }
    tune = {"finetune.head_lr": 1.0, "finetune.backbone_lr": a.backbone_lr}  # the trunk moves slower (0.3)
    tune |= overrides(a.ft_set)
    tag = "" if a.backbone_lr == 0.3 else f"-blr{a.backbone_lr:g}"
    tag += "".join(f"-{kv.rsplit('.', 1)[-1].replace('=', '')}" for kv in a.ft_set)
    rows = []
    for key in a.only.split(","):
        recipe, model, metric, src_recipe, src_model = targets[key]
        src = out / f"pretrain-{src_recipe}"
        m, dt = train(src_recipe, pre_common | src_model, src)
        print(f"pretrained on {a.pretrain_scenes} scenes' {src_recipe} labels: {m} ({dt:.0f} s)", flush=True)
        starts = {"scratch": {}, f"from {src_recipe}": {"finetune.init_from": str(src), **tune}}
        if a.ssl:
            starts["from self-supervised"] = {"finetune.init_from": a.ssl, **tune}
        scores: dict[str, list[float]] = {s: [] for s in starts}
        for seed in range(a.seeds):
            sets = model | {"data.seed": seed + 1, "train.seed": seed, "data.train_size": a.labelled}
            sets |= {"data.test_size": a.test, "data.val_size": 50, "train.steps": a.steps}
            sets |= {"train.eval_every": 0, "train.ckpt_every": a.steps}
            sets |= overrides(a.set)  # e.g. optim.lr=0.012
            for start, extra in starts.items():
                name = start.replace(" ", "-") + (tag if start != "scratch" else "")
                m, dt = train(recipe, sets | extra, out / f"{key}-{name}-seed{seed}")
                scores[start].append(m[metric])
                print(f"{key} seed {seed} {start}: {metric} {m[metric]:.4f} ({dt:.0f} s)", flush=True)
        base = statistics.mean(scores["scratch"])
        for start, v in scores.items():
            mean = statistics.mean(v)
            rows.append((key, start, metric, mean, " ".join(f"{x:.4f}" for x in v), 100 * (mean - base)))
    extra = f", pretrained arms with {' '.join(a.ft_set)}" if a.ft_set else ""
    extra += f", every arm with {' '.join(a.set)}" if a.set else ""
    print(
        f"\n{a.labelled} labelled scenes, {a.steps} steps, {a.seeds} seeds, trunk lr x{a.backbone_lr:g}{extra} "
        f"({machine()})"
    )
    print(f"| target | start | {'metric':10} | mean | per seed | vs scratch (points) |")
    for key, start, metric, mean, per, gain in rows:
        print(f"| {key} | {start} | {metric:10} | {mean:.4f} | {per} | {gain:+.1f} |")


if __name__ == "__main__":
    main()
