"""Drift monitoring on driving scenes: does a scene U-Net's drift score tell fog and night requests from day ones?

A scenes U-Net trained on day scenes only (`data.look=day`) keeps its drift reference (engine/drift.py: penultimate
features, channel means and predicted classes of its val split). Windows of `--window` requests are scored against
it as the server and `deeprecipe monitor` score them (MMD^2 of the features with a permutation p-value, KS of the
channel means, chi-square of the predicted classes). Held-out day scenes (numbers from the test split's range
onward, never trained on) against the same scenes rendered in the renderer's fog and night looks:

- AUROC of each window's MMD^2 (and of its smallest p-value) for day windows against fog / night windows;
- how many day windows raise the alarm over `--day` day requests (the target: none).

    python bench/drift_scenes.py [--steps 300] [--window 32] [--day 1000] [--shifted 320] [--run DIR]
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time

import torch
from sklearn.metrics import roc_auc_score

import deeprecipe
from deeprecipe.data.scenes import SPLIT_BASE, render_scenes
from deeprecipe.engine import drift


def windows(run, numbers: torch.Tensor, look: str, size: int) -> list[dict]:
    """Drift scores of consecutive windows of `size` scenes (numbers) rendered in `look`."""
    ref = drift.load_reference(run.dir)
    model, spec, family = run.model, run.spec, run.family
    out = []
    for i in range(0, len(numbers) - size + 1, size):
        x = render_scenes(numbers[i : i + size], tuple(run.config.data.size), look)[0]
        with torch.no_grad():
            new = drift.image_batch_stats(family, model, x, (torch.zeros(len(x), dtype=torch.long),), spec)
        s = drift.score(ref, new, seed=i)
        out.append(s | {"min_p": min(p for p in (s["p_features"], s["p_inputs"], s["p_classes"]) if p is not None)})
    return out


def auroc(day: list[dict], other: list[dict], key: str, sign: float) -> float:
    labels = [0] * len(day) + [1] * len(other)
    return roc_auc_score(labels, [sign * w[key] for w in day + other])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300, help="training steps of the day-only U-Net")
    p.add_argument("--window", type=int, default=32, help="requests per scored window")
    p.add_argument("--day", type=int, default=1000, help="held-out day requests")
    p.add_argument("--shifted", type=int, default=320, help="fog and night requests each")
    p.add_argument("--run", help="a run of scenes-unet with data.look=day to reuse (default: train one)")
    a = p.parse_args()
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "")
    print(f"machine: {cpu or platform.processor() or platform.machine()}, torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        if a.run:
            run = deeprecipe.load(a.run, device="cpu", precision="fp32")
        else:
            sets = {"data.look": "day", "train.steps": a.steps, "train.eval_every": a.steps, "train.device": "cpu"}
            run = deeprecipe.train("scenes-unet", sets | {"train.ckpt_every": a.steps}, out=f"{tmp}/run")
            run = deeprecipe.load(run.dir, device="cpu", precision="fp32")
        miou = run.final.get("val_miou", float("nan"))
        print(f"U-Net on day scenes: val mIoU {miou:.4f} ({time.perf_counter() - t0:.0f} s)")
        d = run.config.data
        first = SPLIT_BASE["test"] + d.seed * 30_000_000  # the test split's scenes and the unused numbers after them
        day = windows(run, torch.arange(first, first + a.day), "day", a.window)
        alarms = sum(w["drift"] for w in day)
        print(f"day: {alarms} of {len(day)} windows of {a.window} raise the alarm ({len(day) * a.window} requests)")
        for look in ("fog", "night"):
            other = windows(run, torch.arange(first, first + a.shifted), look, a.window)
            print(
                f"{look}: AUROC vs day {auroc(day, other, 'mmd2', 1):.3f} (MMD^2), "
                f"{auroc(day, other, 'min_p', -1):.3f} (smallest p); "
                f"alarm in {sum(w['drift'] for w in other)} of {len(other)} windows"
            )


if __name__ == "__main__":
    main()
