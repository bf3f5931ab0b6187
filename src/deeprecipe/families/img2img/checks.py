"""The checks of an image-to-image net, which has no ln C and whose adversarial losses need not fall:

- overfit: G alone (the pixel loss, model.adv set to 0) on a few examples drives them to PSNR > 40 dB (a warning
  below, a failure when G does not even beat its own input);
- input_copy: after a short run of the loop's step, the output on held-out images must not be the net's own
  input (the bicubic image, the image with its hole, A) at 8 bit: a generator that copies is caught; label2image,
  whose input is no picture, fails when different label maps give the same image (a net blind to its input);
- grad_flow: every parameter of G and D gets a nonzero gradient in a short run of both turns (G alone when
  model.adv=0, whose D is never run).
"""

from __future__ import annotations

import torch

from deeprecipe.checks.core import Ctx, Verdict, fit
from deeprecipe.checks.training import grad_flow_verdict
from deeprecipe.families.img2img.degrade import input_image
from deeprecipe.families.img2img.metrics import psnr, to_unit

OVERFIT_DB = 40.0
COPY_DB = 60.0  # output this close to the input (PSNR) is a copy: both are the same 8-bit image (capped 100 dB)


def grad_flow(ctx: Ctx) -> Verdict:
    f = fit(ctx, ctx.model(), 3, ctx.train_batch)
    got = f.got_grad
    if ctx.cfg.model.name == "pix2pix" and not ctx.cfg.model.adv:  # a pixel regression: D is neither run nor trained
        got = {n: g for n, g in got.items() if not n.startswith("discriminator.")}
    return grad_flow_verdict(got, f.frozen)


def _psnr(model, batch) -> float:
    with torch.no_grad():
        out = model(batch[0]).float()
    return float(psnr(to_unit(out), to_unit(batch[1])).mean())


def overfit(ctx: Ctx) -> Verdict:
    """One batch, G's pixel loss only, no weight decay: PSNR on it > 40 dB within the step budget (a warning below; a
    failure when G does not even beat its own input, or stays under 15 dB where the input is no picture)."""
    b = ctx.train_batch(0, size=ctx.overfit_examples, augment=False)
    model = ctx.model()
    adv = ctx.cfg.model.adv
    ctx.cfg.model.adv = 0.0
    try:
        lr = max(ctx.cfg.optim.lr, 3e-3)
        M = ctx.cfg.model  # stop once the pixel loss is at about 40 dB: |d| 0.003, d^2 1e-4 (in [-1, 1] units)
        until = M.l1 * (0.003 if M.pixel_loss == "l1" else 1e-4) if M.name == "pix2pix" else 0.01
        losses = fit(ctx, model, ctx.overfit_steps, lambda s: b, lr=lr, weight_decay=0.0, until=until).losses
        steps = len(losses) // len(ctx.family.parts(model, ctx.cfg))  # a loss per trained part and step
    finally:
        ctx.cfg.model.adv = adv
    model.train()  # BatchNorm on the batch's statistics, as it trained
    value = _psnr(model, b)
    pic = input_image(b[0], ctx.spec.extra["mode"])
    floor = 15.0
    if pic is not None and pic.shape[1] == b[1].shape[1]:
        floor = float(psnr(to_unit(pic), to_unit(b[1])).mean()) + 1.0
    measured = f"PSNR {value:.1f} dB after {steps} steps on {len(b[0])} examples"
    if value > OVERFIT_DB:
        return Verdict("overfit", "pass", measured, f"> {OVERFIT_DB:.0f} dB", "", value)
    return Verdict(
        "overfit",
        "warn" if value > floor else "fail",
        measured + f" (fail below {floor:.1f} dB)",
        f"> {OVERFIT_DB:.0f} dB",
        "G cannot memorize a few images: look for a clipped or detached output, a wrong target range, "
        "or too few steps (--overfit-steps)",
        value,
    )


def input_copy(ctx: Ctx) -> Verdict:
    """After a short run, held-out outputs vs the net's own input: PSNR(output, input) >= 60 dB is a copy."""
    mode = ctx.spec.extra["mode"]
    model = ctx.model()
    fit(ctx, model, ctx.steps, ctx.train_batch)
    model.eval()
    x, t = ctx.heldout_batch(16)
    pic = input_image(x, mode)
    if mode == "label2image":
        return _label_blind(model, x, t)
    if pic is None or pic.shape[1] != t.shape[1]:
        return Verdict("input_copy", "skip", advice=f"{mode}: the input is not an image of the output's kind")
    with torch.no_grad():
        out = to_unit(model(x).float())
    pic = to_unit(pic)
    same = float(psnr(out, pic).mean())
    gain = float(psnr(out, to_unit(t)).mean() - psnr(pic, to_unit(t)).mean())
    measured = f"PSNR(output, input) {same:.1f} dB; output vs target {gain:+.2f} dB over the input"
    return _copy_verdict(
        same,
        measured,
        "the net returns its input: a skip connection that bypasses G, a zero residual that never learns, "
        "or a generator whose output is not used",
    )


def _copy_verdict(same: float, measured: str, advice: str) -> Verdict:
    """input_copy fails when two images that should differ are `same` >= COPY_DB dB alike."""
    if same >= COPY_DB:
        return Verdict("input_copy", "fail", measured, f"< {COPY_DB:.0f} dB", advice, same)
    return Verdict("input_copy", "pass", measured, f"< {COPY_DB:.0f} dB", "", same)


def _label_blind(model, x: torch.Tensor, t: torch.Tensor) -> Verdict:
    """label2image has no picture to copy; its silent bug is the other way round: a net that ignores its label
    map answers every map with the same image. Outputs of different maps at PSNR >= 60 dB to each other fail."""
    with torch.no_grad():
        out = to_unit(model(x).float())
    same = float(psnr(out, out.roll(1, 0)).mean())
    tt = to_unit(t)
    gain = float(psnr(out, tt).mean() - psnr(out, tt.roll(1, 0)).mean())
    measured = f"PSNR between outputs of different label maps {same:.1f} dB; own scene vs another's {gain:+.2f} dB"
    advice = "the net draws the same image for every label map: its input is zeroed, detached or not used"
    return _copy_verdict(same, measured, advice)
