"""Image generation with a GAN: two parts (discriminator, then generator) in the one training loop.

A batch is (images uint8 (B, C, H, W), labels (B,)); `prepare` scales images to [-1, 1] (the range of G's tanh),
resizes them on the device when the model draws another size, and keeps the step's `Draws`, from which the
noise z is drawn (so accumulation and resume see exactly the noise of an unsplit, unstopped run). One step is the
family's step hook (manual optimization through engine.loop.Update), each turn with its own Adam(W):
    d: L_D = -log D(x) - log(1 - D(G(z)))    (hinge: relu(1 - D(x)) + relu(1 + D(G(z))))
    g: L_G = -log D(G(z))                   (the non-saturating loss; hinge: -D(G(z)))
with D's target for real images set by model.real_label (one-sided smoothing), D's lr scaled by
model.d_lr_scale, and an EMA of the weights (train.ema) that every grid, sample and score uses.
Evaluation scores the domain FID and IS (metrics.py: `fid`, `is`) against the split, and the standard FID on the
FID Inception (`fid_standard`, common/fid.py) when model.fid_weights names its file; the finished run gets a
progress strip, latent interpolations, the loss curves and a health report (plots.py).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn as nn

from deeprecipe.common.adversarial import d_loss, fit, g_loss
from deeprecipe.common.classes import augment
from deeprecipe.common.fid import StandardFID, check_file
from deeprecipe.config import Config
from deeprecipe.core import ConfigError, DataSpec, UserError
from deeprecipe.data import image_ops
from deeprecipe.data.core import Data, Draws, eval_batches
from deeprecipe.families.gan import checks, plots
from deeprecipe.families.gan import metrics as gm
from deeprecipe.families.gan.plots import grid, save_grid
from deeprecipe.family import Family, SampleOptions, ServeContext, Update
from deeprecipe.runtime import Runtime

GRID = 64  # images in the fixed-noise grid


@torch.no_grad()
def generate(model: nn.Module, n: int, seed: int, rt: Runtime, batch: int = 500) -> Iterator[torch.Tensor]:
    """Yield n images in [-1, 1] from z drawn with `seed` (G in eval mode), `batch` at a time."""
    model.eval()
    g = torch.Generator(device=rt.device).manual_seed(seed)
    for i in range(0, n, batch):
        z, y = model.noise(min(batch, n - i), g, rt.device)
        with rt.autocast():
            yield model(z, y).float()


def scorer(cfg: Config, data: Data, split: str, rt: Runtime) -> gm.Evaluator | None:
    """The FID/IS scorer with the real statistics of `split`: the domain FID and IS when the data has class labels
    for a domain feature net (and model.feature_recipe is not none), the standard FID when model.fid_weights names
    its file; None when neither (or model.eval_samples=0)."""
    M = cfg.model
    domain = M.feature_recipe != "none" and data.spec.num_classes >= 2
    if not M.eval_samples or not (domain or M.fid_weights):
        return None
    feats = None
    if domain:
        with torch.random.fork_rng(devices=[rt.device] if rt.device.type == "cuda" else []):
            feats = gm.feature_net(cfg, rt.device)  # training it must not move the run's random streams
    standard = StandardFID(M.fid_weights, rt.device) if M.fid_weights else None
    ev = gm.Evaluator(feats, standard, rt.device)
    limit = cfg.train.limit_eval or 10_000  # real images for the statistics
    real = eval_batches(data.split(split), cfg.train.eval_batch_size, rt.device, limit, cfg.train.workers)
    ev.add_real(x.float() / 127.5 - 1 for x, _ in real)  # as prepare scales them
    return ev


def discriminator_notes(cfg: Config, run_dir: Path) -> list[str]:
    """The health note of a discriminator that won outright, from the run's logged D losses ([] when it did not)."""
    from deeprecipe.engine.run import read_metrics

    watch = gm.DiscriminatorWatch(patience=max(5, cfg.train.steps // max(1, cfg.train.log_every) // 10))
    return [n for r in read_metrics(run_dir) if "d_loss" in r for n in [watch.update(r["d_loss"], r["step"])] if n]


def health_text(notes: list[str]) -> str:
    return "\n".join(notes) if notes else "no problem found: no NaN, no mode collapse, D did not win outright"


class GAN(Family):
    """Unconditional and class-conditional GANs (MLP or DCGAN): discriminator and generator in turn."""

    METRIC = ("fid", "min")
    # deeprecipe check: a GAN has no ln C and no single loss to overfit; grad_flow and dependency look at both nets
    # (checks.py); seed (the loop's own step), the data scan and the batch grid are the built-in ones
    CHECKS_SKIP = {
        "init_loss": "a GAN has no closed-form loss at init (no ln C)",
        "init_prior": "the generator has no class prediction to compare with the priors",
        "overfit": "two adversarial losses have no ~0 to reach",
        "loss_down": "adversarial losses need not fall (the grids and FID of a training run tell progress)",
        "baseline": "G has no input to blank that a loss could judge",
        "dynamics": "no per-example loss to follow",
    }
    EXTRA_CHECKS = {"dependency": checks.dependency, "grad_flow": checks.grad_flow}

    def __init__(self):
        self._scorers: dict[str, gm.Evaluator | None] = {}  # split -> FID/IS scorer with that split's real statistics

    def check_config(self, cfg: Config) -> None:
        M = cfg.model
        if not hasattr(M, "real_label"):
            raise ConfigError(f"task gan needs a gan or dcgan model, not model.name={M.name}")
        if cfg.optim.label_smoothing:
            raise ConfigError("optim.label_smoothing does not apply to a GAN: use model.real_label (e.g. 0.9)")
        if M.fid_weights:
            check_file(M.fid_weights)  # before training, not at the first evaluation

    def parts(self, model: nn.Module, cfg: Config) -> dict[str, tuple[nn.Module, float]]:
        return {"d": (model.discriminator, cfg.model.d_lr_scale), "g": (model.generator, 1.0)}

    def prepare(self, batch, spec: DataSpec, draws: Draws | None):
        x, y = batch
        x = x.float() / 127.5 - 1  # uint8 -> [-1, 1]
        if draws is not None:  # data.flip / data.crop_pad, as for classifiers (D sees augmented real images)
            x = augment(x, spec, draws)
        return x, y, draws  # the draws also give this step's noise

    def step(self, model: nn.Module, batches: list, cfg: Config, update: Update) -> None:
        """D's turn on every micro-batch (real images up, G's images down) and D's update; then G's turn through the
        updated D, frozen, on the same images of G, and G's update. G draws each micro-batch's images once."""
        M, D = cfg.model, model.discriminator
        fakes = []
        for k, (x, y, draws) in enumerate(batches):
            y = y if model.num_classes else None
            with update.micro(k):
                with update.autocast():
                    fake = model(draws.normal(len(x), model.latent), y)  # (B, C, H, W); its graph waits for G's turn
                    real_logit, fake_logit = D(fit(x, model.shape), y), D(fake.detach(), y)
                    loss = d_loss(real_logit, fake_logit, M.loss, M.real_label)
                p_real, p_fake = torch.sigmoid(real_logit.float()).mean(), torch.sigmoid(fake_logit.float()).mean()
                update.backward("d", loss, {"d_real": p_real, "d_fake": p_fake})
            fakes.append((fake, y))
        update.step("d")
        with update.frozen("d"):
            for k, (fake, y) in enumerate(fakes):
                with update.micro(k):
                    with update.autocast():
                        loss = g_loss(D(fake, y), M.loss)
                    update.backward("g", loss)
        update.step("g")

    def _scorer(self, data: Data, split: str, cfg: Config, rt: Runtime) -> gm.Evaluator | None:
        if split not in self._scorers:  # made once per split: it may train the domain feature net first
            self._scorers[split] = scorer(cfg, data, split, rt)
        return self._scorers[split]

    def evaluate(self, model: nn.Module, data: Data, split: str, cfg: Config, rt: Runtime, final: bool) -> dict:
        """Domain FID and IS (and the standard FID with model.fid_weights) of generated images against `split`
        (all of model.eval_samples when final, a tenth (at least 500) on the way); {} when scoring is off."""
        ev = self._scorer(data, split, cfg, rt)
        if ev is None:
            return {}
        M = cfg.model
        n = M.eval_samples if final else max(500, M.eval_samples // 10)
        out = ev.score(generate(model, n, cfg.train.seed + 2, rt))
        return out | {"health": gm.collapse(out, data.spec.class_names)}

    def snapshot(self, model: nn.Module, data: Data, cfg: Config, rt: Runtime) -> dict[str, torch.Tensor]:
        """The fixed-noise grid (the same z at every evaluation, so the grids show progress)."""
        z = torch.randn(GRID, model.latent, generator=torch.Generator().manual_seed(cfg.train.seed + 1))
        y = torch.arange(GRID) % model.num_classes if model.num_classes else None
        with rt.autocast():
            images = model(z.to(rt.device), None if y is None else y.to(rt.device)).float()
        return {"grids": grid(images)}

    def finish(self, model: nn.Module, data: Data, cfg: Config, rt: Runtime, run_dir: Path, results: dict) -> dict:
        """Final plots (progress strip and GIF, latent interpolation, losses, class histogram) and health notes."""
        from deeprecipe.engine.atomic import atomic_text

        pdir = Path(run_dir) / "plots"
        plots.progress(pdir)
        plots.interpolation(model, pdir / "interpolation.png", cfg.train.seed, rt)
        plots.losses(run_dir, pdir / "gan_losses.png")
        notes = discriminator_notes(cfg, run_dir)
        if "class_hist" in results:
            plots.class_histogram(results["class_hist"], data.spec.class_names, pdir / "class_histogram.png")
            notes += gm.collapse(results, data.spec.class_names)
        for note in notes:
            warnings.warn("health: " + note, stacklevel=2)
        atomic_text(pdir / "health.txt", health_text(notes) + "\n")
        return {"health_warnings": len(notes)}

    def nonfinite(self, cfg: Config, run_dir: Path, step: int, losses: dict[str, float]) -> str:
        """The NaN note, also the last line of plots/health.txt (after the discriminator's notes so far)."""
        from deeprecipe.engine.atomic import atomic_text

        note = gm.nonfinite(step, losses.get("d", float("nan")), losses.get("g", float("nan")))
        atomic_text(
            Path(run_dir) / "plots" / "health.txt", health_text([*discriminator_notes(cfg, run_dir), note]) + "\n"
        )
        return note

    def sample(self, model: nn.Module, spec: DataSpec, cfg: Config, rt: Runtime, opts: SampleOptions) -> Iterator[str]:
        """`deeprecipe sample RUN --n 64`: a grid and one PNG per image in a folder (default RUN/samples), or only the
        grid when --out is an image file (s.png); labels cycle over the classes."""
        from torchvision.utils import save_image

        if opts.n < 1:
            raise UserError(f"--n {opts.n}: must be at least 1")
        out = Path(opts.out or Path(opts.run_dir or ".") / "samples")
        images = torch.cat(list(generate(model, opts.n, opts.seed, rt)))
        nrow = max(1, int(len(images) ** 0.5))
        if out.suffix.lower() in image_ops.EXTS:  # a file, not a folder named s.png
            out.parent.mkdir(parents=True, exist_ok=True)
            save_grid(images, out, nrow=nrow)
            yield f"{len(images)} images: grid {out}\n"
            return
        out.mkdir(parents=True, exist_ok=True)
        save_grid(images, out / "grid.png", nrow=nrow)
        for i, img in enumerate(images):
            save_image((img.cpu() + 1) / 2, out / f"{i:04d}.png")
        yield f"{len(images)} images: {out}/0000.png ... ; grid: {out / 'grid.png'}\n"

    def export_example(self, model: nn.Module, spec: DataSpec, batch: int) -> dict:
        """The generator is what ships: noise (and class labels when conditional) in, images in [-1, 1] out."""
        z, y = model.noise(batch, torch.Generator().manual_seed(batch))
        inputs = {"noise": z} if y is None else {"noise": z, "labels": y}
        return {"inputs": inputs, "outputs": ["images"]}

    def serve(self, ctx: ServeContext) -> None:
        """POST /sample: {n, seed} -> n generated images (PNG); a conditional model cycles through the classes."""
        ctx.image_sampler("/sample", lambda n, seed: (torch.cat(list(generate(ctx.model, n, seed, ctx.rt))) + 1) / 2)
