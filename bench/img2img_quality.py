"""Image to image: super-resolution x4 against bicubic, inpainting of a 25% box against OpenCV's Telea, and the
domain FID of translated scenes.

    PYTHONPATH=src nice -n 10 python bench/img2img_quality.py [--budget 600] [--only sr-fashion,sr-scenes,inpaint]
    PYTHONPATH=src nice -n 10 python bench/img2img_quality.py --budget 450 --only fid-label2image [--images 1000]

Targets (each trained within the budget on the 2-core CPU):
- sr-fashion: Fashion-MNIST x4 (7 -> 28 px), held-out test PSNR at least 2.5 dB above bicubic;
- sr-scenes: generated scenes x4 at 128 px (32 -> 128 px), the same;
- inpaint: a box of 25% of each held-out 128 px scene, the PSNR on the hole at least 3 dB above Telea
  (needs opencv-python-headless);
- fid-label2image: scenes-label2image and an unconditional DCGAN (the imagefolder-dcgan recipe, its data set
  swapped for the label2image run's scenes by --set overrides) each trained within the budget; the domain FID of
  each against the same held-out real scenes (`--images` of them) on the same scene feature net: the label map
  -> scene FID at most half the DCGAN's. The feature net (families/img2img/metrics.py) is trained (or read from
  the cache) before either clock starts; the FID of real scenes against other real scenes is printed as the floor.
- fid-day2night, fid-fog: the CycleGAN recipes; the domain FID of day scenes translated to night (clear to fog)
  against the real night (fog) scenes, next to that of the untranslated day scenes (no target: a figure).
The step count is fitted to the budget from a measured step of the family's own training step (D's and G's
turns), so a slower (shared) machine trains fewer steps rather than overrunning.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

import deeprecipe
from _budget import machine, step_time

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


FID_TASKS = {"fid-label2image": "scenes-label2image", "fid-day2night": "scenes-day2night-cyclegan"}
FID_TASKS["fid-fog"] = "scenes-fog-cyclegan"
DCGAN = "imagefolder-dcgan"  # the DCGAN of the label2image comparison: this recipe on the label2image run's scenes


def fitted(name: str, recipe: str, sets: list[str], budget: float) -> list[str]:
    """`sets` plus the step count (and one evaluation, one checkpoint) that fits the recipe into `budget` seconds."""
    t_data, t_step = step_time(recipe, sets)
    usable = (budget - 2 * t_data) * 0.85  # evaluations and the final test pass take the rest
    steps = max(20, int(usable / t_step))
    print(f"[{name}] recipe {recipe} {' '.join(sets)}")
    print(f"[{name}] data build {t_data:.1f}s, step {t_step:.3f}s -> {steps} steps for {budget:.0f}s", flush=True)
    return [*sets, f"train.steps={steps}", f"train.eval_every={steps}", f"train.ckpt_every={steps}"]


def trained(recipe: str, sets: list[str], keep: Path | None = None) -> tuple[dict, str, float]:
    """(final metrics, plots/quality.txt or "", wall seconds) of a run of `recipe` (kept in `keep` when given)."""
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        run_dir = keep or Path(d) / "run"
        final = deeprecipe.train(recipe, sets, out=run_dir).final
        q = run_dir / "plots" / "quality.txt"
        table = q.read_text() if q.is_file() else ""
    return final, table, time.perf_counter() - t0


def run(name: str, budget: float, extra: list[str], images: int) -> tuple[bool, str]:
    if name in FID_TASKS:
        return run_fid(name, budget, extra, images)
    recipe, sets, got_key, base_key, target = TASKS[name]
    sets = fitted(name, recipe, [*sets, "train.device=cpu", *extra], budget)
    final, table, wall = trained(recipe, sets)
    print(table, end="")
    got, base = final.get(got_key), final.get(base_key)
    if got is None or base is None:
        return False, f"RESULT {name}: {got_key}={got} {base_key}={base} (baseline missing) in {wall:.0f}s"
    ok = got - base >= target and wall <= budget * 1.05
    return ok, (
        f"RESULT {name}: {got_key} {got:.2f} dB vs {base_key} {base:.2f} dB = {got - base:+.2f} dB in {wall:.0f}s "
        f"({'meets' if ok else 'misses'} the +{target} dB / {budget:.0f}s target)"
    )


def run_fid(name: str, budget: float, extra: list[str], images: int) -> tuple[bool, str]:
    """The domain FID of a translation of scenes against held-out real ones; for label2image also of a DCGAN
    trained on the same scenes within the same budget, scored on the same real images by the same feature net."""
    from dataclasses import replace

    from deeprecipe.families.gan import generate
    from deeprecipe.families.img2img import metrics as im

    recipe = FID_TASKS[name]
    sets = ["train.device=cpu", f"data.test_size={images}", *extra]
    cfg = deeprecipe.configure(recipe, sets)
    t0 = time.perf_counter()
    feats = im.scene_features(cfg, torch.device("cpu"))
    print(
        f"[{name}] scene feature net ({im.scene_feature_config(cfg).recipe} at {list(cfg.data.size)} px, "
        f"{feats.num_features} features): val mIoU {feats.miou:.3f}, ready in {time.perf_counter() - t0:.0f}s"
    )
    D = cfg.data
    held = replace(D, train_size=16, val_size=images).build()  # the run's test split, and as many other scenes
    target = 0 if D.mode == "label2image" else 3  # the real images of the target domain: channels from here
    real, other = (held.split(s).tensors[0][:, target : target + 3].float() / 127.5 - 1 for s in ("test", "val"))

    def fid_of(fakes) -> float:  # batches of images in [-1, 1] against the held-out test scenes
        f, n = im.DomainFID(feats), 0
        for fake in fakes:
            f.add(fake.float(), real[n : n + len(fake)])
            n += len(fake)
        return f.compute()["fid"]

    floor = fid_of(other.split(250))
    print(f"[{name}] floor: {images} real held-out scenes vs {images} other real scenes: FID {floor:.2f}")
    final, table, wall = trained(recipe, fitted(name, recipe, sets, budget))
    print(table, end="")
    got = final["test_fid"]
    if D.mode != "label2image":
        return True, (
            f"RESULT {name}: domain FID against {images} real {D.look_b} test scenes: translated {got:.2f}, "
            f"untranslated {D.look_a} scenes {final['test_fid_input']:.2f}, real floor {floor:.2f} ({wall:.0f}s)"
        )
    keys = ("name", "mode", "source", "size", "train_size", "val_size", "seed")
    data = [f"data.{k}={list(v) if isinstance(v, tuple) else v}" for k in keys for v in [getattr(D, k)]]
    gsets = [*data, f"data.test_size={images}", "model.image_size=64", "model.eval_samples=0", "train.ema=0.99"]
    gsets = fitted(f"{name}/dcgan", DCGAN, ["train.device=cpu", *gsets, *extra], budget)
    with tempfile.TemporaryDirectory() as d:
        _, _, gwall = trained(DCGAN, gsets, Path(d) / "dcgan")
        g = deeprecipe.load(Path(d) / "dcgan", "cpu", "fp32")
        dcgan = fid_of(generate(g.model, images, 1234, g.runtime(), batch=250))
    ok = got <= dcgan / 2 and max(wall, gwall) <= budget * 1.05
    return ok, (
        f"RESULT {name}: domain FID on {images} held-out scenes: label2image {got:.2f} ({wall:.0f}s) vs DCGAN "
        f"{dcgan:.2f} ({gwall:.0f}s), ratio {got / dcgan:.2f} ({'meets' if ok else 'misses'} the <= 0.5 target); "
        f"real floor {floor:.2f}"
    )


def main() -> None:
    p = argparse.ArgumentParser()
    names = [*TASKS, *FID_TASKS]
    p.add_argument("--budget", type=float, default=600, help="seconds per task (per model for fid-label2image)")
    p.add_argument("--only", default=",".join(TASKS), help="comma-separated: " + ", ".join(names))
    p.add_argument("--images", type=int, default=1000, help="fid-*: held-out scenes the FID compares")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    a = p.parse_args()
    print(f"machine: {machine()}")
    lines = [run(n, a.budget, a.set, a.images)[1] for n in a.only.split(",")]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
