"""GPT training-step speed: deeprecipe's GPT step side by side with a plain PyTorch GPT loop written the usual
way (fp32, eager, attention by hand with a mask), same config and batch; and model FLOPs utilization (MFU)
against the machine's measured fp32 and bf16 matmul peaks.

    python bench/lm_speed.py                          # 6 layers, 6 heads, width 384, context 256, batch 8
    python bench/lm_speed.py --compile --batch 64     # on a GPU

deeprecipe's step is what the engine runs: bf16 autocast where the hardware has it (engine/device.py),
scaled_dot_product_attention (in bf16 on the CPU up to 512 keys the explicit form: models/gpt.py attention),
fused AdamW (CUDA and CPU), optional torch.compile. FLOPs per token of a training step are counted as
6 * (weights touched per token, the head included) + 12 * layers * width * context (attention).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import shlex
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from deeprecipe.engine.device import pick_device, pick_dtype
from deeprecipe.models.gpt import GPT

# ---------------------------------------------------------------------------------------------- the baseline


class PlainBlock(nn.Module):
    def __init__(self, C: int, H: int, T: int, dropout: float):
        super().__init__()
        self.H = H
        self.ln1, self.ln2 = nn.LayerNorm(C), nn.LayerNorm(C)
        self.qkv, self.proj = nn.Linear(C, 3 * C), nn.Linear(C, C)
        self.fc, self.out = nn.Linear(C, 4 * C), nn.Linear(4 * C, C)
        self.drop = nn.Dropout(dropout)
        self.register_buffer("mask", torch.tril(torch.ones(T, T)).view(1, 1, T, T))

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(C, 2)
        q, k, v = (t.view(B, T, self.H, C // self.H).transpose(1, 2) for t in (q, k, v))
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(self.mask[:, :, :T, :T] == 0, float("-inf"))
        att = self.drop(F.softmax(att, dim=-1))
        y = (att @ v).transpose(1, 2).contiguous().view(B, T, C)
        x = x + self.drop(self.proj(y))
        return x + self.drop(self.out(F.gelu(self.fc(self.ln2(x)))))


class PlainGPT(nn.Module):
    def __init__(self, V: int, T: int, L: int, H: int, C: int, dropout: float):
        super().__init__()
        self.tok, self.pos = nn.Embedding(V, C), nn.Embedding(T, C)
        self.blocks = nn.Sequential(*[PlainBlock(C, H, T, dropout) for _ in range(L)])
        self.ln, self.head = nn.LayerNorm(C), nn.Linear(C, V, bias=False)

    def forward(self, idx, targets):
        x = self.tok(idx) + self.pos(torch.arange(idx.size(1), device=idx.device))
        logits = self.head(self.ln(self.blocks(x)))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


# ---------------------------------------------------------------------------------------------- measuring


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int, reps: int = 5) -> float:
    """Best FLOP/s of an n x n matmul (the practical peak this machine reaches)."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(reps):
        sync(device)
        t = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def time_steps(step, device: torch.device, steps: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        step()
    sync(device)
    t = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return (time.perf_counter() - t) / steps


def cpu_name() -> str:
    try:
        lines = open("/proc/cpuinfo").read().splitlines()
        return next(ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--width", type=int, default=384)
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--vocab", type=int, default=65)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--compile", action="store_true", help="torch.compile deeprecipe's model")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--device", default="auto")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    dev = pick_device(a.device)
    dtype, why = pick_dtype(dev, "auto")
    print(why)  # what auto chose on this machine, and why
    L, H, C, T, B, V = a.layers, a.heads, a.width, a.context, a.batch, a.vocab
    x = torch.randint(0, V, (B, T), device=dev)
    y = torch.randint(0, V, (B, T), device=dev)

    torch.manual_seed(0)
    model = GPT(V, T, L, H, C, a.dropout).to(dev)
    net = torch.compile(model) if a.compile else model
    # the engine's update (engine/optim.py): the fused AdamW kernel on CUDA and on the CPU
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=dev.type in ("cuda", "cpu") or None)

    def ours():
        with torch.autocast(dev.type, dtype=dtype, enabled=dtype is not None):
            _, loss = net(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    plain = PlainGPT(V, T, L, H, C, a.dropout).to(dev)
    popt = torch.optim.AdamW(plain.parameters(), lr=1e-4)

    def baseline():
        loss = plain(x, y)
        loss.backward()
        popt.step()
        popt.zero_grad()

    t_plain = time_steps(baseline, dev, a.steps)
    t_ours = time_steps(ours, dev, a.steps, warmup=5 if a.compile else 2)
    n = 8192 if dev.type == "cuda" else 1024
    peak32, peak16 = matmul_peak(dev, torch.float32, n), matmul_peak(dev, torch.bfloat16, n)
    weights = 12 * L * C * C + V * C  # blocks' matmuls + the head
    flops = (6 * weights + 12 * L * C * T) * B * T  # per training step
    print(
        f"machine: {torch.cuda.get_device_name(dev) if dev.type == 'cuda' else cpu_name()}, "
        f"{os.cpu_count()} cores, torch {torch.__version__}, threads {torch.get_num_threads()}, "
        f"load {os.getloadavg()[0]:.1f}"
    )
    print(f"command: python {shlex.join(sys.argv)}")
    print(f"config: {L} layers, {H} heads, width {C}, context {T}, batch {B}, vocab {V}; {a.steps} timed steps")
    print(f"plain PyTorch (fp32, eager, manual masked attention): {B * T / t_plain:10,.0f} tokens/s")
    print(
        f"deeprecipe ({dtype or 'fp32'} autocast, models/gpt.py attention{', compiled' if a.compile else ''}):"
        f" {B * T / t_ours:10,.0f} tokens/s   ratio {t_plain / t_ours:.2f}x"
    )
    print(f"matmul peak ({n}x{n}): fp32 {peak32 / 1e9:,.0f} GFLOP/s, bf16 {peak16 / 1e9:,.0f} GFLOP/s")
    ach = flops / t_ours
    print(
        f"deeprecipe step: {ach / 1e9:,.1f} GFLOP/s = MFU {ach / peak16:.1%} of bf16 peak, "
        f"{ach / peak32:.1%} of fp32 peak; plain: {flops / t_plain / peak32:.1%} of fp32 peak"
    )


if __name__ == "__main__":
    main()
