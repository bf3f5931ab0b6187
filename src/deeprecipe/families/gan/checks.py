"""The checks of a GAN: it has no closed-form loss at init and no single loss to overfit or to see go down, so
the family skips those and replaces two built-in checks with these, which look at both nets:

- grad_flow: every parameter of G and D gets a nonzero gradient in a short run of the loop's own step;
- dependency: in eval mode, generated image i depends only on its own noise z_i (and label), and D's logit
  for image i only on image i (a reshape across the batch, or a norm on batch statistics at eval, mixes them).

The built-in seed check runs as for every family (two short runs of the loop's step, D's and G's losses), and the
data scan and the batch grid are the built-in ones (images in [-1, 1], shown as they enter D).
"""

from __future__ import annotations

import torch

from deeprecipe.checks.core import Ctx, Verdict, fit
from deeprecipe.checks.training import awake, combined, dependency_verdict, grad_flow_verdict
from deeprecipe.common.adversarial import fit as fit_real


def grad_flow(ctx: Ctx) -> Verdict:
    """Every parameter of G and D gets a nonzero gradient in a short run of both turns."""
    f = fit(ctx, ctx.model(), 3, ctx.train_batch)
    return grad_flow_verdict(f.got_grad, f.frozen)


def dependency(ctx: Ctx) -> Verdict:
    """G: a fixed random projection of each generated image against the noise; D: each logit against the images."""
    model = awake(ctx.model()).eval()
    G, D = model.generator, model.discriminator
    x, y = ctx.train_batch(0, size=4, augment=False)[:2]
    x, y = fit_real(x, model.shape), y if model.num_classes else None
    z = torch.randn(len(x), model.latent, generator=torch.Generator().manual_seed(ctx.cfg.train.seed)).to(x.device)
    w = torch.randn(model.shape, generator=torch.Generator().manual_seed(1)).to(x.device)

    def first(b):
        return b[0]

    def put(b, t):
        return (t, b[1])

    gen = dependency_verdict(lambda b: (G(b[0], b[1]) * w).flatten(1).sum(1), (z, y), first, put, G, what="G: ")
    dis = dependency_verdict(lambda b: D(b[0], b[1]), (x, y), first, put, D, what="D: ")
    return combined([gen, dis])
