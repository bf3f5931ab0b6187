"""The checks of a GAN: it has no closed-form loss at init and no single loss to overfit or to see go down, so
the family skips those and replaces three built-in checks with these, which run both nets:

- seed: two short runs of the engine's own training step (D's turn, then G's), same losses;
- grad_flow: every parameter of G and D gets a nonzero gradient in that run;
- dependency: in eval mode, generated image i depends only on its own noise z_i (and label), and D's logit
  for image i only on image i (a reshape across the batch, or a norm on batch statistics at eval, mixes them).

The data scan and the batch grid are the built-in ones (images in [-1, 1], shown as they enter D).
"""

from __future__ import annotations

import torch

from deeprecipe.checks.core import Ctx, Verdict
from deeprecipe.checks.training import awake, combined, dependency_verdict, grad_flow_verdict, seed_verdict
from deeprecipe.engine.loop import make_parts, train_step
from deeprecipe.families.gan.losses import fit

STEPS = 3  # steps of each short run


def gan_run(ctx: Ctx, steps: int = STEPS) -> tuple[list[float], dict[str, bool], list[str]]:
    """A short run through the engine's train_step, the batch of step s as the loop makes it: (losses d0, g0, d1,
    g1, ..., parameter -> got a nonzero gradient, frozen parameters)."""
    model = ctx.model()
    parts = make_parts(ctx.family, model, ctx.cfg, ctx.rt)
    named = [(n, p) for n, p in model.named_parameters()]
    got = {n: False for n, p in named if p.requires_grad}
    losses: list[float] = []
    model.train()

    def watch(n):  # the gradient as backward makes it (the step applies and clears it)
        def hook(grad):
            got[n] = got[n] or bool(grad.ne(0).any())

        return hook

    hooks = [p.register_hook(watch(n)) for n, p in named if p.requires_grad]
    try:
        for s in range(steps):
            r = train_step(ctx.family, model, parts, [ctx.train_batch(s)], ctx.cfg, ctx.rt)
            losses += [float(r.losses[part.name]) for part in parts]
    finally:
        for h in hooks:
            h.remove()
    return losses, got, [n for n, p in named if not p.requires_grad]


def seed(ctx: Ctx) -> Verdict:
    runs = [gan_run(ctx) for _ in range(2)]
    ctx.memo["gan_run"] = runs[0]
    return seed_verdict(ctx, [r[0] for r in runs], STEPS)


def grad_flow(ctx: Ctx) -> Verdict:
    if "gan_run" not in ctx.memo:
        ctx.memo["gan_run"] = gan_run(ctx)
    _, got, frozen = ctx.memo["gan_run"]
    return grad_flow_verdict(got, frozen)


def dependency(ctx: Ctx) -> Verdict:
    """G: a fixed random projection of each generated image against the noise; D: each logit against the images."""
    model = awake(ctx.model()).eval()
    G, D = model.generator, model.discriminator
    x, y = ctx.train_batch(0, size=4, augment=False)[:2]
    x, y = fit(x, model.shape), y if model.num_classes else None
    z = torch.randn(len(x), model.latent, generator=torch.Generator().manual_seed(ctx.cfg.train.seed)).to(x.device)
    w = torch.randn(model.shape, generator=torch.Generator().manual_seed(1)).to(x.device)

    def first(b):
        return b[0]

    def put(b, t):
        return (t, b[1])

    gen = dependency_verdict(lambda b: (G(b[0], b[1]) * w).flatten(1).sum(1), (z, y), first, put, G, what="G: ")
    dis = dependency_verdict(lambda b: D(b[0], b[1]), (x, y), first, put, D, what="D: ")
    return combined([gen, dis])
