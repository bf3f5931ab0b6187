"""Detection on generated driving scenes: mAP against seconds of training on the CPU, deeprecipe's centernet
(the scenes-detect recipe, trained by the one loop) against torchvision's fasterrcnn_mobilenet_v3_large_320_fpn
from scratch in a plain training loop written the usual way, at equal wall time on the same data; then the
latency of `predict` on one 512 px image.

    PYTHONPATH=src flock /tmp/cpu.lock python bench/detect_map.py [--budget 600] [--only ours|frcnn] [--set k=v ...]

Targets: mAP@0.5 >= 0.90 and mAP@[.5:.95] >= 0.60 on the 500 test scenes within 10 minutes on 2 CPU cores; the
centernet's mAP@[.5:.95] above Faster R-CNN's at the same wall time; predict under 100 ms on a 512 px image.
Both runs see the scenes-detect train split (4000 scenes); curve points are mAP on the 200 val scenes, measured
at evaluations (their time counts as training time for centernet, and is left out for Faster R-CNN).
Writes bench/out/detect_map.json and detect_map.png.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import torch

import deeprecipe
from _budget import machine, step_time
from deeprecipe.families.detect import detect_images
from deeprecipe.families.detect.metrics import DetectionMetrics

OUT = Path(__file__).resolve().parent / "out"


def ours(budget: float, overrides: list[str]) -> tuple[list, dict, object]:
    """The recipe, its step count fitted to the budget; (curve [(seconds, val mAP, val mAP@.5)], test metrics)."""
    t_data, t_step = step_time("scenes-detect", overrides)
    usable = (budget - t_data) * 0.9  # evaluations and the final test pass take the rest
    steps = max(50, int(usable / t_step))
    every = max(1, steps // 6)
    sets = [*overrides, f"train.steps={steps}", f"train.eval_every={every}", f"train.ckpt_every={steps}"]
    print(f"centernet: data {t_data:.1f}s, step {t_step:.3f}s -> {steps} steps; {' '.join(sets)}", flush=True)
    curve, t0 = [], time.perf_counter()

    def monitor(step, results):
        curve.append((time.perf_counter() - t0, results.get("map", 0.0), results.get("map_50", 0.0)))
        print(f"  {curve[-1][0]:6.0f}s step {step}: val mAP {curve[-1][1]:.4f} mAP@.5 {curve[-1][2]:.4f}", flush=True)
        return False

    with tempfile.TemporaryDirectory() as d:
        final = deeprecipe.train("scenes-detect", sets, out=Path(d) / "run", monitor=monitor).final
        wall = time.perf_counter() - t0
        loaded = deeprecipe.load(Path(d) / "run", "cpu", "fp32")
    return curve, {"wall": wall, **{k: v for k, v in final.items() if isinstance(v, float)}}, loaded


def frcnn(budget: float, seed: int = 0) -> tuple[list, dict]:
    """torchvision's reference way: a list of [0, 1] images and target dicts, SGD (lr 0.02, momentum 0.9, decay
    1e-4) with a linear warmup, horizontal flips, the model's own resize (to 320 px) and normalization."""
    import torchvision.models.detection as tvd

    sizes = {"data.train_size": 4000, "data.val_size": 200, "data.test_size": 500}
    data = deeprecipe.dataset("scenes-detect", sizes)
    torch.manual_seed(seed)
    model = tvd.fasterrcnn_mobilenet_v3_large_320_fpn(weights=None, weights_backbone=None, num_classes=4)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.02, momentum=0.9, weight_decay=1e-4)
    x, b, y = data.train.tensors
    g = torch.Generator().manual_seed(seed)
    batch, warmup = 16, 100

    def targets(bb, yy):
        return [{"boxes": bi[yi >= 0], "labels": yi[yi >= 0] + 1} for bi, yi in zip(bb, yy)]

    def evaluate(split, n):
        model.eval()
        xs, bs, ys = (t[:n] for t in split.tensors)
        m = DetectionMetrics(3)
        with torch.no_grad():
            for i in range(0, n, 50):
                out = model(list(xs[i : i + 50].float() / 255))
                m.update([(o["boxes"], o["scores"], o["labels"] - 1) for o in out], bs[i : i + 50], ys[i : i + 50])
        model.train()
        return m.compute()

    curve, trained, step = [], 0.0, 0
    next_eval = budget / 6
    model.train()
    while trained < budget:
        t = time.perf_counter()
        idx = torch.randint(0, len(x), (batch,), generator=g)
        imgs, bb, yy = x[idx].float() / 255, b[idx].clone(), y[idx]
        flip = torch.rand(batch, generator=g) < 0.5
        imgs[flip] = imgs[flip].flip(-1)
        W = imgs.shape[-1]
        bb[flip] = torch.stack([W - bb[flip][..., 2], bb[flip][..., 1], W - bb[flip][..., 0], bb[flip][..., 3]], -1)
        for group in opt.param_groups:  # linear warmup, then cosine over the budget
            frac = min(trained / budget, 1.0)
            group["lr"] = 0.02 * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * frac))
        losses = model(list(imgs), targets(bb, yy))
        loss = sum(losses.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        trained += time.perf_counter() - t
        if trained >= next_eval or trained >= budget:
            r = evaluate(data.val, 200)
            curve.append((trained, r["map"], r["map_50"]))
            print(f"  {trained:6.0f}s step {step}: val mAP {r['map']:.4f} mAP@.5 {r['map_50']:.4f}", flush=True)
            next_eval += budget / 6
    r = evaluate(data.test, 500)
    return curve, {"wall": trained, "steps": step, "test_map": r["map"], "test_map_50": r["map_50"]}


def latency(loaded) -> float:
    """Median seconds of detect_images (what predict and /detect run) on one 512 x 512 image, after warm-up."""
    img = (torch.rand(3, 512, 512) * 255).to(torch.uint8)
    times = []
    for i in range(23):
        t = time.perf_counter()
        detect_images(loaded.model, loaded.spec, loaded.runtime(), [img])
        if i >= 3:
            times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--budget", type=float, default=600, help="seconds of training for each detector")
    p.add_argument("--only", choices=["ours", "frcnn"], default=None)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    a = p.parse_args()
    print(f"machine: {machine()}", flush=True)
    OUT.mkdir(exist_ok=True)
    res: dict = {"machine": machine(), "budget": a.budget}
    if a.only in (None, "ours"):
        curve, final, loaded = ours(a.budget, ["train.device=cpu", *a.set])
        ms = latency(loaded) * 1000
        res["centernet"] = {"curve": curve, **final, "predict_512px_ms": ms}
        m, m50 = final.get("test_map", 0), final.get("test_map_50", 0)
        ok = m50 >= 0.9 and m >= 0.6 and final["wall"] <= a.budget * 1.05
        print(
            f"RESULT centernet: test mAP@.5 {m50:.4f} mAP@[.5:.95] {m:.4f} in {final['wall']:.0f}s "
            f"({'meets' if ok else 'misses'} the 0.90 / 0.60 / {a.budget:.0f}s target); "
            f"predict on a 512 px image {ms:.1f} ms",
            flush=True,
        )
    if a.only in (None, "frcnn"):
        curve, final = frcnn(a.budget)
        res["fasterrcnn_mobilenet_v3_large_320_fpn"] = {"curve": curve, **final}
        print(
            f"RESULT fasterrcnn_mobilenet_v3_large_320_fpn (scratch): test mAP@.5 {final['test_map_50']:.4f} "
            f"mAP@[.5:.95] {final['test_map']:.4f} after {final['wall']:.0f}s of training ({final['steps']} steps)",
            flush=True,
        )
    (OUT / "detect_map.json").write_text(json.dumps(res, indent=1))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, r in res.items():
        if isinstance(r, dict) and r.get("curve"):
            s, m, m50 = zip(*r["curve"])
            ax.plot(s, m, "o-", label=f"{name} mAP@[.5:.95]")
            ax.plot(s, m50, "x--", label=f"{name} mAP@.5")
    ax.set(xlabel="seconds of training (2 CPU cores)", ylabel="val mAP", ylim=(0, 1), title="scenes-detect")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(OUT / "detect_map.png", dpi=100)


if __name__ == "__main__":
    main()
