"""Image-to-image translation: super-resolution, inpainting, label map -> scene, paired and unpaired style.

The data (data/img2img.py) is images and labels as for every image family; `prepare` makes the pair the net
learns, on the batch and on its device (degrade.py), from the mode the data spec records:

    sr           input = the bicubic up-sampling of the image shrunk by `scale` (blur, noise), target = the image
    inpaint      input = the image with holes zeroed + the mask channel,                   target = the image
    label2image  input = the one-hot label map,                                           target = the scene
    paired       input = A,                                                               target = B
    unpaired     (a, b) from two sets (CycleGAN); on data with known pairs (the scenes' val/test) b is a's truth

A prepared batch is (input, target), both in [-1, 1]. One step is the GAN family's: D's turn, then G's through
the updated D, frozen, on the same images of G (engine.loop.Update):
    pix2pix   d: L_D(D(x, y), D(x, G(x)))        g: model.l1 * |G(x) - y| + model.adv * L_G(D(x, G(x)))
              (model.pixel_loss=mse: (G(x) - y)^2 in place of |G(x) - y|, the mean PSNR scores)
    cyclegan  d: L_D for D_b (b vs G_ab(a)) + for D_a (a vs G_ba(b))
              g: adv * (L_G(D_b(G_ab(a))) + L_G(D_a(G_ba(b)))) + cycle * (|G_ba(G_ab(a)) - a| + |G_ab(G_ba(b)) - b|)
                 + identity * (|G_ab(b) - b| + |G_ba(a) - a|)
with L_D, L_G from common/adversarial.py. Evaluation scores PSNR and SSIM (metrics.py) on held-out images
next to the classic baseline of the mode: bicubic up-sampling for sr, the PSNR on the hole (and OpenCV's Telea
inpainting when installed) for inpaint, the untranslated input for paired data, the cycle reconstruction for
unpaired data without known pairs; translations (label2image, paired, unpaired; of scenes or between two
folders) also get the domain FID of their outputs against the real targets (metrics.DomainFID), at the final
evaluation and on the test split, with the untranslated input's FID as the baseline of a change of look; with
model.fid_weights every mode also gets the standard FID of its outputs against the targets (`fid_standard`, on the
FID Inception: common/fid.py), comparable with published figures.
What differs between the modes is one table (modes.py); inference on files and uploads (predict, the
endpoints) is in infer.py.
"""

from pathlib import Path

import torch
import torch.nn as nn

from deeprecipe.common.adversarial import d_loss, g_loss
from deeprecipe.common.fid import StandardFID, check_file
from deeprecipe.config import Config
from deeprecipe.core import ConfigError, DataSpec
from deeprecipe.data.core import Data, Draws, eval_batches
from deeprecipe.families.img2img import checks, degrade, infer, plots
from deeprecipe.families.img2img import metrics as im
from deeprecipe.families.img2img.modes import MODES, make_input
from deeprecipe.family import Family, PredictOptions, ServeContext, Update
from deeprecipe.runtime import Runtime


