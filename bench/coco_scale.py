"""Detection files at scale: a COCO-format set of 640 x 480 JPEGs from the scene renderer, and what training on it
costs. `deeprecipe train` (the scenes-detect model on data.name=boxfiles data.format=coco data.size=[384,512],
3 steps) runs as a subprocess; its peak memory (the PSS of the process and its DataLoader workers, summed, so
pages the workers share with it count once; sampled every 0.1 s) and the time to its first logged step are
measured, streamed (the default past data.in_memory_mb) against decoded into memory up front
(data.in_memory_mb=100000: what every set got before streaming), and `before`: the same command on an older
source tree (--before-src, e.g. `git archive COMMIT src | tar -x -C /tmp/old`).

    PYTHONPATH=src flock /tmp/cpu.lock python bench/coco_scale.py --images 3000 [--distinct K] [--modes stream,memory]

Scenes are rendered at 120 x 160 and upscaled to 640 x 480 (the renderer takes about 1 s per 640 x 480 image on
one core, 0.03 s at 120 x 160; the JPEGs cost the loader what any 640 x 480 JPEG costs). `--distinct K` renders
K scenes and hard-links file i to scene i % K, so a set of 50,000 files costs K renders (the loader decodes every
file as its own). The set is written under --root (default /tmp/deeprecipe-coco-N) once and reused. Memory is
the figure that counts: times on a shared CPU are noisy. Writes bench/out/coco_scale_N.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from deeprecipe.data.detect import DETECT_CLASSES, boxes_from_instances
from deeprecipe.data.scenes import render_scenes

OUT = Path(__file__).resolve().parent / "out"
RENDER = (120, 160)  # rendered, then upscaled x4 to 480 x 640
SIZE = (480, 640)


def generate(root: Path, n: int, distinct: int, chunk: int = 32) -> float:
    """Write root/images/<i>.jpg and root/annotations.json (skipped when present); returns seconds per scene."""
    from PIL import Image

    done = root / "annotations.json"
    old = json.loads(done.read_text()) if done.is_file() else {"images": [], "annotations": []}
    if len(old["images"]) == n:
        return 0.0
    (root / "images").mkdir(parents=True, exist_ok=True)
    images, anns, t0 = [], [], time.perf_counter()
    distinct = min(distinct, n)
    per_scene: list[list] = [[] for _ in range(distinct)] if len(old["images"]) >= distinct else []
    if per_scene:  # the scenes of a smaller set in the same folder: their files and boxes, not rendered again
        for a in old["annotations"]:
            if a["image_id"] < distinct:
                x, y, w, h = a["bbox"]
                per_scene[a["image_id"]].append(([x, y, x + w, y + h], a["category_id"] - 1))
    reuse = bool(per_scene)
    for start in range(0, 0 if reuse else distinct, chunk):
        numbers = torch.arange(start, min(start + chunk, distinct))
        img, seg, inst, painted = render_scenes(numbers, RENDER, instances=True)
        b, y = boxes_from_instances(inst, seg, 8, 2, painted, 0.3)
        big = F.interpolate(img.float(), size=SIZE, mode="bilinear").round().clamp(0, 255).to(torch.uint8)
        for k, i in enumerate(numbers.tolist()):
            Image.fromarray(big[k].permute(1, 2, 0).numpy()).save(root / "images" / f"{i:06d}.jpg", quality=90)
            keep = y[k] >= 0
            per_scene.append(list(zip((b[k][keep] * SIZE[0] / RENDER[0]).tolist(), y[k][keep].tolist())))
        print(f"rendered {min(start + chunk, distinct)}/{distinct}", file=sys.stderr, end="\r")
    seconds = 0.0 if reuse else (time.perf_counter() - t0) / max(distinct, 1)
    for i in range(n):
        f = root / "images" / f"{i:06d}.jpg"
        if i >= distinct and not f.exists():
            os.link(root / "images" / f"{i % distinct:06d}.jpg", f)
        images.append({"id": i, "file_name": f.name, "width": SIZE[1], "height": SIZE[0]})
        for (x1, y1, x2, y2), c in per_scene[i % distinct]:
            w, h = x2 - x1, y2 - y1
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": i,
                    "category_id": c + 1,
                    "bbox": [x1, y1, w, h],
                    "area": w * h,
                    "iscrowd": 0,
                }
            )
    cats = [{"id": c + 1, "name": name} for c, name in enumerate(DETECT_CLASSES)]
    tmp = done.with_suffix(".tmp")
    tmp.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    os.replace(tmp, done)
    return seconds


def tree_rss(pid: int) -> tuple[int, int]:
    """Bytes resident in `pid` and its descendants: their PSS summed (a page shared by k processes counts 1/k in
    each; plain RSS would count the pages forked workers share with their parent once per process), and the
    largest RSS of one of them."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                ppid = int(open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d))
    total, largest, todo = 0, 0, [pid]
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        try:
            for line in open(f"/proc/{p}/smaps_rollup"):
                if line.startswith("Rss:"):
                    largest = max(largest, int(line.split()[1]) * 1024)
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total, largest


