"""Does video decoding keep the training step fed? Data time per batch vs step time, from real video files.

    PYTHONPATH=src nice -n 10 python bench/video_decode.py [--videos 60] [--frames 64] [--size 64] [--workers 2]

Encodes moving-digit clips to MP4 (MPEG-4 part 2, PyAV) in a temporary folder, reads them back through the
videofolder data set (probe, clip sampling, decode, resize) with a DataLoader, and times
  data time: waiting for the next batch from the loader (what the training loop sees);
  step time: forward + backward + AdamW step of the recipe's model on that batch.
Target (issue 5): data time < 10% of step time.
"""

import argparse
import platform
import tempfile
import time
from pathlib import Path

import av
import numpy as np
import torch

from deeprecipe.data.core import Draws, train_batches
from deeprecipe.data.video import MovingDigitsData, VideoFolderData
from deeprecipe.families import video
from deeprecipe.models import MODELS

p = argparse.ArgumentParser()
p.add_argument("--videos", type=int, default=60)
p.add_argument("--frames", type=int, default=64, help="frames per encoded video")
p.add_argument("--size", type=int, default=64, help="side of the encoded frames (clips are read at 32)")
p.add_argument("--workers", type=int, default=2)
p.add_argument("--batch", type=int, default=16)
p.add_argument("--steps", type=int, default=12)
p.add_argument("--model", default="r2plus1d")
a = p.parse_args()

with tempfile.TemporaryDirectory() as d:
    clips = MovingDigitsData(
        frames=a.frames, size=a.size, sprite=28, train_size=a.videos, val_size=0, test_size=0
    ).build()
    x, y = clips.train.tensors
    t0 = time.perf_counter()
    for i in range(a.videos):
        path = Path(d) / f"c{int(y[i])}" / f"v{i}.mp4"
        path.parent.mkdir(parents=True, exist_ok=True)
        with av.open(str(path), "w") as c:
            s = c.add_stream("mpeg4", rate=25)
            s.width = s.height = a.size
            s.pix_fmt = "yuv420p"
            for f in x[i, 0].numpy():
                rgb = np.repeat(f[..., None], 3, -1)
                for pkt in s.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                    c.mux(pkt)
            for pkt in s.encode():
                c.mux(pkt)
    t_enc = time.perf_counter() - t0
    t0 = time.perf_counter()
    data = VideoFolderData(
        path=d, frames=16, stride=2, size=32, channels=1, val_fraction=0, flip=False, crop_pad=0
    ).build()
    t_probe = time.perf_counter() - t0
    spec = data.spec
    model = MODELS[a.model](**({"width": 16} if a.model == "r2plus1d" else {})).build(spec)
    opt = torch.optim.AdamW(model.parameters(), 1e-3)
    batches = train_batches(data.train, 0, range(a.steps), a.batch, torch.device("cpu"), workers=a.workers)
    data_t, step_t = [], []
    t = time.perf_counter()
    for s, batch in enumerate(batches):
        t1 = time.perf_counter()
        data_t.append(t1 - t)
        xb, yb = video.prepare(batch, spec, Draws(torch.Generator().manual_seed(s)))
        with video.fp32_on_cpu(xb):
            loss = torch.nn.functional.cross_entropy(model(xb), yb)
        loss.backward()
        opt.step()
        opt.zero_grad()
        t = time.perf_counter()
        step_t.append(t - t1)
    # the first batch includes starting the workers: report it apart
    dm, sm = np.mean(data_t[1:]), np.mean(step_t[1:])
    print(f"machine: {platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__} (shared CPU)")
    print(
        f"{a.videos} MP4 videos of {a.frames} frames at {a.size}px: encode {t_enc:.1f}s, probe {t_probe:.2f}s, "
        f"{len(data.train)} training clips of 16 frames at stride 2, read at 32px"
    )
    print(f"batch {a.batch}, workers {a.workers}, model {a.model}: first batch {data_t[0]:.2f}s (worker start)")
    print(
        f"RESULT data time {dm * 1000:.0f} ms/batch, step time {sm * 1000:.0f} ms/batch: "
        f"data = {100 * dm / sm:.1f}% of step ({'meets' if dm < 0.1 * sm else 'misses'} the < 10% target)"
    )
