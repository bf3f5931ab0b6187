"""deeprecipe's fashion-mnist-dcgan vs a plain PyTorch DCGAN, each trained for the same wall-clock time.

The plain one is written the usual way (the PyTorch DCGAN example / the paper's settings): a DataLoader
with workers, images resized to 64x64 and normalized per item, ngf = ndf = 64, Adam(2e-4, betas 0.5/0.999),
batch 128, fp32, no EMA, samples drawn with G in train mode as the example does. deeprecipe runs its recipe
unchanged (28 px, data on the device, bf16 autocast where the CPU has it, EMA of G) through the CLI, stopped
at the same wall-clock time (it keeps its last checkpoint). Both are scored by the same domain feature net
(the recipe's Fashion-MNIST CNN, cached) on 5,000 samples against the 10,000 test images.

    nice -n 10 python bench/gan_fid.py --minutes 5 --threads 1

Measured 2026-11-23, 2-core x86_64 CPU shared with other jobs (load 5-8), torch 2.14.1, 1 thread each side
(under that load 2 threads ran a step 10-50x slower: OpenMP threads spinning), one run:
    domain feature net: fashion-mnist-cnn, 1000 steps, test accuracy 0.907, trained once in 265 s
    real test images under it: IS 7.61 (the practical ceiling of this net), FID vs themselves 0.000
    deeprecipe fashion-mnist-dcgan, 5 min: 1400 steps, domain FID 496, IS 3.72 +- 0.08, all classes present
    plain PyTorch DCGAN (64 px, fp32), 5 min: 54 steps, domain FID 2174, IS 1.00 (not yet an image)
    FID ratio 0.23 (target <= 0.7); IS 3.72 at 5 min, short of the 7.5 target
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import deeprecipe  # noqa: E402
from deeprecipe.engine.device import setup  # noqa: E402
from deeprecipe.families import gan as gan_task  # noqa: E402


def plain_dcgan(minutes: float, threads: int, seed: int = 0) -> tuple[nn.Module, int]:
    """The usual DCGAN training script, stopped after `minutes`; returns (G, steps done)."""
    from torch.utils.data import DataLoader, Dataset

    torch.manual_seed(seed)
    # the 60,000 training images as they are in the files: (N, 28, 28) uint8
    images = deeprecipe.dataset("fashion-mnist-cnn", {"data.val_fraction": 0}).train.tensors[0][:, 0]

    class Fashion(Dataset):  # per-item transform: to float, resize to 64, normalize to [-1, 1]
        def __len__(self):
            return len(images)

        def __getitem__(self, i):
            x = images[i][None, None].float() / 255
            return (F.interpolate(x, size=64, mode="bilinear", align_corners=False)[0] - 0.5) / 0.5

    nz, ngf, ndf = 100, 64, 64
    G = nn.Sequential(
        nn.ConvTranspose2d(nz, ngf * 8, 4, 1, 0, bias=False),
        nn.BatchNorm2d(ngf * 8),
        nn.ReLU(True),
        nn.ConvTranspose2d(ngf * 8, ngf * 4, 4, 2, 1, bias=False),
        nn.BatchNorm2d(ngf * 4),
        nn.ReLU(True),
        nn.ConvTranspose2d(ngf * 4, ngf * 2, 4, 2, 1, bias=False),
        nn.BatchNorm2d(ngf * 2),
        nn.ReLU(True),
        nn.ConvTranspose2d(ngf * 2, ngf, 4, 2, 1, bias=False),
        nn.BatchNorm2d(ngf),
        nn.ReLU(True),
        nn.ConvTranspose2d(ngf, 1, 4, 2, 1, bias=False),
        nn.Tanh(),
    )
    D = nn.Sequential(
        nn.Conv2d(1, ndf, 4, 2, 1, bias=False),
        nn.LeakyReLU(0.2, True),
        nn.Conv2d(ndf, ndf * 2, 4, 2, 1, bias=False),
        nn.BatchNorm2d(ndf * 2),
        nn.LeakyReLU(0.2, True),
        nn.Conv2d(ndf * 2, ndf * 4, 4, 2, 1, bias=False),
        nn.BatchNorm2d(ndf * 4),
        nn.LeakyReLU(0.2, True),
        nn.Conv2d(ndf * 4, ndf * 8, 4, 2, 1, bias=False),
        nn.BatchNorm2d(ndf * 8),
        nn.LeakyReLU(0.2, True),
        nn.Conv2d(ndf * 8, 1, 4, 1, 0, bias=False),
        nn.Sigmoid(),
    )
    from deeprecipe.models.gan import dcgan_init

    G.apply(dcgan_init), D.apply(dcgan_init)
    criterion = nn.BCELoss()
    opt_d = torch.optim.Adam(D.parameters(), lr=2e-4, betas=(0.5, 0.999))
    opt_g = torch.optim.Adam(G.parameters(), lr=2e-4, betas=(0.5, 0.999))
    loader = DataLoader(Fashion(), batch_size=128, shuffle=True, num_workers=2, drop_last=True)
    steps, t_end = 0, time.perf_counter() + 60 * minutes
    while time.perf_counter() < t_end:
        for real in loader:
            b = real.size(0)
            D.zero_grad()
            err_real = criterion(D(real).view(-1), torch.ones(b))
            fake = G(torch.randn(b, nz, 1, 1))
            err_fake = criterion(D(fake.detach()).view(-1), torch.zeros(b))
            (err_real + err_fake).backward()
            opt_d.step()
            G.zero_grad()
            criterion(D(fake).view(-1), torch.ones(b)).backward()
            opt_g.step()
            steps += 1
            if time.perf_counter() >= t_end:
                break
    return G, steps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=5.0, help="training wall clock of each side")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of each side (1 on a shared CPU)")
    ap.add_argument("--samples", type=int, default=5000)
    ap.add_argument("--out", default="runs/bench-gan")
    ap.add_argument("--recipe", default="fashion-mnist-dcgan", help="deeprecipe's side (e.g. fashion-mnist-cdcgan)")
    ap.add_argument("--skip-plain", action="store_true", help="only deeprecipe's side (time-to-IS runs)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override on deeprecipe's side")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(ROOT / "src")}
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"threads {args.threads}, load {os.getloadavg()[0]:.1f}\ncommand: {shlex.join(sys.argv)}"
    )
    cfg = deeprecipe.configure("fashion-mnist-dcgan")
    rt = setup("cpu", "fp32")
    t = time.perf_counter()
    data = cfg.data.build()
    ev = gan_task.scorer(cfg, data, "test", rt)
    print(f"domain feature net: test accuracy {ev.feats.accuracy:.4f} (ready in {time.perf_counter() - t:.0f} s)")
    x = data.test.tensors[0].float() / 127.5 - 1
    ref = ev.score(x[i : i + 500] for i in range(0, len(x), 500))
    print(f"reference, real test images vs themselves: FID {ref['fid']:.3f}  IS {ref['is']:.2f} (ceiling 10)")

    run = Path(args.out) / "deeprecipe"
    cmd = [
        sys.executable,
        "-m",
        "deeprecipe.cli",
        "train",
        args.recipe,
        "--out",
        str(run),
        "--set",
        "train.steps=100000",
        "--set",
        "train.ckpt_every=50",
        "--set",
        "train.eval_every=250",  # grids only: model.eval_samples=0 turns in-run scoring off
        "--set",
        "model.eval_samples=0",
        *[a for kv in args.set for a in ("--set", kv)],
    ]
    import shutil

    shutil.rmtree(run, ignore_errors=True)
    t = time.perf_counter()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    with open(Path(args.out) / "deeprecipe.log", "w") as log:
        try:
            subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=60 * args.minutes)
        except subprocess.TimeoutExpired:
            pass
    ours_run = deeprecipe.load(run, "cpu", "fp32")
    model, drt = ours_run.model, ours_run.runtime()
    torch.set_grad_enabled(True)
    steps = int((run / "checkpoints" / "latest").read_text().split("-")[1])
    ours = ev.score(gan_task.generate(model, args.samples, 123, drt))
    with torch.no_grad():
        gan_task.save_grid(next(gan_task.generate(model, 64, 7, drt)), Path(args.out) / "deeprecipe_grid.png")
    print(
        f"deeprecipe {args.recipe}, {args.minutes:g} min: {steps} steps, domain FID {ours['fid']:.3f}, "
        f"IS {ours['is']:.2f} +- {ours['is_std']:.2f}, class histogram {ours['class_hist']}"
    )

    if args.skip_plain:
        print(f"deeprecipe IS {ours['is']:.2f} (target >= 7.5)")
        return
    G, steps = plain_dcgan(args.minutes, args.threads)

    def plain_samples():
        g = torch.Generator().manual_seed(123)
        with torch.no_grad():  # G in train mode (batch statistics), as the PyTorch example draws its samples
            for _ in range(args.samples // 500):
                yield G(torch.randn(500, 100, 1, 1, generator=g))

    base = ev.score(plain_samples())
    with torch.no_grad():
        gan_task.save_grid(next(plain_samples())[:64], Path(args.out) / "plain_grid.png")
    print(
        f"plain PyTorch DCGAN (64 px, DataLoader, fp32), {args.minutes:g} min: {steps} steps, domain FID "
        f"{base['fid']:.3f}, IS {base['is']:.2f} +- {base['is_std']:.2f}, class histogram {base['class_hist']}"
    )
    print(
        f"FID ratio deeprecipe / plain: {ours['fid'] / base['fid']:.3f} (target <= 0.7); "
        f"deeprecipe IS {ours['is']:.2f} (target >= 7.5)"
    )


if __name__ == "__main__":
    main()
