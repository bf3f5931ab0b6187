"""Stage 2 of the recipe, skeleton and dumb baselines: the checks that train a little.

They share one short run on real inputs (core.real_run: ctx.steps steps of ctx.batch_size at the recipe's
peak lr, constant after its warmup), so baseline, loss_down, dynamics and grad_flow cost one run together.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from deeprecipe.checks.core import Ctx, Verdict, eval_loss, fit, init_head_from_priors, labels_of, real_run

# ---------------------------------------------------------------------------------------------- seed


def seed(ctx: Ctx) -> Verdict:
    """Two short runs with the same seed give the same losses (bitwise on CPU)."""
    n = 5
    runs = [fit(ctx, ctx.model(), n, ctx.train_batch).losses for _ in range(2)]
    return seed_verdict(ctx, runs, n)


def seed_verdict(ctx: Ctx, runs: list[list[float]], n: int) -> Verdict:
    """The verdict on two runs' losses (a family with its own training step, e.g. the GAN, makes the runs)."""
    diff = max(abs(a - b) for a, b in zip(*runs)) if all(runs) and len(runs[0]) == len(runs[1]) else float("inf")
    measured = f"max |loss diff| {diff:.2g} over {n} steps"
    if diff <= 1e-6:
        return Verdict("seed", "pass", measured, "0", "", diff)
    if diff <= 1e-3 and ctx.rt.device.type != "cpu":
        return Verdict(
            "seed",
            "warn",
            measured,
            "0",
            "GPU kernels are not bitwise deterministic; for exact repeats use torch.use_deterministic_algorithms(True)",
            diff,
        )
    return Verdict(
        "seed",
        "fail",
        measured,
        "0",
        "randomness not drawn from the seeded generators (time, "
        "os.urandom, Python random, an unseeded Generator) in the model init, data or forward",
        diff,
    )


# ---------------------------------------------------------------------------------------------- init


def _init_batches(ctx: Ctx, model: nn.Module, k: int = 2) -> float:
    model.train()  # as training sees it (BatchNorm on batch statistics); the model is thrown away
    with torch.no_grad():
        return sum(float(ctx.loss(model, ctx.train_batch(s))) for s in range(k)) / k


def _priors(ctx: Ctx) -> torch.Tensor | None:
    C, y = ctx.spec.num_classes, labels_of(ctx.data.train)
    if not C or y is None:
        return None
    y = y[(y >= 0) & (y < C)]
    counts = torch.bincount(y.flatten(), minlength=C)[:C].double()
    return counts / counts.sum()


def init_loss(ctx: Ctx) -> Verdict:
    """The loss of the untrained net against its closed form (ln C: the net should be unsure of every class);
    the entropy of the label priors is accepted too (a head initialized from the priors)."""
    exp = ctx.expected_init_loss()
    if exp is None:
        return Verdict("init_loss", "skip", advice="no closed-form loss at init (define expected_init_loss)")
    expected, why = exp
    measured = _init_batches(ctx, ctx.model())
    p = _priors(ctx)
    targets = [expected] + ([float(-(p * p.clamp_min(1e-12).log()).sum())] if p is not None else [])
    rel = min(abs(measured - t) / max(t, 1e-6) for t in targets)
    return Verdict(
        "init_loss",
        "pass" if rel <= 0.1 else "warn" if rel <= 0.5 else "fail",
        f"{measured:.3f}",
        f"{expected:.3f} ({why})",
        ""
        if rel <= 0.1
        else "the untrained net is confident: look at the final layer's init scale and "
        "for a softmax/log applied before the loss",
        rel,
    )