def pixel_loss(out: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    """The mean absolute (l1) or squared (mse) error of G's output, in fp32."""
    d = out.float() - target.float()
    return d.abs().mean() if kind == "l1" else d.square().mean()


class Img2Img(Family):
    """pix2pix (sr, inpaint, label2image, paired) and CycleGAN (unpaired)."""

    METRIC = ("psnr", "max")
    CHECKS_SKIP = {
        "init_loss": "L1 + adversarial losses have no closed form at init",
        "init_prior": "the net predicts pixels, not classes",
        "loss_down": "adversarial losses need not fall (the overfit check drives one batch to PSNR > 40 dB)",
        "baseline": "the input_copy check compares the net with its own input",
        "dynamics": "no per-example class loss to follow",
    }
    EXTRA_CHECKS = {"overfit": checks.overfit, "input_copy": checks.input_copy, "grad_flow": checks.grad_flow}
    CHECK_DEFAULTS = {"steps": 20, "batch_size": 8, "overfit_examples": 2, "overfit_steps": 600}

    def __init__(self):
        self._features = None  # the domain FID's feature net, loaded (or trained) at its first use

    # ------------------------------------------------------------------------------------------ training
    def check_config(self, cfg: Config) -> None:
        if cfg.data.name != "img2img":
            raise ConfigError(f"task img2img needs data.name=img2img (it makes the pairs), not {cfg.data.name}")
        if cfg.model.name not in ("pix2pix", "cyclegan"):
            raise ConfigError(f"task img2img needs model.name=pix2pix or cyclegan, not {cfg.model.name}")
        if cfg.model.name == "pix2pix" and cfg.data.mode == "unpaired":
            raise ConfigError("data.mode=unpaired has no pairs to learn from: use model.name=cyclegan")
        if cfg.optim.label_smoothing:
            raise ConfigError("optim.label_smoothing does not apply to img2img")
        if cfg.model.fid_weights:
            check_file(cfg.model.fid_weights)  # before training, not at the final evaluation

    def parts(self, model: nn.Module, cfg: Config) -> dict[str, tuple[nn.Module, float]]:
        if model.mode == "unpaired":
            return {"d": (model.discriminators, cfg.model.d_lr_scale), "g": (model.generators, 1.0)}
        if not cfg.model.adv:  # a plain pixel regression: D would judge for nobody, so it is neither run nor trained
            return {"g": (model.generator, 1.0)}
        return {"d": (model.discriminator, cfg.model.d_lr_scale), "g": (model.generator, 1.0)}

    def prepare(self, batch, spec: DataSpec, draws: Draws | None):
        x, y = batch[0], batch[1]
        if draws is not None and spec.extra.get("crop"):  # training on patches (data.crop)
            x, y = degrade.crop(x, y, int(spec.extra["crop"]), draws)
        return make_input(x, y, spec, draws if draws is not None else degrade.eval_draws(x.device))

    def step(self, model: nn.Module, batches: list, cfg: Config, update: Update) -> None:
        """D's turn on every micro-batch, D's update; then G's turn through the updated, frozen D on the same
        outputs of G, and G's update (G runs once per micro-batch)."""
        if model.mode == "unpaired":
            return self._cycle_step(model, batches, cfg, update)
        M, made = cfg.model, []
        if not M.adv:
            for k, (x, t) in enumerate(batches):
                with update.micro(k):
                    with update.autocast():
                        pix = pixel_loss(model(x), t, M.pixel_loss)
                    update.backward("g", M.l1 * pix, {M.pixel_loss: pix})
            return update.step("g")
        for k, (x, t) in enumerate(batches):
            with update.micro(k):
                with update.autocast():
                    fake = model(x)
                    loss = d_loss(model.judge(x, t), model.judge(x, fake.detach()), M.loss)
                update.backward("d", loss)
            made.append((x, t, fake))
        update.step("d")
        with update.frozen("d"):
            for k, (x, t, fake) in enumerate(made):
                with update.micro(k):
                    with update.autocast():
                        pix = pixel_loss(fake, t, M.pixel_loss)
                        adv = g_loss(model.judge(x, fake), M.loss)
                        loss = M.l1 * pix + M.adv * adv
                    update.backward("g", loss, {M.pixel_loss: pix, "g_adv": adv})
        update.step("g")

    def _cycle_step(self, model: nn.Module, batches: list, cfg: Config, update: Update) -> None:
        M, D, made = cfg.model, model.discriminators, []
        for k, (a, b) in enumerate(batches):
            with update.micro(k):
                with update.autocast():
                    fb, fa = model.ab(a), model.ba(b)
                    loss = d_loss(D["b"](b), D["b"](fb.detach()), M.loss) + d_loss(
                        D["a"](a), D["a"](fa.detach()), M.loss
                    )
                update.backward("d", loss)
            made.append((a, b, fa, fb))
        update.step("d")
        with update.frozen("d"):
            for k, (a, b, fa, fb) in enumerate(made):
                with update.micro(k):
                    with update.autocast():
                        adv = g_loss(D["b"](fb), M.loss) + g_loss(D["a"](fa), M.loss)
                        cyc = (model.ba(fb) - a).abs().mean() + (model.ab(fa) - b).abs().mean()
                        idt = (model.ab(b) - b).abs().mean() + (model.ba(a) - a).abs().mean() if M.identity else 0 * cyc
                        loss = M.adv * adv + M.cycle * cyc + M.identity * idt
                    update.backward("g", loss, {"cycle": cyc, "identity": idt, "g_adv": adv})
        update.step("g")

    def loss(self, model: nn.Module, batch: tuple, cfg: Config, part: str) -> tuple[torch.Tensor, dict]:
        """The reconstruction term alone: L1 of G's output against the target (the checks' loss)."""
        l1 = self.per_example_loss(model, batch, cfg).mean()
        return l1, {"l1": l1.detach()}

    def per_example_loss(self, model: nn.Module, batch: tuple, cfg: Config) -> torch.Tensor:
        x, t = batch[0], batch[1]
        return (model(x).float() - t.float()).abs().flatten(1).mean(1)

    # ------------------------------------------------------------------------------------------ evaluation
    def _fid(self, cfg: Config, spec: DataSpec, rt: Runtime) -> im.DomainFID | None:
        """A new domain FID of the outputs against the targets (translations of scenes or between two folders),
        else None."""
        mode = spec.extra["mode"]
        if not MODES[mode].translation or cfg.data.source not in ("scenes", "pairs"):
            return None
        if cfg.model.feature_recipe == "none":
            return None
        if self._features is None:
            make = im.scene_features if cfg.data.source == "scenes" else im.pair_features
            self._features = make(cfg, rt.device)
        return im.DomainFID(self._features, inputs=not MODES[mode].labels_in)

    def _standard(self, cfg: Config, rt: Runtime) -> StandardFID | None:
        """A new standard FID (the FID Inception of model.fid_weights) of the outputs against the targets, any mode;
        None without the weights file."""
        return StandardFID(cfg.model.fid_weights, rt.device) if cfg.model.fid_weights else None

    @torch.no_grad()
    def _run_split(
        self,
        model: nn.Module,
        data: Data,
        split: str,
        cfg: Config,
        rt: Runtime,
        keep: int = 0,
        telea: bool = False,
        fid=None,
        standard: StandardFID | None = None,
    ):
        """(scores, kept (input, output, target, extra) of the first `keep` examples) over a split; with `fid` (a
        DomainFID), the scores include its FIDs, with `standard` (a new StandardFID) `fid_standard`."""
        spec, mode = data.spec, data.spec.extra["mode"]
        model.eval()
        scores, kept = im.Scores(), []
        paired_eval = spec.extra.get("paired_eval", True)
        for raw in eval_batches(data.split(split), cfg.train.eval_batch_size, rt.device, cfg.train.limit_eval):
            x, t = self.prepare(raw, spec, None)
            with rt.autocast():
                out = model(x).float()
            o, tt = im.to_unit(out), im.to_unit(t)
            extra = None
            if mode == "unpaired" and not paired_eval:  # no truth for A -> B: score the cycle A -> B -> A
                back = im.to_unit(model.ba(out).float())
                scores.add("psnr", im.psnr(back, im.to_unit(x)))
                scores.add("ssim", im.ssim(back, im.to_unit(x)))
            else:
                scores.add("psnr", im.psnr(o, tt))
                scores.add("ssim", im.ssim(o, tt))
            if paired_eval:  # the classic baseline of the mode needs the truth
                extra = MODES[mode].baseline(scores, x, o, tt, telea)
            if fid is not None:
                fid.add(out, t.float(), None if MODES[mode].labels_in else x.float())
            if standard is not None:
                standard.update(t, real=True)
                standard.update(out, real=False)
            for i in range(min(len(x), keep - len(kept))):
                kept.append((x[i].cpu(), out[i].cpu(), t[i].cpu(), None if extra is None else extra[i].cpu()))
        fids = (fid.compute() if fid is not None else {}) | (standard.compute() if standard is not None else {})
        return scores.means() | fids, kept

    def evaluate(self, model: nn.Module, data: Data, split: str, cfg: Config, rt: Runtime, final: bool) -> dict:
        """PSNR and SSIM of the outputs (per image, averaged) and of the mode's baseline (see the docstring); at the
        final evaluation the domain FID of translations and the standard FID (with model.fid_weights) too."""
        fid = self._fid(cfg, data.spec, rt) if final else None
        standard = self._standard(cfg, rt) if final else None
        return self._run_split(model, data, split, cfg, rt, fid=fid, standard=standard)[0]

    def snapshot(self, model: nn.Module, data: Data, cfg: Config, rt: Runtime) -> dict[str, torch.Tensor]:
        """Input / output / target of 4 held-out examples at each evaluation."""
        split = "val" if data.val is not None else "train"
        _, kept = self._run_split(model, _head(data, split, 4), split, cfg, rt, keep=4)
        tiles = plots.rows(kept, data.spec)[0]
        return {"translations": plots.grid(tiles, 2 * (len(tiles) // max(1, len(kept))))}

    def finish(self, model: nn.Module, data: Data, cfg: Config, rt: Runtime, run_dir: Path, results: dict) -> dict:
        """Test scores (the FIDs included) with the baselines in one table (plots/quality.txt) and rows of
        input / output / target (plots/img2img.png)."""
        split = data.final_split()
        fid, standard = self._fid(cfg, data.spec, rt), self._standard(cfg, rt)
        with torch.no_grad(), rt.autocast():
            m, kept = self._run_split(model, data, split, cfg, rt, keep=8, telea=True, fid=fid, standard=standard)
        pdir = Path(run_dir) / "plots"
        pdir.mkdir(parents=True, exist_ok=True)
        table = plots.quality_table(m, data.spec.extra["mode"], split, len(data.split(split)))
        (pdir / "quality.txt").write_text(table + "\n")
        plots.save_rows(kept, data.spec, pdir / "img2img.png", table.splitlines()[0])
        return {f"{split}_{k}": v for k, v in m.items()}

    # ------------------------------------------------------------------------------------------ use
    def predict(
        self, model: nn.Module, spec: DataSpec, cfg: Config, rt: Runtime, files: list[str], opts: PredictOptions
    ) -> list[dict]:
        return infer.predict(model, spec, cfg, rt, files, opts, MODES[spec.extra["mode"]])

    def export_example(self, model: nn.Module, spec: DataSpec, batch: int) -> dict:
        """G is what ships: its input as prepare makes it (B, C_in, H, W) in, the image in [-1, 1] out."""
        g = torch.Generator().manual_seed(batch)
        x = torch.randint(0, 256, (batch, spec.in_channels, *spec.image_size), generator=g, dtype=torch.uint8)
        y = torch.randint(0, max(1, spec.num_classes), (batch, *spec.image_size), generator=g)
        inp, _ = make_input(x, y, spec, Draws(g))
        return {"inputs": {"image": inp}, "outputs": ["output"]}

    def serve(self, ctx: ServeContext) -> None:
        infer.serve(ctx, MODES[ctx.spec.extra["mode"]])

    # ------------------------------------------------------------------------------------------ checks
    def show_batch(self, batch: tuple, spec: DataSpec):
        """Input (as a picture) and target of the first examples, as they enter the net."""
        x, t = batch[0][:8], batch[1][:8]
        kept = [(x[i].cpu(), t[i].cpu(), t[i].cpu(), None) for i in range(len(x))]
        tiles, caps = plots.rows(kept, spec, with_output=False)
        return tiles, caps


def _head(data: Data, split: str, n: int) -> Data:
    """The first n examples of a split as a Data of their own."""
    from deeprecipe.data.core import TensorSplit

    s = data.split(split)
    return Data(
        data.spec,
        **{split: TensorSplit(*s.take(torch.arange(min(n, len(s)))))},
        **({"train": data.train} if split != "train" else {}),
    )
