"""Figures of a finished run folder, for bench/gpu.sh: training seconds, steady throughput, final metrics, MFU.

    python bench/gpu_figures.py RUN [--skip 100] [--peak TFLOPS]   # one line of JSON
    python bench/gpu_figures.py --peak-only                         # the bf16 matmul peak of this GPU (TFLOP/s)

Training seconds run from spec.json (written once the data is built and the model placed, before the first
step) to the last step's log line: compile, CUDA-graph capture and periodic evaluations count, data building
and the final report do not. Throughput is examples/s over the logged intervals after step `--skip`. For a
GPT run, MFU counts 6 x (weights touched per token) + 12 x layers x width x context FLOPs per token against
`--peak` (bf16 matmul FLOP/s measured on the same GPU).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml


def figures(run: Path, skip: int = 0, peak: float = 0.0) -> dict:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in rows if "loss" in r and "examples_per_s" in r]
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    status = json.loads((run / "status.json").read_text())
    out = {
        "run": run.name,
        "steps": steps[-1]["step"] if steps else 0,
        "batch": cfg["train"]["batch_size"],
        "train_s": round(steps[-1]["time"] - (run / "spec.json").stat().st_mtime, 2) if steps else None,
        "final": {k: v for k, v in status.get("final", {}).items() if isinstance(v, (int, float))},
    }
    steady = [r for r in steps if r["step"] > skip] or steps
    if steady:
        # harmonic mean over equal-step intervals: total examples / total seconds
        out["examples_per_s"] = round(len(steady) / sum(1 / r["examples_per_s"] for r in steady), 1)
    val = [r for r in rows if "val_loss" in r]
    if val:
        out["last_val_loss"] = round(val[-1]["val_loss"], 4)
    m = cfg.get("model", {})
    if m.get("name") == "gpt" and steady:
        spec = json.loads((run / "spec.json").read_text())
        from deeprecipe.models.gpt import SIZES

        L, _, C = SIZES[m["size"]] if m.get("size") else (m["n_layer"], m["n_head"], m["n_embd"])
        V = spec["vocab_size"]
        T = m.get("block_size") or spec["extra"]["block_size"]
        tokens = out["examples_per_s"] * T
        flops = (6 * (12 * L * C * C + V * C) + 12 * L * C * T) * tokens
        out["tokens_per_s"] = round(tokens)
        out["model_tflops"] = round(flops / 1e12, 1)
        if peak:
            out["mfu"] = round(flops / (peak * 1e12), 4)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", nargs="?")
    p.add_argument("--skip", type=int, default=0, help="leave out the log lines up to this step (warm-up)")
    p.add_argument("--peak", type=float, default=0.0, help="bf16 matmul peak in TFLOP/s, for MFU")
    p.add_argument("--peak-only", action="store_true")
    a = p.parse_args()
    if a.peak_only:
        import torch

        from lm_speed import matmul_peak

        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        n = 8192 if dev.type == "cuda" else 1024
        print(f"{matmul_peak(dev, torch.bfloat16, n, reps=10) / 1e12:.1f}")
        return
    print(json.dumps(figures(Path(a.run), a.skip, a.peak)))


if __name__ == "__main__":
    main()