def init_prior(ctx: Ctx) -> Verdict:
    """The untrained net's mean prediction should match the label frequencies: KL(priors || mean prediction).
    Near uniform on imbalanced data is a warning with the fix (init_head_from_priors); far from both is a
    wrong head init."""
    p = _priors(ctx)
    if p is None:
        return Verdict("init_prior", "skip", advice="no class labels")
    model = ctx.model()

    def mean_pred(m):
        m.train()
        with torch.no_grad():
            out = m(ctx.get_input(ctx.train_batch(0)))
        out = (out[0] if isinstance(out, (tuple, list)) else out).float()
        dim = 1 if out.ndim >= 4 else out.ndim - 1  # (B, C), (B, T, V): last; (B, C, H, W): 1
        return out.softmax(dim).movedim(dim, -1).reshape(-1, len(p)).mean(0).double().cpu()

    q = mean_pred(model)
    kl = _kl(p, q)
    to_uniform = float((q.clamp_min(1e-12).log().neg() - math.log(len(p))).mean())  # KL(uniform || q)
    measured = f"KL(priors || mean prediction) = {kl:.3f}"
    if kl <= 0.1:
        return Verdict("init_prior", "pass", measured, "<= 0.1", "", kl)
    if to_uniform <= 0.1:
        fixed = ctx.model()
        ok = init_head_from_priors(fixed, p.float())
        after = f"; with head bias = log(priors) it is {_kl(p, mean_pred(fixed)):.3f}" if ok else ""
        return Verdict(
            "init_prior",
            "warn",
            measured + after,
            "<= 0.1",
            "imbalanced labels: set the head bias to log(priors) (deeprecipe.checks.init_head_from_priors)",
            kl,
        )
    return Verdict(
        "init_prior",
        "fail",
        measured,
        "<= 0.1",
        "the untrained net prefers some classes for no "
        "reason: look at the head's bias/weight init (zero it, or set the bias to log priors)",
        kl,
    )


def _kl(p: torch.Tensor, q: torch.Tensor) -> float:
    return float((p * (p.clamp_min(1e-12).log() - q.clamp_min(1e-12).log())).sum())


# ---------------------------------------------------------------------------------------------- training


def baseline(ctx: Ctx) -> Verdict:
    """Train on zeroed inputs with the same batches: real inputs must reach a clearly lower held-out loss."""
    real, _ = real_run(ctx)
    held = ctx.heldout_batch()
    model = ctx.memo["real"][2]
    real_loss = eval_loss(ctx, model, held)
    zero_model = ctx.model()
    fit(ctx, zero_model, ctx.steps, ctx.train_batch, transform=ctx.blank)
    zero_loss = eval_loss(ctx, zero_model, ctx.blank(held))
    ratio = real_loss / max(zero_loss, 1e-8)
    measured = f"held-out loss {real_loss:.3f} (real) vs {zero_loss:.3f} (zeroed inputs)"
    if not math.isfinite(ratio) or ratio >= 0.95:
        return Verdict(
            "baseline",
            "fail",
            measured,
            "real < 0.8 x zeroed",
            "the net does no better than one "
            "that never sees its input: labels not matching inputs, or an input that never reaches it",
            ratio,
        )
    if ratio >= 0.8:
        return Verdict(
            "baseline",
            "warn",
            measured,
            "real < 0.8 x zeroed",
            f"real inputs help only a little after {ctx.steps} steps: check the pairing of inputs and labels",
            ratio,
        )
    return Verdict("baseline", "pass", measured, "real < 0.8 x zeroed", "", ratio)


def overfit(ctx: Ctx) -> Verdict:
    """A few examples, no augmentation, no dropout, no weight decay: the loss must go to ~0. If it cannot,
    it is a bug (a softmax before the loss, a clipped output, labels that do not fit), not a hyperparameter."""
    b = ctx.train_batch(0, size=ctx.overfit_examples, augment=False)
    model = ctx.model()
    for m in model.modules():  # dropout off, BatchNorm still on batch statistics
        if isinstance(m, nn.modules.dropout._DropoutNd):
            m.p = 0.0
    losses = fit(ctx, model, ctx.overfit_steps, lambda s: b, weight_decay=0.0, until=0.005).losses
    model.train()
    with torch.no_grad():
        final = float(ctx.loss(model, b))
    measured = f"{final:.4f} after {len(losses)} steps on {len(b[0])} examples"
    if not math.isfinite(final) or final > 0.25:
        return Verdict(
            "overfit",
            "fail",
            measured,
            "~0 (< 0.05)",
            "the net cannot memorize a few examples: look "
            "for a softmax/log before the loss, frozen or detached layers, mismatched labels",
            final,
        )
    if final > 0.05:
        return Verdict(
            "overfit",
            "warn",
            measured,
            "~0 (< 0.05)",
            "nearly memorized: more steps or a higher lr "
            "would finish it; a plateau here points at a capacity or output bug",
            final,
        )
    return Verdict("overfit", "pass", measured, "~0 (< 0.05)", "", final)