def measure(root: Path, mode: str, steps: int, extra: list[str], before_src: str = "") -> dict:
    run = root.parent / f"{root.name}-run-{mode}"
    sets = ["data.name=boxfiles", "data.format=coco", f"data.path={root}", "data.size=[384,512]", "train.device=cpu"]
    sets += [
        f"train.steps={steps}",
        "train.log_every=1",
        "train.eval_every=0",
        "train.limit_eval=32",
        "train.workers=2",
    ]
    sets += ["data.in_memory_mb=100000"] if mode == "memory" else []
    shutil.rmtree(run, ignore_errors=True)
    cmd = [sys.executable, "-m", "deeprecipe.cli", "train", "scenes-detect", "--out", str(run)]
    cmd += [a for s in sets + extra for a in ("--set", s)]
    t0 = time.perf_counter()
    env = dict(os.environ, PYTHONPATH=before_src) if mode == "before" else None
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    peak, largest, first = 0, 0, None
    while proc.poll() is None:
        total, one = tree_rss(proc.pid)
        peak, largest = max(peak, total), max(largest, one)
        m = run / "metrics.jsonl"
        if first is None and m.is_file() and m.stat().st_size > 0:
            first = time.perf_counter() - t0
        time.sleep(0.1)
    err = proc.stderr.read()
    if proc.returncode:
        raise SystemExit(f"{mode}: deeprecipe train failed:\n{err[-2000:]}")
    return {
        "mode": mode,
        "peak_rss_gb": round(peak / 2**30, 3),
        "largest_process_gb": round(largest / 2**30, 3),
        "first_step_s": round(first or float("nan"), 1),
        "total_s": round(time.perf_counter() - t0, 1),
        "notes": [line for line in err.splitlines() if line.startswith("note:")],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=3000)
    ap.add_argument("--distinct", type=int, default=0, help="scenes rendered (default: --images)")
    ap.add_argument("--root", default="")
    ap.add_argument("--modes", default="stream,memory", help="stream, memory, before (needs --before-src)")
    ap.add_argument("--before-src", default="", help="src/ of an older deeprecipe, run as mode 'before'")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--set", action="append", default=[], help="more overrides for the runs")
    args = ap.parse_args()
    root = Path(args.root or f"/tmp/deeprecipe-coco-{args.images}")
    per = generate(root, args.images, args.distinct or args.images)  # --root of a smaller set: its scenes reused
    if per:
        print(f"generated {args.images} images at {SIZE[1]}x{SIZE[0]}: {per:.3f} s per rendered scene")
    from _budget import machine

    rows = [measure(root, mode, args.steps, args.set, args.before_src) for mode in args.modes.split(",")]
    print(f"{'mode':<8} {'peak RSS (GB)':>14} {'largest proc (GB)':>18} {'first step (s)':>15} {'total (s)':>10}")
    for r in rows:
        mem = f"{r['peak_rss_gb']:>14.2f} {r['largest_process_gb']:>18.2f}"
        print(f"{r['mode']:<8} {mem} {r['first_step_s']:>15} {r['total_s']:>10}")
    OUT.mkdir(exist_ok=True)
    result = {"images": args.images, "distinct": args.distinct or args.images, "machine": machine(), "rows": rows}
    (OUT / f"coco_scale_{args.images}.json").write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
