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
evaluation and on the test split, with the untranslated input's FID as the baseline of a change of look.
(No `from __future__ import annotations` here: FastAPI reads the serve hook's annotations at run time.)
"""

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from deeprecipe.common.adversarial import d_loss, g_loss
from deeprecipe.config import Config
from deeprecipe.core import ConfigError, DataSpec, UserError
from deeprecipe.data import image_ops
from deeprecipe.data.core import Data, Draws, eval_batches
from deeprecipe.families.img2img import checks, degrade, plots
from deeprecipe.families.img2img import metrics as im
from deeprecipe.family import Family, PredictOptions, ServeContext, Update
from deeprecipe.runtime import Runtime

TILE = 256  # predict and serve run sr on tiles that keep blocks of this size (output pixels): any size works
MAX_SIDE = 1024  # inpaint and translate answer at most this long side (sr: the input's long side)


def unit(x: torch.Tensor) -> torch.Tensor:
    """uint8 -> [-1, 1]."""
    return x.float() / 127.5 - 1


def make_input(x: torch.Tensor, y: torch.Tensor, spec: DataSpec, draws: Draws) -> tuple[torch.Tensor, torch.Tensor]:
    """(input, target) in [-1, 1] of a raw batch (images uint8 (B, C, H, W), labels) for the spec's mode."""
    e, mode = spec.extra, spec.extra["mode"]
    img = unit(x)
    if mode == "sr":
        return degrade.enlarge(degrade.shrink(img, e["scale"], e["blur"], e["noise"], draws), e["scale"]), img
    if mode == "inpaint":
        B, _, H, W = img.shape
        hole = degrade.holes(B, H, W, e["holes"], e["hole_fraction"], draws, img.device)
        return torch.cat([img * (1 - hole), hole], 1), img
    if mode == "label2image":
        k = spec.num_classes
        lab = y.long()
        onehot = F.one_hot(lab.clamp(max=k), k + 1)[..., :k]  # an ignored pixel (255) is all zeros
        return onehot.permute(0, 3, 1, 2).float(), img
    ca = int(e["channels_a"])
    return img[:, :ca], img[:, ca:]


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
        if cfg.model.name == "pix2pix" and cfg.model.pixel_loss not in ("l1", "mse"):
            raise ConfigError(f"model.pixel_loss={cfg.model.pixel_loss}: use l1 or mse")
        if cfg.model.loss not in ("nonsat", "hinge"):
            raise ConfigError(f"model.loss={cfg.model.loss}: use nonsat or hinge")
        if cfg.optim.label_smoothing:
            raise ConfigError("optim.label_smoothing does not apply to img2img")

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

    def _cycle_step(self, model: nn.Module, batches: list, cfg: Config, update) -> None:
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
        if mode not in ("label2image", "paired", "unpaired") or cfg.data.source not in ("scenes", "pairs"):
            return None
        if cfg.model.feature_recipe == "none":
            return None
        if self._features is None:
            make = im.scene_features if cfg.data.source == "scenes" else im.pair_features
            self._features = make(cfg, rt.device)
        return im.DomainFID(self._features, inputs=mode != "label2image")

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
    ):
        """(scores, kept (input, output, target, extra) of the first `keep` examples) over a split; with `fid` (a
        DomainFID), the scores include its FIDs."""
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
            if mode == "sr":
                base = im.to_unit(x)
                scores.add("psnr_bicubic", im.psnr(base, tt))
                scores.add("ssim_bicubic", im.ssim(base, tt))
            elif mode == "inpaint":
                hole = x[:, -1:]
                scores.add("psnr_hole", im.psnr_masked(o, tt, hole))
                if telea:
                    extra = im.telea(im.to_unit(x[:, :-1]), hole)
                    if extra is not None:
                        scores.add("psnr_hole_telea", im.psnr_masked(extra, tt, hole))
                        scores.add("psnr_telea", im.psnr(extra, tt))
                        scores.add("ssim_telea", im.ssim(extra, tt))
            elif mode in ("paired", "unpaired") and paired_eval and x.shape[1] == t.shape[1]:
                scores.add("psnr_input", im.psnr(im.to_unit(x), tt))
                scores.add("ssim_input", im.ssim(im.to_unit(x), tt))
            if fid is not None:
                fid.add(out, t.float(), x.float() if mode != "label2image" else None)
            for i in range(min(len(x), keep - len(kept))):
                kept.append((x[i].cpu(), out[i].cpu(), t[i].cpu(), None if extra is None else extra[i].cpu()))
        return scores.means() | (fid.compute() if fid is not None else {}), kept

    def evaluate(self, model: nn.Module, data: Data, split: str, cfg: Config, rt: Runtime, final: bool) -> dict:
        """PSNR and SSIM of the outputs (per image, averaged) and of the mode's baseline (see the docstring); at the
        final evaluation the domain FID of translated scenes too."""
        fid = self._fid(cfg, data.spec, rt) if final else None
        return self._run_split(model, data, split, cfg, rt, fid=fid)[0]

    def snapshot(self, model: nn.Module, data: Data, cfg: Config, rt: Runtime) -> dict[str, torch.Tensor]:
        """Input / output / target of 4 held-out examples at each evaluation."""
        split = "val" if data.val is not None else "train"
        _, kept = self._run_split(model, _head(data, split, 4), split, cfg, rt, keep=4)
        tiles = plots.rows(kept, data.spec)[0]
        return {"translations": plots.grid(tiles, 2 * (len(tiles) // max(1, len(kept))))}

    def finish(self, model: nn.Module, data: Data, cfg: Config, rt: Runtime, run_dir: Path, results: dict) -> dict:
        """Test scores (the domain FID included) with the baselines in one table (plots/quality.txt) and rows of
        input / output / target (plots/img2img.png)."""
        split = data.final_split()
        fid = self._fid(cfg, data.spec, rt)
        with torch.no_grad(), rt.autocast():
            m, kept = self._run_split(model, data, split, cfg, rt, keep=8, telea=True, fid=fid)
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
        """Each file -> OUT/<stem>_<mode>.png: sr enlarges the file by the scale (tiled, any size); inpaint fills
        the white pixels of <stem>_mask.png next to the file; label2image draws the scene of a label PNG (class
        ids); paired and unpaired translate the image."""
        from torchvision.io import write_png

        out_dir = Path(opts.out or "predictions")
        out_dir.mkdir(parents=True, exist_ok=True)
        mode, results = spec.extra["mode"], []
        for f in files:
            p = Path(f)
            if mode == "inpaint":
                mask_file = p.with_name(f"{p.stem}_mask.png")
                if not mask_file.is_file():
                    raise UserError(f"{f}: inpaint needs its mask {mask_file} (white = the pixels to fill)")
                img = image_ops.read(f, spec.in_channels)
                out = inpaint(model, spec, rt, img, read_mask(mask_file, tuple(img.shape[-2:])))
            elif mode == "label2image":
                out = translate(model, spec, rt, read_labels(f, spec))
            else:
                img = image_ops.read(f, input_channels(spec))
                out = enhance(model, spec, rt, img, f) if mode == "sr" else translate(model, spec, rt, img)
            dest = out_dir / f"{p.stem}_{mode}.png"
            write_png(out, str(dest))
            h, w = out.shape[-2:]
            results.append({"file": f, "out": str(dest), "size": [w, h], "text": f"{f} -> {dest} ({w}x{h})"})
        return results

    def export_example(self, model: nn.Module, spec: DataSpec, batch: int) -> dict:
        """G is what ships: its input as prepare makes it (B, C_in, H, W) in, the image in [-1, 1] out."""
        g = torch.Generator().manual_seed(batch)
        x = torch.randint(0, 256, (batch, spec.in_channels, *spec.image_size), generator=g, dtype=torch.uint8)
        y = torch.randint(0, max(1, spec.num_classes), (batch, *spec.image_size), generator=g)
        inp, _ = make_input(x, y, spec, Draws(g))
        return {"inputs": {"image": inp}, "outputs": ["output"]}

    def serve(self, ctx: ServeContext) -> None:
        """The endpoint of the model's mode: POST /enhance (sr), /inpaint (image, mask: white = fill, the image's
        size; both scaled down alike past MAX_SIDE; without a mask a centred box of the training hole fraction is
        cut), /translate-image (label2image: a label PNG; paired, unpaired: an image). The answer: the output PNG
        (base64) as `overlay` (the page shows it next to the upload) and `image`, and its size. The page's
        /inpaint widget (kind mask) paints the mask over the uploaded image and shows before and after."""
        from fastapi import File, HTTPException, UploadFile

        spec, mode = ctx.spec, ctx.spec.extra["mode"]

        def answer(out: torch.Tensor) -> dict:
            b64 = image_ops.png_base64(out)
            h, w = out.shape[-2:]
            return {"text": f"{w}x{h}", "image": b64, "overlay": b64, "size": [w, h]}

        def run(fn):  # one request at a time on the model (tiles and sizes vary: no batching across requests)
            import asyncio

            async def go(*args):
                def locked():
                    with ctx.lock:
                        return fn(*args)

                try:
                    return answer(await asyncio.to_thread(locked))
                except UserError as e:
                    raise HTTPException(400, str(e)) from None

            return go

        if mode == "sr":
            go = run(lambda img: enhance(ctx.model, spec, ctx.rt, img))

            @ctx.router.post("/enhance", summary=f"Enlarge an image x{spec.extra['scale']} (super-resolution)")
            async def enhance_endpoint(image: UploadFile = File(..., description="the low-res image")):
                return await go(await ctx.read_image(image, channels=input_channels(spec), size=(0, 0)))

            ctx.widget("/enhance", "image", f"Enlarge an image x{spec.extra['scale']}")
        elif mode == "inpaint":
            go = run(lambda img, hole: inpaint(ctx.model, spec, ctx.rt, img, hole))

            @ctx.router.post("/inpaint", summary="Fill the white pixels of the mask in the image")
            async def inpaint_endpoint(
                image: UploadFile = File(..., description="the image"),
                mask: UploadFile | None = File(None, description="white = the pixels to fill (same size)"),
            ):
                img = await ctx.read_image(image, size=(0, 0))
                if mask is None:
                    hole = centre_box(img.shape[-2:], spec.extra["hole_fraction"])
                else:
                    m = await ctx.read_image(mask, channels=1, size=(0, 0))
                    try:  # sizes compared as sent, then both scaled down alike
                        mask_of(m, tuple(img.shape[-2:]), mask.filename or "mask")
                    except UserError as e:
                        raise HTTPException(400, str(e)) from None
                    hole = mask_of(image_ops.fit_long_side(m, MAX_SIDE), None, "")
                return await go(image_ops.fit_long_side(img, MAX_SIDE), hole)

            ctx.widget("/inpaint", "mask", "Fill what you paint over an image")
        else:
            go = run(lambda img: translate(ctx.model, spec, ctx.rt, img))

            @ctx.router.post("/translate-image", summary="Translate an image (label2image: a PNG of class ids)")
            async def translate_endpoint(image: UploadFile = File(..., description="the image")):
                if mode == "label2image":
                    raw = await ctx.read_image(image, channels=1, size=(0, 0), max_side=0)
                    try:
                        labels = check_labels(raw[0], spec, image.filename or "labels")
                    except UserError as e:
                        raise HTTPException(400, str(e)) from None
                    return await go(labels)
                return await go(
                    await ctx.read_image(image, channels=input_channels(spec), size=(0, 0), max_side=MAX_SIDE)
                )

            ctx.widget("/translate-image", "image", "Translate an image")

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


# ------------------------------------------------------------------------------------------ use on files


def input_channels(spec: DataSpec) -> int:
    e = spec.extra
    return int(e["channels_a"]) if e["mode"] in ("paired", "unpaired") else spec.in_channels


@torch.no_grad()
def enhance(model: nn.Module, spec: DataSpec, rt: Runtime, lr: torch.Tensor, where: str = "the image") -> torch.Tensor:
    """A low-res image uint8 (C, h, w) -> the image `scale` times larger, uint8 (C, h*s, w*s), made in tiles."""
    s = int(spec.extra["scale"])
    h, w = lr.shape[-2:]
    if min(h, w) < 2:
        raise UserError(f"{where} is {w}x{h}: too small to enlarge (at least 2x2 pixels)")
    if h * w * s * s > image_ops.MAX_PIXELS:
        raise UserError(f"{where} is {w}x{h}: x{s} would be over {image_ops.MAX_PIXELS} pixels, send a smaller image")
    model.eval()
    x = degrade.enlarge(unit(lr[None].to(rt.device)), s)  # (1, C, H, W)
    return _to_uint8(tiled(model, x, rt))


def tiled(model: nn.Module, x: torch.Tensor, rt: Runtime, tile: int = TILE) -> torch.Tensor:
    """model(x) of a (1, C, H, W) input, computed on tiles so any size fits in memory, and exactly the whole
    image's answer: each tile keeps a block of about `tile` pixels a side, starts on a multiple of the net's size
    multiple (so its poolings see the same pixel grid) and reaches past its block by the net's reach (so every
    kept pixel sees what it would see in the whole image; the image's own borders are borders in both)."""
    H, W = x.shape[-2:]
    m = model.multiple
    reach = -(-model.reach // m) * m  # a multiple of m, so every window starts on the grid
    step = max(m, tile // m * m)
    if H <= step + reach and W <= step + reach:
        with rt.autocast():
            return model(x).float()
    out = torch.zeros(1, model.out_channels, H, W, device=x.device)
    for top in range(0, H, step):
        for left in range(0, W, step):
            t0, l0 = max(0, top - reach), max(0, left - reach)
            t1, l1 = min(H, top + step + reach), min(W, left + step + reach)
            with rt.autocast():
                y = model(x[..., t0:t1, l0:l1]).float()
            bh, bw = min(step, H - top), min(step, W - left)
            out[..., top : top + bh, left : left + bw] = y[..., top - t0 : top - t0 + bh, left - l0 : left - l0 + bw]
    return out


@torch.no_grad()
def inpaint(model: nn.Module, spec: DataSpec, rt: Runtime, img: torch.Tensor, hole: torch.Tensor) -> torch.Tensor:
    """Image uint8 (C, H, W) and hole (H, W) in {0, 1} -> the image with the hole filled, uint8."""
    model.eval()
    x = unit(img[None].to(rt.device))
    m = hole[None, None].float().to(rt.device)
    with rt.autocast():
        out = model(torch.cat([x * (1 - m), m], 1)).float()
    return _to_uint8(out)


@torch.no_grad()
def translate(model: nn.Module, spec: DataSpec, rt: Runtime, x: torch.Tensor) -> torch.Tensor:
    """An image uint8 (C, H, W) (label2image: labels (H, W)) -> the translated image uint8 (C, H, W)."""
    model.eval()
    if spec.extra["mode"] == "label2image":
        inp = make_input(torch.zeros(1, 3, *x.shape), x[None].to(rt.device), spec, degrade.eval_draws(rt.device))[0]
    else:
        inp = unit(x[None].to(rt.device))
    with rt.autocast():
        return _to_uint8(model(inp.to(rt.device)).float())


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    return ((x[0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()


def mask_of(m: torch.Tensor, size: tuple[int, int] | None, where: str) -> torch.Tensor:
    """A mask image uint8 (1, h, w) -> hole (H, W) in {0, 1} (white, >= 128, = fill); its size must be `size`
    (None: any)."""
    if size is not None and tuple(m.shape[-2:]) != tuple(size):
        raise UserError(
            f"{where}: the mask is {m.shape[-1]}x{m.shape[-2]} but the image is {size[1]}x{size[0]}: "
            "a mask must have its image's size"
        )
    return (m[0] >= 128).float()


def read_mask(path: Path, size: tuple[int, int]) -> torch.Tensor:
    """A mask file (gray or colour: white = fill) -> hole (H, W) checked against the image size."""
    from deeprecipe.core import DataError

    try:
        m = image_ops.read(path, 1)
    except (DataError, UserError) as e:
        raise UserError(f"{path}: not a readable mask image ({e})") from None
    return mask_of(m, size, str(path))


def centre_box(size: tuple[int, int], fraction: float) -> torch.Tensor:
    H, W = size
    h, w = max(1, round(H * fraction**0.5)), max(1, round(W * fraction**0.5))
    hole = torch.zeros(H, W)
    hole[(H - h) // 2 : (H - h) // 2 + h, (W - w) // 2 : (W - w) // 2 + w] = 1
    return hole


def check_labels(lab: torch.Tensor, spec: DataSpec, where: str) -> torch.Tensor:
    """A label map (H, W) of class ids (255 = none): every id must be a class."""
    k = spec.num_classes
    bad = (lab >= k) & (lab != 255)
    if bad.any():
        raise UserError(f"{where}: label id {int(lab[bad][0])} is not one of the {k} classes (0..{k - 1}, 255 = none)")
    return lab


def read_labels(path: str, spec: DataSpec) -> torch.Tensor:
    raw = image_ops.read(path, 0)
    if raw.shape[0] != 1:
        raise UserError(f"{path}: a label map is a one-channel PNG of class ids, this one has {raw.shape[0]} channels")
    return check_labels(raw[0], spec, path)