def loss_down(ctx: Ctx) -> Verdict:
    """The training loss goes down over the first steps at the recipe's learning rate."""
    f, _ = real_run(ctx)
    k = max(1, min(5, len(f.losses) // 4))
    first, last = f.losses[0], sum(f.losses[-k:]) / k  # from the loss at init to the mean of the last steps
    ratio = last / max(first, 1e-8)
    measured = f"{first:.3f} -> {last:.3f} over {len(f.losses)} steps at lr {ctx.cfg.optim.lr:g}"
    if not math.isfinite(ratio) or ratio > 0.97:
        return Verdict(
            "loss_down",
            "fail",
            measured,
            "last < 0.85 x init",
            "the loss does not go down: lr too high (it grows) or too low, or layers that do not train (see grad_flow)",
            ratio,
        )
    if ratio > 0.85:
        return Verdict(
            "loss_down",
            "warn",
            measured,
            "last < 0.85 x init",
            "the loss goes down slowly: try `deeprecipe lr-find` for the learning rate",
            ratio,
        )
    return Verdict("loss_down", "pass", measured, "last < 0.85 x init", "", ratio)


def dynamics(ctx: Ctx) -> Verdict:
    """Predictions on a fixed held-out batch, recorded along the short run (plots/prediction_dynamics.png):
    their mean loss must fall, so what the net learns carries over to examples it does not train on."""
    from deeprecipe.checks.plots import dynamics as draw

    _, dyn = real_run(ctx)
    steps = sorted(dyn)
    path = ctx.plot_path("prediction_dynamics.png")
    draw(steps, [[math.exp(-v) for v in dyn[s]] for s in steps], path)
    start, end = (sum(dyn[s]) / len(dyn[s]) for s in (steps[0], steps[-1]))
    moved = max(abs(a - b) for a, b in zip(dyn[steps[0]], dyn[steps[-1]]))
    ratio = end / max(start, 1e-8)
    v = Verdict(
        "dynamics",
        "pass",
        f"fixed-batch loss {start:.3f} -> {end:.3f}",
        "falls (< 0.9 x start)",
        "",
        ratio,
        [str(path.relative_to(ctx.out))],
    )
    if moved < 1e-4 or not math.isfinite(ratio) or ratio >= 0.95:
        v.status, v.advice = (
            "fail",
            (
                "predictions on held-out examples do not improve: labels shuffled apart from "
                "inputs, or the evaluated model is not the trained one"
            ),
        )
    elif ratio >= 0.9:
        v.status, v.advice = "warn", "held-out predictions barely improve in the short run"
    return v


def grad_flow(ctx: Ctx) -> Verdict:
    """Every parameter of a freshly built model trains: none frozen, each gets a nonzero gradient in the run."""
    f, _ = real_run(ctx)
    return grad_flow_verdict(f.got_grad, f.frozen)


def grad_flow_verdict(got_grad: dict[str, bool], frozen: list[str]) -> Verdict:
    """The grad_flow verdict from which tensors got a gradient in a short run and which were frozen."""
    dead = [n for n, g in got_grad.items() if not g]
    bad = frozen + dead
    measured = f"{len(frozen)} frozen, {len(dead)} without gradient, of {len(got_grad) + len(frozen)} tensors"
    if bad:
        return Verdict(
            "grad_flow",
            "fail",
            measured + f" ({', '.join(bad[:4])})",
            "0",
            "layers that never learn: requires_grad=False, a .detach()/no_grad in forward, or an unused layer",
            len(bad),
        )
    return Verdict("grad_flow", "pass", measured, "0", "", 0)


# ---------------------------------------------------------------------------------------------- saliency

SALIENCY_IMAGES = 8  # held-out images whose explanation is judged


def saliency(ctx: Ctx) -> Verdict:
    """After the short run, Grad-CAM of the true label's score (the family's saliency_score) on a few held-out
    images must pass the saliency sanity check (engine/explain.py sanity): its map changes when the weights are
    randomised, and it stands out from the maps of untrained copies of the net. An explanation that does not is
    uninformative: the net has learnt nothing it can show yet, or the explainer looks at the wrong layer."""
    from deeprecipe.core import UserError
    from deeprecipe.engine import explain as ex

    held = ctx.heldout_batch(SALIENCY_IMAGES)
    x = ctx.get_input(held)
    if not (x.is_floating_point() and x.ndim == 4):
        return Verdict("saliency", "skip", advice="Grad-CAM needs image inputs (B, C, H, W)")
    probe = ctx.model()
    if ctx.family.saliency_score(probe, held, ctx.cfg) is None:
        return Verdict("saliency", "skip", advice=f"task '{ctx.cfg.task}' names no score to explain (saliency_score)")
    try:
        ex.cam_layer(probe, x)
    except UserError:
        return Verdict("saliency", "skip", advice="the model has no conv feature map for Grad-CAM (an MLP)")
    real_run(ctx)
    model = ctx.memo["real"][2]
    results = []
    for i in range(len(x)):
        one = tuple(t[i : i + 1] if isinstance(t, torch.Tensor) else t for t in held)
        xi = ctx.get_input(one)

        def attribute(net, one=one, xi=xi):
            def forward(z):
                return ctx.family.saliency_score(net, ctx.put_input(one, z), ctx.cfg)

            with torch.enable_grad():
                return ex.image_attribution(forward, net, xi, None, "gradcam", torch.zeros_like(xi))[0][0]

        results.append(ex.sanity(model, attribute))
    flagged = [r for r in results if r["verdict"] == "uninformative"]
    ratios = sorted(r["ratio"] for r in results)
    measured = (
        f"Grad-CAM uninformative on {len(flagged)} of {len(results)} held-out images (distance to untrained "
        f"nets' maps {ratios[len(ratios) // 2]:.2f}x theirs, median; rank correlation with every layer "
        f"randomised {max(r['final'] for r in results):.2f} at most)"
    )
    expected = f"at most half flagged (distance > 1x, correlation <= {ex.SANITY_THRESHOLD})"
    if 2 * len(flagged) > len(results):
        return Verdict(
            "saliency",
            "warn",
            measured,
            expected,
            "the explanation shows nothing the net learnt: train longer (the short run may be too short), "
            "or the net does not use its input (see baseline); `deeprecipe explain RUN FILES --sanity` tells more",
            len(flagged) / len(results),
        )
    return Verdict("saliency", "pass", measured, expected, "", len(flagged) / len(results))


# ---------------------------------------------------------------------------------------------- dependency


def dependency(ctx: Ctx) -> Verdict:
    """The gradient of example i's loss with respect to the input of example j != i is zero (eval mode: any
    mixing is a bug, e.g. a view/reshape across the batch or a norm on batch statistics at eval time).
    With CAUSAL, the loss at position t must not depend on inputs after t either."""
    model = awake(ctx.model()).eval()
    b = ctx.train_batch(0, size=4, augment=False)
    return dependency_verdict(
        lambda bb: ctx.per_example_loss(model, bb), b, ctx.get_input, ctx.put_input, model, ctx.causal
    )


def awake(model: nn.Module) -> nn.Module:
    """Weights that start at exactly zero (a head zeroed at init, a residual branch started as the identity)
    make some gradients exactly zero at step 0; the dependency check is about the wiring, so such tensors get
    small random values (seeded) before it measures."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.numel() > 1 and not bool(p.any()):
                p.copy_(torch.randn(p.shape, generator=g).mul_(0.02))
    return model


def input_grads(loss_fn, b, get_input, put_input, model: nn.Module, pick) -> torch.Tensor:
    """|d pick(per-example losses) / d input|, where the input is the batch's float input (same shape), or for
    integer ids (B, T) the output of the embeddings called on those very ids (largest over the features: (B, T));
    a model that copies the ids first is differentiated at the first embedding output shaped (B, T, ...)."""
    x = get_input(b)
    if x.is_floating_point():
        x = x.detach().clone().requires_grad_(True)
        (g,) = torch.autograd.grad(pick(loss_fn(put_input(b, x))), x, allow_unused=True)
        return torch.zeros_like(x) if g is None else g.detach().abs()
    leaves: list[torch.Tensor] = []
    for same in (True, False):  # the embedding of this tensor (the source, not the target of a translator)

        def grab(module, args, out, same=same):
            hit = args[0] is x if same else not leaves
            if hit and out.shape[: x.ndim] == x.shape:
                out = out.detach().requires_grad_(True)
                leaves.append(out)
                return out

        handles = [m.register_forward_hook(grab) for m in model.modules() if isinstance(m, nn.Embedding)]
        try:
            per = loss_fn(b)
        finally:
            for h in handles:
                h.remove()
        if leaves:
            break
    if not leaves:
        raise RuntimeError("no float input and no embedding of the ids to differentiate")
    grads = torch.autograd.grad(pick(per), leaves, allow_unused=True)
    g = torch.zeros(x.shape, device=x.device)
    for gl in grads:
        if gl is not None:
            g = torch.maximum(g, gl.detach().abs().flatten(x.ndim).amax(-1).float())
    return g


def dependency_verdict(
    loss_fn,
    b,
    get_input,
    put_input,
    model: nn.Module,
    causal: bool = False,
    lengths: list[int] | None = None,
    what: str = "",
) -> Verdict:
    """d loss_i / d input_j for the first and last example i; with `causal`, d loss_(i,t) / d input_(i,>t) at
    t = half of example i's length (`lengths`: its labelled positions; default the whole sequence)."""
    B = len(get_input(b))
    leak, own, future = 0.0, 0.0, 0.0
    for i in sorted({0, B - 1}):
        if causal:
            T = get_input(b).shape[1]
            t = max(0, min(T, lengths[i] if lengths is not None else T) - 1) // 2
            g = input_grads(loss_fn, b, get_input, put_input, model, lambda per, i=i, t=t: per[i, t])
            future = max(future, float(g[i, t + 1 :].max()) if t + 1 < T else 0.0)
            own = max(own, float(g[i, : t + 1].max()))
        else:
            g = input_grads(loss_fn, b, get_input, put_input, model, lambda per, i=i: per[i].sum())
            own = max(own, float(g[i].max()))
        others = torch.cat([g[:i], g[i + 1 :]])
        leak = max(leak, float(others.max()) if len(others) else 0.0)
    scale = max(own, 1e-30)
    rel, rel_future = leak / scale, future / scale
    measured = what + f"|d loss_i / d x_j| = {leak:.2g} (own {own:.2g})" + (f", future {future:.2g}" if causal else "")
    expected = "0 across examples" + (" and from the future" if causal else "")
    if own == 0:
        return Verdict(
            "dependency",
            "fail",
            measured,
            expected,
            "the loss of an example does not depend on its "
            "own input: the net ignores its input (or the input is detached)",
            float("inf"),
        )
    if rel > 1e-6:
        return Verdict(
            "dependency",
            "fail",
            measured,
            expected,
            "examples mix in the batch: a view/reshape across "
            "the batch dim, or a norm using batch statistics at eval time",
            rel,
        )
    if rel_future > 1e-6:
        return Verdict(
            "dependency",
            "fail",
            measured,
            expected,
            "position t sees inputs after t: the causal mask is missing or shifted",
            rel_future,
        )
    return Verdict("dependency", "pass", measured, expected, "", rel)


def combined(parts: list[Verdict]) -> Verdict:
    """One verdict from several (a translator's source and target side, a GAN's two nets): the worst part,
    with every part's measurement."""
    order = {"fail": 0, "warn": 1, "pass": 2, "skip": 3}
    worst = min(parts, key=lambda v: order.get(v.status, 3))
    worst.measured = "; ".join(v.measured for v in parts)
    worst.expected = "; ".join(dict.fromkeys(v.expected for v in parts if v.expected))
    return worst


__all__ = [
    "seed",
    "init_loss",
    "init_prior",
    "baseline",
    "overfit",
    "loss_down",
    "dynamics",
    "grad_flow",
    "dependency",
    "saliency",
    "dependency_verdict",
    "awake",
    "seed_verdict",
    "combined",
]
