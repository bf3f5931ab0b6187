"""Image generation with a GAN: its own short loop (two optimizers), sample grids, FID/IS and health checks.

A batch is (images uint8 (B, C, H, W), labels (B,)); `prepare` scales images to [-1, 1] (the range of G's
tanh) and they are resized on the device when the model draws another size. One step:
    D: L_D = -log D(x) - log(1 - D(G(z)))    (hinge: relu(1 - D(x)) + relu(1 + D(G(z))))
    G: L_G = -log D(G(z))                   (the non-saturating loss; hinge: -D(G(z)))
with Adam for each net, D's target for real images set by model.real_label (one-sided smoothing), and an
EMA of G's weights (train.ema) that every grid, sample and score uses. The noise of step s comes from a
generator seeded by (seed, s) and the batch of step s from data/core.py, so a resumed run is bitwise the
run that was never stopped. The engine's checkpoint, run-folder and device helpers do the rest.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from deeprecipe.checks import gan as gan_checks
from deeprecipe.config import Config
from deeprecipe.data.core import Data, DataSpec, Draws, eval_batches, train_batches
from deeprecipe.engine import checkpoint, optim
from deeprecipe.engine.device import rng_state, set_rng_state, setup, step_generator
from deeprecipe.engine.run import Run
from deeprecipe.models.gan import GAN
from deeprecipe.tasks import gan_metrics as gm
from deeprecipe.util import UserError

METRIC = ("fid", "min")
GRID = 64  # images in the fixed-noise grid

# deeprecipe check: a GAN has no ln C and no single loss to overfit; seed, grad_flow and dependency run
# both nets (checks/gan.py); the data scan and the batch grid are the built-in ones
CHECKS_SKIP = {
    "init_loss": "a GAN has no closed-form loss at init (no ln C)",
    "init_prior": "the generator has no class prediction to compare with the priors",
    "overfit": "two adversarial losses have no ~0 to reach",
    "loss_down": "adversarial losses need not fall (the grids and FID of a training run tell progress)",
    "baseline": "G has no input to blank that a loss could judge",
    "dynamics": "no per-example loss to follow",
}
EXTRA_CHECKS = {"seed": gan_checks.seed, "dependency": gan_checks.dependency, "grad_flow": gan_checks.grad_flow}


def prepare(batch, spec: DataSpec, draws: Draws | None = None):
    x, y = batch
    return x.float() / 127.5 - 1, y  # uint8 -> [-1, 1]


def show_batch(batch, spec: DataSpec) -> tuple[torch.Tensor, list[str]]:
    """Real images as D sees them, back to [0, 1] (deeprecipe check)."""
    x, y = batch
    names = spec.class_names
    return (x.float() + 1) / 2, [names[int(v)] if 0 <= int(v) < len(names) else "" for v in y]


def fit(x: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Resize real images (B, C, H, W) to the model's (C, S, S) when they differ."""
    if tuple(x.shape[-2:]) == tuple(shape[-2:]):
        return x
    return F.interpolate(x, size=tuple(shape[-2:]), mode="bilinear", antialias=True, align_corners=False)


def d_loss(real: torch.Tensor, fake: torch.Tensor, kind: str, real_label: float = 1.0) -> torch.Tensor:
    real, fake = real.float(), fake.float()
    if kind == "hinge":
        return F.relu(1 - real).mean() + F.relu(1 + fake).mean()
    return F.binary_cross_entropy_with_logits(
        real, torch.full_like(real, real_label)
    ) + F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake))


def g_loss(fake: torch.Tensor, kind: str) -> torch.Tensor:
    fake = fake.float()
    return -fake.mean() if kind == "hinge" else F.softplus(-fake).mean()  # softplus(-l) = -log sigmoid(l)


def with_generator(model: GAN, generator: nn.Module) -> GAN:
    return GAN(generator, model.discriminator, model.latent, model.num_classes, model.shape)


@torch.no_grad()
def generate(model: GAN, n: int, seed: int, rt, batch: int = 500):
    """Yield n images in [-1, 1] from z drawn with `seed` (G in eval mode), `batch` at a time."""
    model.eval()
    g = torch.Generator(device=rt.device).manual_seed(seed)
    for i in range(0, n, batch):
        z, y = model.noise(min(batch, n - i), g, rt.device)
        with rt.autocast():
            yield model(z, y).float()


