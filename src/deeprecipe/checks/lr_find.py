"""The learning-rate range test: raise the lr exponentially, one batch per step, until the loss blows up.

It trains copies: the model and optimizer handed in (and the global RNG) are left exactly as they were.
The suggestion is the rule of thumb: a tenth of the lr where the smoothed loss is lowest (well before the
blow-up, where the loss still falls steeply).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn


@dataclass
class LRFind:
    lrs: list[float]
    losses: list[float]  # smoothed (bias-corrected EMA)
    best_lr: float  # where the smoothed loss is lowest
    steepest_lr: float  # where it falls fastest per decade, before the lowest point
    suggestion: float
    diverged: bool


def lr_range_test(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    batch: Callable[[int], Any],
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    start: float = 1e-6,
    end: float = 1.0,
    steps: int = 100,
    clip: float = 0.0,
    beta: float = 0.9,
    diverge: float = 4.0,
    progress: Callable[[int, float, float], None] | None = None,
) -> LRFind:
    """`progress(step, lr, smoothed loss)` is called after every step that kept going."""
    devices = [p.device for p in model.parameters() if p.is_cuda][:1]
    with torch.random.fork_rng(devices=devices):
        # one deepcopy of both: the copied optimizer holds the copied parameters (and its own state)
        m, o = copy.deepcopy((model, opt))
        m.train()
        lrs, smooth, avg, best = [], [], 0.0, math.inf
        for k in range(steps):
            lr = start * (end / start) ** (k / max(1, steps - 1))
            for g in o.param_groups:
                g["lr"] = lr * g.get("lr_scale", 1.0)
            loss = loss_fn(m, batch(k))
            o.zero_grad(set_to_none=True)
            loss.backward()
            if clip > 0:
                nn.utils.clip_grad_norm_(m.parameters(), clip)
            o.step()
            v = float(loss.detach())
            avg = beta * avg + (1 - beta) * v
            s = avg / (1 - beta ** (k + 1))
            if not math.isfinite(s) or (k > 5 and s > diverge * best):
                break
            lrs.append(lr)
            smooth.append(s)
            best = min(best, s)
            if progress:
                progress(k + 1, lr, s)
    diverged = len(lrs) < steps
    i_best = min(range(len(smooth)), key=smooth.__getitem__) if smooth else 0
    # slope per step of log-lr, on the way down to the lowest point
    slopes = [smooth[i + 1] - smooth[i] for i in range(max(0, i_best))]
    i_steep = min(range(len(slopes)), key=slopes.__getitem__) if slopes else i_best
    best_lr = lrs[i_best] if lrs else start
    return LRFind(lrs, smooth, best_lr, lrs[i_steep] if lrs else start, best_lr / 10, diverged)
