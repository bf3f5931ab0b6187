"""int8 against float in onnxruntime, and the two int8 variants of a net with a thin first convolution.

    python bench/int8_speed.py RUN [--rounds 7] [--calibration 256] [--threads 0,1]

Quantizes the trained run twice through the public API (`Run.quantize`): every convolution int8, and the first
convolution (<= 3 input channels) with its ReLU and pool kept float; then times float and both int8 files at batch
1 and 32, alternating round by round so that a machine slowing down penalises none of them. Prints the medians,
each file's ratio to float, and each file's score on the test split, for each onnxruntime intra-op thread count in
--threads (0: its default, one per core; 1: one request per core, as a busy server runs). Run it alone: two cores
shared with another job make these figures noise.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort

import deeprecipe
from classify_speed import machine


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--calibration", type=int, default=256)
    ap.add_argument("--threads", default="0,1", help="intra-op thread counts to time, comma-separated")
    a = ap.parse_args()
    print(f"machine: {machine()}")
    print(
        f"command: python bench/int8_speed.py {a.run} --rounds {a.rounds} --calibration {a.calibration} "
        f"--threads {a.threads}"
    )
    run = deeprecipe.load(a.run)
    with tempfile.TemporaryDirectory() as d:
        summaries = {
            k: run.quantize(Path(d) / k / "model.onnx", a.calibration, stem=v, timing_s=0.2)
            for k, v in (("all int8", False), ("float stem", True))
        }
        s = summaries["all int8"]
        files = {"float": s["float"]["file"], **{k: v["int8"]["file"] for k, v in summaries.items()}}
        score = {"float": s["float"]["score"], **{k: v["int8"]["score"] for k, v in summaries.items()}}
        kept = summaries["float stem"]["float_nodes"]
        print(f"{s['metric']} on {s['examples']} {s['split']} examples; the float stem keeps {kept}")
        for threads in (int(t) for t in a.threads.split(",")):
            med = medians(files, threads, a.rounds)
            print(f"onnxruntime intra-op threads: {threads or 'default'}")
            for k in files:
                r1, r32 = med["float"][1] / med[k][1], med["float"][32] / med[k][32]
                print(
                    f"  {k:<11} {s['metric']} {score[k]:.4f}  batch 1 {med[k][1]:.3f} ms ({r1:.2f}x)  "
                    f"batch 32 {med[k][32]:.3f} ms ({r32:.2f}x)"
                )


def medians(files: dict, threads: int, rounds: int) -> dict[str, dict[int, float]]:
    """{file: {batch: median ms}} over `rounds` alternating rounds with `threads` intra-op threads. Each round
    opens a fresh session per file and closes it before the next: sessions left open keep their pool threads, which
    compete for the two cores and made the two-thread figures swing with which sessions had been used last."""
    x = None
    ms: dict[str, dict[int, list[float]]] = {k: {1: [], 32: []} for k in files}
    for _ in range(rounds):
        for k, f in files.items():
            opts = ort.SessionOptions()
            if threads:
                opts.intra_op_num_threads = threads
            sess = ort.InferenceSession(f, opts, providers=["CPUExecutionProvider"])
            inp = sess.get_inputs()[0]
            if x is None:
                shape = [32] + [int(n) for n in inp.shape[1:]]
                x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
            for b in (1, 32):
                ms[k][b].append(timed(sess, inp.name, x[:b]))
            del sess
    return {k: {b: float(np.median(v)) for b, v in t.items()} for k, t in ms.items()}


def timed(sess, name: str, x: np.ndarray, seconds: float = 0.3) -> float:
    """Mean milliseconds of one run over about `seconds`, after 3 warm-up runs."""
    import time

    for _ in range(3):
        sess.run(None, {name: x})
    n, t0 = 0, time.perf_counter()
    while n < 5 or time.perf_counter() - t0 < seconds:
        sess.run(None, {name: x})
        n += 1
    return 1000 * (time.perf_counter() - t0) / n


if __name__ == "__main__":
    main()
