"""Image to image: super-resolution x4 against bicubic, and inpainting of a 25% box against OpenCV's Telea.

    PYTHONPATH=src nice -n 10 python bench/img2img_quality.py [--budget 600] [--only sr-fashion,sr-scenes,inpaint]

Targets (each trained within the budget on the 2-core CPU):
- sr-fashion: Fashion-MNIST x4 (7 -> 28 px), held-out test PSNR at least 2.5 dB above bicubic;
- sr-scenes: generated scenes x4 at 128 px (32 -> 128 px), the same;
- inpaint: a box of 25% of each held-out 128 px scene, the PSNR on the hole at least 3 dB above Telea
  (needs opencv-python-headless).
The step count is fitted to the budget from a measured step of the family's own training step (D's and G's
turns), so a slower (shared) machine trains fewer steps rather than overrunning.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from _budget import machine, step_time
from deeprecipe import config
from deeprecipe.engine.loop import train
from deeprecipe.families import get_family

TASKS = {  # name: (recipe, overrides, model metric, baseline metric, target gain in dB)
    "sr-fashion": ("fashion-mnist-sr4", [], "test_psnr", "test_psnr_bicubic", 2.5),
    "sr-scenes": ("scenes-sr4", [], "test_psnr", "test_psnr_bicubic", 2.5),
    "inpaint": (
        "scenes-inpaint",
        ["data.holes=box", "data.hole_fraction=0.25"],
        "test_psnr_hole",
        "test_psnr_hole_telea",
        3.0,
    ),
}


def run(name: str, budget: float, extra: list[str]) -> tuple[bool, str]:
    recipe, sets, got_key, base_key, target = TASKS[name]
    sets = [*sets, "train.device=cpu", *extra]
    cfg = config.load(recipe, sets)
    t_data, t_step = step_time(cfg)
    usable = (budget - 2 * t_data) * 0.85  # evaluations and the final test pass take the rest
    steps = max(20, int(usable / t_step))
    sets += [f"train.steps={steps}", f"train.eval_every={steps}", f"train.ckpt_every={steps}"]
    print(f"[{name}] recipe {recipe} {' '.join(sets)}")
    print(f"[{name}] data build {t_data:.1f}s, step {t_step:.3f}s -> {steps} steps for {budget:.0f}s", flush=True)
    cfg = config.load(recipe, sets)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        final = train(cfg, get_family(cfg.task), Path(d) / "run")
        table = (Path(d) / "run" / "plots" / "quality.txt").read_text()
    wall = time.perf_counter() - t0
    print(table, end="")
    got, base = final.get(got_key), final.get(base_key)
    if got is None or base is None:
        return False, f"RESULT {name}: {got_key}={got} {base_key}={base} (baseline missing) in {wall:.0f}s"
    ok = got - base >= target and wall <= budget * 1.05
    return ok, (
        f"RESULT {name}: {got_key} {got:.2f} dB vs {base_key} {base:.2f} dB = {got - base:+.2f} dB in {wall:.0f}s "
        f"({'meets' if ok else 'misses'} the +{target} dB / {budget:.0f}s target)"
    )


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--budget", type=float, default=600, help="seconds per task")
    p.add_argument("--only", default=",".join(TASKS), help="comma-separated: " + ", ".join(TASKS))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    a = p.parse_args()
    print(f"machine: {machine()}")
    lines = [run(n, a.budget, a.set)[1] for n in a.only.split(",")]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
