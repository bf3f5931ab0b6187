"""Distillation on Fashion-MNIST: a student with under a quarter of the teacher's parameters, trained alone and
trained from the teacher (the `distill` section: (1 - w) CE + w T^2 KL, + attention transfer with
--taught-set distill.attention=BETA), same steps and seeds.

Teacher: the fashion-mnist-vgg recipe at widths 24-48-96 (two conv3x3 per width, dense 64: 463k parameters, 8,000
steps, ~0.944 test). Student: widths 16-32-64, two convs per width, dense 13 (113k = 0.24x), 1,500 steps of the
fashion-mnist-cnn recipe. Test accuracy per seed and the mean difference.

    python bench/distill_fashion.py [--teacher-steps 8000] [--steps 1500] [--seeds 3] [--weight 0.5]
        [--temperature 4] [--teacher RUN] [--keep DIR] [--set KEY=VALUE ...] [--taught-set KEY=VALUE ...]

--teacher reuses a trained teacher run instead of training one; --keep DIR keeps every run folder there;
--set changes both student arms (e.g. data.erase=0.5; a model.name there replaces the default student, e.g.
--set model.name=mlp --set model.hidden=[145]); --taught-set changes the distilled arm only (e.g.
optim.label_smoothing=0: the teacher's term already softens).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile

import deeprecipe
from _budget import overrides

TEACHER = {"model.channels": [24, 48, 96]}  # on the fashion-mnist-vgg recipe
STUDENT = {"model.channels": [16, 32, 64], "model.depth": 2, "model.dense": [13]}  # on the fashion-mnist-cnn recipe


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher-steps", type=int, default=8000)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--weight", type=float, default=0.5)
    p.add_argument("--temperature", type=float, default=4.0)
    p.add_argument("--teacher", default="", help="a trained Fashion-MNIST classifier run to distil from")
    p.add_argument("--keep", default="", help="write the run folders here instead of a temporary folder")
    p.add_argument("--set", action="append", default=[], help="KEY=VALUE for both student arms")
    p.add_argument("--taught-set", action="append", default=[], help="KEY=VALUE for the distilled arm only")
    a = p.parse_args()
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    print(f"machine: {cpu}")
    print(f"command: python bench/distill_fashion.py {' '.join(sys.argv[1:])}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = a.keep or tmp
        common = {"train.device": "cpu", "train.eval_every": 0}
        steps = {"train.steps": a.teacher_steps, "train.ckpt_every": a.teacher_steps}
        if a.teacher:
            teacher = deeprecipe.load(a.teacher, device="cpu")
        else:
            teacher = deeprecipe.train("fashion-mnist-vgg", common | TEACHER | steps, out=f"{tmp}/teacher")
        n_t = sum(p.numel() for p in teacher.model.parameters())
        print(f"teacher: {n_t:,} parameters, test acc {teacher.final['test_acc']:.4f}")
        alone, taught = [], []
        both = overrides(a.set)
        student = common | ({} if "model.name" in both else STUDENT)
        distill = {"distill.teacher": str(teacher.dir), "distill.weight": a.weight}
        distill |= {"distill.temperature": a.temperature}
        distill |= overrides(a.taught_set)
        for seed in range(a.seeds):
            sets = student | {"train.steps": a.steps, "train.ckpt_every": a.steps, "train.seed": seed} | both
            s1 = deeprecipe.train("fashion-mnist-cnn", sets, out=f"{tmp}/alone{seed}")
            s2 = deeprecipe.train("fashion-mnist-cnn", sets | distill, out=f"{tmp}/taught{seed}")
            alone.append(s1.final["test_acc"])
            taught.append(s2.final["test_acc"])
            n_s = sum(p.numel() for p in s1.model.parameters())
            share = f"{n_s:,} parameters, {n_s / n_t:.3f}x the teacher's"
            print(f"seed {seed}: student ({share}) alone {alone[-1]:.4f}, from the teacher {taught[-1]:.4f}")
        gain = 100 * statistics.mean(t - s for t, s in zip(taught, alone))
        mean_a, mean_t = statistics.mean(alone), statistics.mean(taught)
        print(f"mean: alone {mean_a:.4f}, distilled {mean_t:.4f}: {gain:+.2f} points")


if __name__ == "__main__":
    main()