def save_grid(images: torch.Tensor, path: Path, nrow: int = 8) -> torch.Tensor:
    """images in [-1, 1] -> a grid PNG at `path`; returns the grid (C, H, W) in [0, 1]."""
    from torchvision.utils import make_grid, save_image

    images = images.float().cpu()
    if images.shape[-1] < 24:  # tiny images (8x8 digits): enlarge so a person can see them
        images = F.interpolate(images, scale_factor=32 // images.shape[-1], mode="nearest")
    grid = make_grid(images, nrow=nrow, padding=2, normalize=True, value_range=(-1, 1))
    checkpoint.atomic_write(Path(path), lambda p: save_image(grid, p, format="png"))
    return grid


def _check(cfg: Config) -> None:
    M = cfg.model
    if not hasattr(M, "real_label"):
        raise UserError(f"task gan needs a gan or dcgan model, not model.name={M.name}")
    if M.loss not in ("nonsat", "hinge"):
        raise UserError(f"model.loss={M.loss}: use nonsat or hinge")


def evaluator(cfg: Config, data: Data, rt, log=print) -> gm.Evaluator | None:
    """The FID/IS evaluator with real statistics from the test split (else val, else train); None when off."""
    M = cfg.model
    if not M.eval_samples or M.feature_recipe == "none" or data.spec.num_classes < 2:
        return None
    feats = gm.feature_net(cfg, rt.device, log)
    inc = gm.inception_features(M.inception_weights) if M.inception_weights else None
    ev = gm.Evaluator(feats, inc, rt.device)
    split = data.test or data.val or data.train
    real = eval_batches(split, cfg.train.eval_batch_size, rt.device, limit=10_000, workers=cfg.train.workers)
    ev.add_real(prepare(b, data.spec)[0] for b in real)
    return ev


def train(cfg: Config, run_dir: Path, resume: bool = False, command: str = "", init=None) -> dict:
    from deeprecipe.engine.loop import NonFiniteLoss, build, check_resume

    _check(cfg)
    T, M = cfg.train, cfg.model
    rt = setup(T.device, T.precision)
    if rt.world > 1:
        raise UserError("the GAN loop runs in one process: launch it without torchrun")
    data, model = build(cfg, rt)
    if init:
        init(model)
    G, D = model.generator, model.discriminator
    adam = dict(betas=cfg.optim.betas, weight_decay=cfg.optim.weight_decay)
    opt_g = torch.optim.Adam([{"params": G.parameters(), "lr_scale": 1.0}], lr=cfg.optim.lr, **adam)
    opt_d = torch.optim.Adam([{"params": D.parameters(), "lr_scale": M.d_lr_scale}], lr=cfg.optim.lr, **adam)
    ema = optim.ema(G, T.ema)
    scaler_g, scaler_d = rt.scaler(), rt.scaler()
    ckpt_dir, start, best, health = run_dir / "checkpoints", 0, None, []
    ev = evaluator(cfg, data, rt, tqdm.write)  # before the RNG is restored or reseeded: it may train a net
    torch.manual_seed(T.seed)
    if resume:
        check_resume(run_dir, cfg)
        folder = checkpoint.latest(ckpt_dir)
        if folder is None:
            raise UserError(f"{run_dir}: no complete checkpoint to resume from (start a new run instead)")
        weights, state = checkpoint.load(folder)
        model.load_state_dict(checkpoint.split_prefix(weights, "model."))
        opt_g.load_state_dict(state["opt_g"])
        opt_d.load_state_dict(state["opt_d"])
        if ema is not None:
            ema.module.load_state_dict(checkpoint.split_prefix(weights, "ema.generator."))
            ema.n_averaged.fill_(int(state["ema_n"]))
        set_rng_state(state["rng"])
        start, best, health = int(state["step"]), state.get("best"), list(state.get("health", []))
    run = Run(run_dir, cfg, rt.main, start, command)
    checkpoint.atomic_text(run_dir / "spec.json", json.dumps(dataclasses.asdict(data.spec)))
    shown = lambda: with_generator(model, ema.module if ema is not None else G)  # noqa: E731
    fixed = torch.randn(GRID, model.latent, generator=torch.Generator().manual_seed(T.seed + 1)).to(rt.device)
    fixed_y = torch.arange(GRID, device=rt.device) % model.num_classes if model.num_classes else None
    watch = gm.DiscriminatorWatch(patience=max(5, T.steps // max(1, T.log_every) // 10))
    batches = train_batches(data.train, T.seed, range(start, T.steps), T.batch_size, rt.device, workers=T.workers)
    bar = tqdm(total=T.steps, initial=start, dynamic_ncols=True, unit="step")
    sums, t0, seen, nlog, results = torch.zeros(4, device=rt.device), time.perf_counter(), 0, 0, {}
    draw_every = M.sample_every or T.eval_every
    step = start
    for step in range(start, T.steps):
        model.train()
        lr = cfg.optim.lr * optim.lr_factor(cfg.optim, step, T.steps)
        optim.set_lr(opt_g, lr)
        optim.set_lr(opt_d, lr)
        x, y = prepare(next(batches), data.spec)
        x = fit(x, model.shape)
        y = y if model.num_classes else None
        z = torch.randn(len(x), model.latent, generator=step_generator(rt.device, T.seed, step), device=rt.device)
        # D step: real images up, generated ones down
        with rt.autocast():
            fake = G(z, y)
            real_logit, fake_logit = D(x, y), D(fake.detach(), y)
            ld = d_loss(real_logit, fake_logit, M.loss, M.real_label)
        _step(opt_d, ld, scaler_d, D, cfg.optim.clip)
        # G step: through the updated D, whose weights get no gradient here
        D.requires_grad_(False)
        with rt.autocast():
            lg = g_loss(D(fake, y), M.loss)
        _step(opt_g, lg, scaler_g, G, cfg.optim.clip)
        D.requires_grad_(True)
        if not (torch.isfinite(ld) and torch.isfinite(lg)):
            msg = gm.nonfinite(step + 1, float(ld.detach()), float(lg.detach()))
            _health(run_dir, health + [msg], rt)
            run.status("failed", step=step + 1, error=msg)
            raise NonFiniteLoss(msg)
        if ema is not None:
            ema.update_parameters(G)
        sums += torch.stack(
            [
                ld.detach(),
                lg.detach(),
                torch.sigmoid(real_logit.detach().float()).mean(),
                torch.sigmoid(fake_logit.detach().float()).mean(),
            ]
        )
        seen, nlog, done = seen + len(x), nlog + 1, step + 1
        if done % T.log_every == 0 or done == T.steps:
            dt = time.perf_counter() - t0
            d_l, g_l, p_real, p_fake = (sums / nlog).tolist()
            run.log(done, d_loss=d_l, g_loss=g_l, d_real=p_real, d_fake=p_fake, lr=lr, examples_per_s=seen / dt)
            bar.set_postfix(d=f"{d_l:.3f}", g=f"{g_l:.3f}", ex_s=f"{seen / dt:,.0f}")
            note = watch.update(d_l, done)
            if note:
                health.append(note)
                bar.write("health: " + note)
            sums.zero_()
            t0, seen, nlog = time.perf_counter(), 0, 0
        bar.update(1)
        if rt.main and draw_every and (done % draw_every == 0 or done == T.steps):
            with torch.no_grad(), rt.autocast():
                g_eval = shown().eval()
                grid = save_grid(g_eval(fixed, fixed_y).float(), run_dir / "plots" / "grids" / f"step-{done:07d}.png")
            if run.tb is not None:
                run.tb.add_image("samples", grid, done)
        if ev is not None and ((T.eval_every and done % T.eval_every == 0) or done == T.steps):
            n = M.eval_samples if done == T.steps else max(500, M.eval_samples // 10)
            results = ev.score(generate(shown(), n, T.seed + 2, rt))
            run.log(done, **{f"val_{k}": v for k, v in results.items() if isinstance(v, (int, float))})
            bar.write(f"step {done}: domain FID {results['fid']:.3f}, IS {results['is']:.2f} ({n} samples)")
            if best is None or results["fid"] < best:
                best = results["fid"]
                checkpoint.save_weights(
                    ckpt_dir / "best.safetensors", checkpoint.plain_state(shown()), {"step": str(done)}
                )
            run.status("running", step=done, best={"fid": best})
        if done % T.ckpt_every == 0 or done == T.steps:
            weights = {f"model.{k}": v for k, v in checkpoint.plain_state(model).items()}
            weights.update({f"ema.{k}": v for k, v in checkpoint.plain_state(shown()).items()})
            state = {
                "step": done,
                "opt_g": opt_g.state_dict(),
                "opt_d": opt_d.state_dict(),
                "rng": rng_state(),
                "best": best,
                "ema_n": int(ema.n_averaged) if ema is not None else 0,
                "health": health,
            }
            checkpoint.save(ckpt_dir, done, weights, state)
    bar.close()
    final = {f"val_{k}": v for k, v in results.items() if isinstance(v, (int, float))}
    final.update(finish(shown(), data, cfg, rt, run_dir, results, health) or {})
    run.status("done", step=max(step + 1, start), best={"fid": best}, final=final)
    run.close()
    from deeprecipe.engine.report import write_report

    write_report(run_dir)
    return final


def _step(opt: torch.optim.Optimizer, loss: torch.Tensor, scaler, net: nn.Module, clip: float) -> None:
    opt.zero_grad(set_to_none=True)
    (scaler.scale(loss) if scaler else loss).backward()
    if clip > 0:
        if scaler:
            scaler.unscale_(opt)
        nn.utils.clip_grad_norm_(net.parameters(), clip)
    if scaler:
        scaler.step(opt)
        scaler.update()
    else:
        opt.step()


def _health(run_dir: Path, notes: list[str], rt) -> None:
    text = "\n".join(notes) if notes else "no problem found: no NaN, no mode collapse, D did not win outright"
    checkpoint.atomic_text(Path(run_dir) / "plots" / "health.txt", text + "\n")


def finish(
    model: GAN, data: Data, cfg: Config, rt, run_dir: Path, results: dict | None = None, health: list[str] | None = None
) -> dict:
    """Final plots: latest grid, progress strip and GIF, latent interpolation, class histogram, health."""
    from deeprecipe.tasks import gan_plots

    plots, health = Path(run_dir) / "plots", list(health or [])
    gan_plots.progress(plots)
    gan_plots.interpolation(model, plots / "interpolation.png", cfg.train.seed, rt)
    gan_plots.losses(run_dir, plots / "gan_losses.png")
    results = results or {}
    if "class_hist" in results:
        gan_plots.class_histogram(results["class_hist"], data.spec.class_names, plots / "class_histogram.png")
        health += gm.collapse(results, data.spec.class_names)
    for note in health:
        tqdm.write("health: " + note)
    _health(run_dir, health, rt)
    return {"health_warnings": len(health)}


def evaluate(model: GAN, data: Data, split: str, cfg: Config, rt) -> dict:
    """`deeprecipe eval RUN`: domain FID and IS of cfg.model.eval_samples images against `split`."""
    cfg.model.eval_samples = cfg.model.eval_samples or 5000
    ev = evaluator(cfg, dataclasses.replace(data, test=data.split(split)), rt)
    if ev is None:
        raise UserError("no domain feature net for this data set (it needs class labels), so no FID/IS")
    out = ev.score(generate(model, cfg.model.eval_samples, cfg.train.seed + 2, rt))
    return out | {"health": gm.collapse(out, data.spec.class_names)}


def sample(model: GAN, spec: DataSpec, cfg: Config, rt, run_dir: Path, args) -> None:
    """`deeprecipe sample RUN --n 64`: a grid and one PNG per image (labels cycle over the classes)."""
    from torchvision.utils import save_image

    out = Path(args.out or Path(run_dir) / "samples")
    out.mkdir(parents=True, exist_ok=True)
    images = torch.cat(list(generate(model, args.n, args.seed, rt)))
    save_grid(images, out / "grid.png", nrow=max(1, int(len(images) ** 0.5)))
    for i, img in enumerate(images):
        save_image((img.cpu() + 1) / 2, out / f"{i:04d}.png")
    print(f"{len(images)} images: {out}/0000.png ... ; grid: {out / 'grid.png'}")


def export_example(model: nn.Module, spec: DataSpec, batch: int) -> dict:
    """The generator is what ships: noise (and class labels when conditional) in, images in [-1, 1] out."""
    z, y = model.noise(batch, torch.Generator().manual_seed(batch))
    inputs = {"noise": z} if y is None else {"noise": z, "labels": y}
    return {"inputs": inputs, "outputs": ["images"]}


def serve(ctx) -> None:
    """POST /sample: {n, seed} -> n generated images (PNG); a conditional model cycles through the classes."""
    ctx.image_sampler("/sample", lambda n, seed: (torch.cat(list(generate(ctx.model, n, seed, ctx.rt))) + 1) / 2)
