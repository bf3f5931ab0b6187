"""The driving family's own checks: leakage is judged by episode, not by how alike two frames look.

Frames of two different episodes on the same road look nearly the same (lane lines and a few cars), so the
built-in near-duplicate scan would call a correct split leaky; consecutive frames of one episode differ a
little, so an exact hash would miss a frame-level split. An episode's seed is what must not cross splits.
"""

from __future__ import annotations

import torch

from deeprecipe.checks.core import Ctx, Verdict


def leakage(ctx: Ctx) -> Verdict:
    """Episodes (seeds) of val/test that also have frames in train: a frame-level split, the metric a lie."""
    d = ctx.data
    train = getattr(d.train, "episodes", None)
    if train is None:
        return Verdict("leakage", "skip", advice="the training split does not say which episode a frame is from")
    seen = set(torch.as_tensor(train).unique().tolist())
    parts, worst = [], 0.0
    for name in ("val", "test"):
        s = getattr(d, name)
        eps = getattr(s, "episodes", None) if s is not None else None
        if eps is None or not len(eps):
            continue
        eps = torch.as_tensor(eps)
        shared = torch.tensor([int(e) in seen for e in eps.tolist()])
        frac = float(shared.float().mean())
        worst = max(worst, frac)
        parts.append(f"{name}: {len(set(eps[shared].tolist()))} of {len(eps.unique())} episodes ({frac:.1%} of frames)")
    if not parts:
        return Verdict("leakage", "skip", advice="no val/test split to compare with train")
    measured = "; ".join(parts) + " also in train"
    if worst > 0:
        return Verdict(
            "leakage",
            "fail",
            measured,
            "0",
            "frames of one episode are in train and in an evaluation split: split by episode seed, never by frame",
            worst,
        )
    return Verdict("leakage", "pass", measured, "0", "", worst)
