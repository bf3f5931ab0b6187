"""Load test of `deeprecipe serve` on loopback: batched serving against batch-size-1 serving.

Each mode starts the server as its own process, then a small asyncio client keeps `--concurrency` keep-alive
connections busy until `--requests` classification requests are answered (bounded by `--timeout` seconds).
Reported: requests/s, p50/p99 latency, errors, and the mean batch size the server's /metrics saw.

    python bench/serve_load.py                       # trains a tiny Fashion-MNIST ResNet run first
    python bench/serve_load.py --run runs/my-run     # or serve an existing run
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import platform
import re
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"


def machine() -> str:
    cpu = ""
    if Path("/proc/cpuinfo").exists():
        m = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
        cpu = m.group(1) if m else ""
    load = os.getloadavg()[0]
    return f"{platform.node()}: {os.cpu_count()} CPUs ({cpu}), load {load:.2f}, Python {sys.version.split()[0]}"


def cli(*args: str, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    return subprocess.Popen([sys.executable, "-m", "deeprecipe.cli", *args], env=env, **kw)


def train_run(out: Path) -> Path:
    if (out / "checkpoints").is_dir():
        return out
    p = cli(
        "train",
        "fashion-mnist-resnet",
        "--out",
        str(out),
        "--set",
        "train.steps=30",
        "--set",
        "data.limit=3000",
        "--set",
        "train.eval_every=0",
        "--set",
        "train.device=cpu",
        "--set",
        "train.limit_eval=500",
    )
    if p.wait() != 0:
        sys.exit("training the benchmark run failed")
    return out


def sample_png(run: Path) -> bytes:
    """A real test image of the run's data set (Fashion-MNIST), encoded as PNG."""
    from PIL import Image

    sys.path.insert(0, str(SRC))
    import deeprecipe

    x = deeprecipe.dataset("fashion-mnist-cnn").test.tensors[0][0, 0].numpy()  # (28, 28) uint8
    buf = io.BytesIO()
    Image.fromarray(x).save(buf, format="PNG")
    return buf.getvalue()


def request_bytes(port: int, image: bytes) -> bytes:
    boundary = "deeprecipe-bench"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="x.png"\r\n'
            f"Content-Type: image/png\r\n\r\n"
        ).encode()
        + image
        + f"\r\n--{boundary}--\r\n".encode()
    )
    head = (
        f"POST /classify HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: multipart/form-data; "
        f"boundary={boundary}\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    return head + body


async def worker(port: int, payload: bytes, todo: list[int], lat: list[float], errors: list[str]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while todo:
            todo.pop()
            t0 = time.perf_counter()
            writer.write(payload)
            head = await reader.readuntil(b"\r\n\r\n")
            n = int(re.search(rb"content-length: *(\d+)", head, re.I).group(1))
            body = await reader.readexactly(n)
            lat.append(time.perf_counter() - t0)
            if not head.startswith(b"HTTP/1.1 200") or b'"label"' not in body:
                errors.append(head.split(b"\r\n")[0].decode() + " " + body[:80].decode(errors="replace"))
    finally:
        writer.close()


async def load(port: int, payload: bytes, requests: int, concurrency: int, timeout: float):
    todo, lat, errors = list(range(requests)), [], []
    t0 = time.perf_counter()
    tasks = [asyncio.create_task(worker(port, payload, todo, lat, errors)) for _ in range(concurrency)]
    done, pending = await asyncio.wait(tasks, timeout=timeout)
    for t in pending:
        t.cancel()
    for t in done:
        if t.exception():
            errors.append(repr(t.exception()))
    return time.perf_counter() - t0, lat, errors


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_up(port: int, proc: subprocess.Popen, limit: float = 120) -> None:
    end = time.time() + limit
    while time.time() < end:
        if proc.poll() is not None:
            sys.exit("the server exited")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
                if s.recv(100).startswith(b"HTTP/1.1 200"):
                    return
        except OSError:
            time.sleep(0.3)
    sys.exit("the server did not come up")


def mean_batch(port: int) -> float:
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
    s = float(re.search(r'deeprecipe_batch_size_sum\{endpoint="classify"\} (\S+)', text).group(1))
    n = float(re.search(r'deeprecipe_batch_size_count\{endpoint="classify"\} (\S+)', text).group(1))
    return s / n


def run_mode(run: Path, name: str, max_batch: int, wait_ms: float, args, payload_of) -> dict:
    port = free_port()
    proc = cli(
        "serve",
        str(run),
        "--port",
        str(port),
        "--max-batch",
        str(max_batch),
        "--wait-ms",
        str(wait_ms),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_up(port, proc)
        payload = payload_of(port)
        asyncio.run(load(port, payload, 200, args.concurrency, 60))  # warm-up, not counted
        wall, lat, errors = asyncio.run(load(port, payload, args.requests, args.concurrency, args.timeout))
        batch = mean_batch(port)
    finally:
        proc.terminate()
        proc.wait(10)
    lat_ms = np.array(lat) * 1000
    return {
        "mode": name,
        "answered": len(lat),
        "errors": len(errors) + (args.requests - len(lat)),
        "rps": len(lat) / wall,
        "p50": float(np.percentile(lat_ms, 50)),
        "p99": float(np.percentile(lat_ms, 99)),
        "mean_batch": batch,
        "first_error": errors[0] if errors else "",
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", help="run folder to serve (default: train a tiny one under runs/bench-serve)")
    ap.add_argument("--requests", type=int, default=5000)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--wait-ms", type=float, default=5.0)
    ap.add_argument("--timeout", type=float, default=300, help="seconds per mode")
    args = ap.parse_args()
    print(f"machine: {machine()}")
    print(f"command: {shlex.join([sys.executable, *sys.argv])}")
    run = Path(args.run) if args.run else train_run(Path("runs/bench-serve"))
    image = sample_png(run)
    rows = [
        run_mode(
            run,
            f"batched (max {args.max_batch}, wait {args.wait_ms:g} ms)",
            args.max_batch,
            args.wait_ms,
            args,
            lambda p: request_bytes(p, image),
        ),
        run_mode(run, "batch size 1", 1, 0, args, lambda p: request_bytes(p, image)),
    ]
    print(f"\n{args.requests} POST /classify requests at concurrency {args.concurrency}, run {run}")
    print(f"{'mode':<32} {'answered':>8} {'errors':>6} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'mean batch':>10}")
    for r in rows:
        print(
            f"{r['mode']:<32} {r['answered']:>8} {r['errors']:>6} {r['rps']:>8.1f} {r['p50']:>8.1f} {r['p99']:>8.1f} "
            f"{r['mean_batch']:>10.1f}" + (f"  first error: {r['first_error']}" if r["first_error"] else "")
        )
    ratio = rows[0]["rps"] / rows[1]["rps"]
    print(f"throughput ratio batched / batch-size-1: {ratio:.2f}x (target >= 3x)")


if __name__ == "__main__":
    main()
