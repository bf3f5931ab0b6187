"""Image classification: what a batch is, the loss, the metrics, and the plots of a finished run.

A batch is (images uint8 (B, C, H, W), labels (B,)). `prepare` turns it, on the device, into what the net
sees: floats normalized by the train split's mean/std, randomly cropped and flipped when training.
"""

from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from deeprecipe.common.classes import metrics, predict_split, prepare, top_labels
from deeprecipe.config import Config
from deeprecipe.core import ConfigError, DataSpec, UserError
from deeprecipe.data import image_ops
from deeprecipe.data.core import Data
from deeprecipe.data.image_ops import denormalize
from deeprecipe.family import ExplainOptions, Family, PredictOptions, ServeContext, label_score, unwrapped
from deeprecipe.runtime import Runtime


class FlipAverage(nn.Module):
    """train.tta=flip: the mean of the net's logits on images (B, C, H, W) and on their mirrors, in one batch of 2B
    (a net in eval mode scores each image on its own, so the pair changes nothing but the cost)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        out = self.net(torch.cat([x, x.flip(-1)]))
        return (out[:n] + out[n:]) / 2


def inference_net(model: nn.Module, cfg: Config) -> nn.Module:
    """What evaluation, predict, serve and export run: the model, averaged with its mirror under train.tta=flip."""
    return FlipAverage(model) if cfg.train.tta == "flip" else model


@torch.no_grad()
def classify_images(model: nn.Module, spec: DataSpec, rt: Runtime, images: list[torch.Tensor]) -> list[torch.Tensor]:
    """uint8 images (C, H, W) at the spec's size -> class probabilities (C,) each, in one batch; what predict and
    /classify both run, so the same file gives the same answer."""
    x, _ = prepare((torch.stack(images).to(rt.device), None), spec)  # (B, C, H, W)
    with rt.autocast():
        return list(model(x).float().softmax(-1).cpu())


def _class_index(target: int | None, spec: DataSpec) -> int | None:
    """explain --target N, checked against the classes (None: each input's predicted class)."""
    if target is not None and not 0 <= target < spec.num_classes:
        raise UserError(f"explain --target {target}: the model has classes 0..{spec.num_classes - 1}")
    return target


def explain_tensor(
    model: nn.Module,
    spec: DataSpec,
    rt: Runtime,
    image: torch.Tensor,
    method: str,
    target: int | None = None,
    sanity=False,
) -> dict:
    """One uint8 image (C, H, W) at the spec's size -> the attribution of the predicted (or `target`) class's
    logit: Integrated Gradients from a black image, Grad-CAM on the last conv layer, or occlusion by black windows
    (engine/explain.py image_explanation: "map", "png" the overlay, "delta", "sanity"), with "target", "label" and
    "score" (its probability). What `explain`, the served /explain and the report's Grad-CAM plot all run."""
    from deeprecipe.engine import explain as ex

    (p,) = classify_images(model, spec, rt, [image])
    c = int(p.argmax()) if target is None else target
    x = prepare((image[None], None), spec)[0]
    baseline = prepare((torch.zeros(1, *image.shape, dtype=torch.uint8), None), spec)[0]  # black
    r = ex.image_explanation(model, image, x, baseline, lambda net: lambda z: net(z).float(), c, method, sanity)
    return r | {"target": c, "label": spec.class_names[c], "score": round(float(p[c]), 4)}


def has_conv(model: nn.Module) -> bool:
    """Whether Grad-CAM has a layer to look at (a conv layer before the head)."""
    from deeprecipe.engine import explain as ex

    try:
        ex.last_conv(model)
    except UserError:
        return False
    return True


def gradcam_mistakes(
    model: nn.Module,
    spec: DataSpec,
    rt: Runtime,
    images: torch.Tensor,
    predicted: list[int],
    truth: list[int],
    path: Path,
) -> None:
    """Grad-CAM of the predicted (wrong) class for each uint8 image (B, C, H, W) whose true class is in `truth`:
    the images and their heat maps side by side in one grid at `path`. Nothing for a model without a conv layer
    (an MLP)."""
    from deeprecipe.engine import explain as ex
    from deeprecipe.engine import plots

    if not len(images) or not has_conv(model):
        return
    panels, captions = [], []
    for img, c, t in zip(images.cpu(), predicted, truth):
        r = explain_tensor(model, spec, rt, img, "gradcam", target=c)
        panels.append(ex.overlay_image(img, r["map"], "gradcam"))
        captions.append(f"{r['label']} ({r['score']:.2f})\ntrue: {spec.class_names[t]}")
    plots.image_grid(torch.stack(panels), captions, path, "Grad-CAM of the predicted class, worst mistakes", cols=4)


def serve_explain(ctx: ServeContext) -> None:
    """POST /explain?method=gradcam|ig|occlusion: an image file -> the predicted class and the overlay of its
    attribution (explain_tensor, as `deeprecipe explain` runs it), one request at a time in a worker thread."""
    import base64
    from typing import Literal

    from fastapi import File, Query, UploadFile

    spec = ctx.spec
    methods = ["gradcam", "ig", "occlusion"] if has_conv(ctx.model) else ["ig", "occlusion"]

    @ctx.router.post("/explain", summary="Explain an image's predicted class (attribution overlay)")
    async def explain(
        image: UploadFile = File(..., description="the image file"),
        method: Literal["gradcam", "ig", "occlusion"] = Query(methods[0], description="attribution method"),
    ):
        img = await ctx.read_image(image)
        # 422: Grad-CAM on a model without a conv layer
        r = await ctx.locked(explain_tensor, ctx.model, spec, ctx.rt, img, method, bad=422)
        overlay = base64.b64encode(r["png"]).decode()
        return {"label": r["label"], "prob": r["score"], "method": method, "overlay": overlay}

    ctx.widget("/explain", "image", "Explain an image", methods=methods)


def distill_loss(student: torch.Tensor, teacher: torch.Tensor, T: float) -> torch.Tensor:
    """T^2 * KL(softmax(teacher / T) || softmax(student / T)), the batch mean, for logits (B, C): the soft-target
    term of knowledge distillation (Hinton et al. 2015; T^2 keeps its gradients' scale as T changes)."""
    s, t = F.log_softmax(student.float() / T, -1), F.log_softmax(teacher.float() / T, -1)
    return F.kl_div(s, t, reduction="batchmean", log_target=True) * T * T


def attention_map(a: torch.Tensor) -> torch.Tensor:
    """Attention transfer's map of a stage's output (B, C, H, W) -> (B, H * W): the channel mean of the squared
    activations, scaled to unit length per example (where the net looks, whatever its width)."""
    return F.normalize(a.float().pow(2).mean(1).flatten(1), dim=1)


def attention_loss(student: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
    """Sum over the stages of the mean squared difference of the two nets' attention maps; the stages pair up in
    order and must have the same sizes."""
    sizes = [tuple(a.shape[-2:]) for a in student], [tuple(a.shape[-2:]) for a in teacher]
    if sizes[0] != sizes[1]:
        raise UserError(
            f"distill.attention: the student's stage maps ({sizes[0]}) and the teacher's ({sizes[1]}) do not pair "
            "up; attention transfer needs nets with as many stages of the same sizes (or set distill.attention=0)"
        )
    return sum((attention_map(s) - attention_map(t)).pow(2).mean() for s, t in zip(student, teacher))


def stage_outputs(model: nn.Module, who: str) -> list[nn.Module]:
    """The model's stage modules (Classifier.stage_outputs), through a DDP or compile wrapper; an error if none."""
    net = unwrapped(model)
    mods = net.stage_outputs() if hasattr(net, "stage_outputs") else []
    if not mods:
        raise UserError(
            f"distill.attention: the {who}'s model ({type(net).__name__}) has no stage feature maps to match; "
            "attention transfer needs a CNN or ResNet on both sides (or set distill.attention=0)"
        )
    return mods


@contextmanager
def captured(modules: list[nn.Module]):
    """The outputs of `modules` during the forward passes inside the block, in the order they ran."""
    outs: list[torch.Tensor] = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: outs.append(out)) for m in modules]
    try:
        yield outs
    finally:
        for h in hooks:
            h.remove()


class Teacher:
    """The teacher of cfg.distill: a classifier run's model (its inference weights, eval mode, frozen, averaged with
    its mirror when it was trained with train.tta=flip) on the student's device, loaded at the first batch;
    `run(x)` takes the student's prepared input and feeds the teacher the same pixels under its own
    normalization."""

    def __init__(self):
        self.key, self.model, self.net, self.scale, self.shift = None, None, None, None, None

    def run(self, x: torch.Tensor, cfg: Config, spec: DataSpec, family: Family, maps: bool = False):
        """(the teacher's logits (B, classes) for the student's input x, its stage maps when `maps` else [])."""
        from deeprecipe.engine.run import load_run

        if self.key != (cfg.distill.teacher, x.device):
            # building the net draws its initial weights: from a forked RNG, so the run's own stream (dropout,
            # augmentation) is the same whether or not the teacher was loaded just before (seed check, resume)
            with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
                tcfg, tspec, model, _ = load_run(cfg.distill.teacher, type(family)(), str(x.device), "fp32")
            where = f"distill.teacher={cfg.distill.teacher}"
            if tcfg.task != "classify" or tspec.class_names != spec.class_names:
                raise UserError(f"{where}: the teacher must be a classifier of the same classes as this run's data")
            if (tspec.in_channels, tuple(tspec.image_size)) != (spec.in_channels, tuple(spec.image_size)):
                raise UserError(f"{where}: the teacher takes {tspec.in_channels} x {tspec.image_size} images")
            view = (1, -1, 1, 1)
            s_mean, s_std = torch.tensor(spec.mean).view(view), torch.tensor(spec.std).view(view)
            t_mean, t_std = torch.tensor(tspec.mean).view(view), torch.tensor(tspec.std).view(view)
            # student-normalized x -> pixels x * s_std + s_mean -> the teacher's (p - t_mean) / t_std, as one affine
            self.scale, self.shift = (s_std / t_std).to(x.device), ((s_mean - t_mean) / t_std).to(x.device)
            # a teacher trained with train.tta=flip teaches what its own evaluation scored: the mirror average
            self.net, self.model = model.requires_grad_(False), inference_net(model, tcfg)
            self.key = (cfg.distill.teacher, x.device)
        with torch.no_grad(), captured(stage_outputs(self.net, "teacher") if maps else []) as out:
            logits = self.model(x * self.scale + self.shift).float()
        return logits, [o[: len(x)] for o in out]  # under train.tta=flip each ran once on [x, mirrored x]


class Classify(Family):
    """Image classification (see the module docstring)."""

    TTA = ("none", "flip")

    def __init__(self):
        self._teacher = Teacher()  # cfg.distill's teacher, loaded by the first loss that needs it
        self._spec: DataSpec | None = None  # the spec the model was built for: the teacher must match it
        self._cfg: Config | None = None  # the config of the model built last (export_example reads train.tta)

    def check_config(self, cfg: Config) -> None:
        t = cfg.distill.teacher
        if t and not (Path(t) / "config.yaml").is_file():
            raise ConfigError(f"distill.teacher={t}: not a run folder (no config.yaml); name a classifier's run")
        if cfg.distill.attention and not t:
            raise ConfigError("distill.attention: attention transfer needs a teacher; set distill.teacher=RUN")
        if cfg.distill.attention and cfg.train.compile:
            raise ConfigError(
                "distill.attention reads the student's stage maps through forward hooks, which a compiled model "
                "does not run: set train.compile=false"
            )
        if cfg.train.tta == "flip" and not getattr(cfg.data, "flip", False):
            raise ConfigError(
                "train.tta=flip averages each image with its mirror, but the net never sees mirrored images "
                "(data.flip is off): set data.flip=true or train.tta=none"
            )

    def build_model(self, cfg: Config, spec: DataSpec) -> nn.Module:
        self._spec, self._cfg = spec, cfg
        return cfg.model.build(spec)

    def expected_init_loss(self, spec: DataSpec, cfg: Config) -> tuple[float, str] | None:
        """ln C, unless a teacher's term is in the loss (its value at init depends on the teacher)."""
        d = cfg.distill
        return None if d.teacher and (d.weight or d.attention) else super().expected_init_loss(spec, cfg)

    prepare = staticmethod(prepare)

    METRIC = ("acc", "max")

    def saliency_score(self, model: nn.Module, batch, cfg: Config) -> torch.Tensor:
        """The saliency check's score: the true class's logit."""
        return label_score(model(batch[0]).float(), batch[1])

    def show_batch(self, batch, spec: DataSpec) -> tuple[torch.Tensor, list[str]]:
        """A prepared batch for the eye (deeprecipe check): images de-normalized to [0, 1], captioned by label."""
        x, y = batch
        names = spec.class_names
        return denormalize(x, spec), [names[int(v)] if 0 <= int(v) < len(names) else f"?{int(v)}" for v in y]

    def loss(self, model: nn.Module, batch, cfg: Config, part: str):
        x, y = batch
        d = cfg.distill
        with captured(stage_outputs(model, "student") if d.attention else []) as maps:
            logits = model(x).float()
        ce = F.cross_entropy(logits, y, label_smoothing=cfg.optim.label_smoothing)
        if not d.teacher:
            return ce, {}
        t_logits, t_maps = self._teacher.run(x, cfg, self._spec, self, maps=bool(d.attention))
        kd = distill_loss(logits, t_logits, d.temperature)
        loss, logs = (1 - d.weight) * ce + d.weight * kd, {"ce": ce.detach(), "kd": kd.detach()}
        if d.attention:
            at = attention_loss(maps, t_maps)
            loss, logs["at"] = loss + d.attention / 2 * at, at.detach()
        return loss, logs

    def evaluate(self, model: nn.Module, data: Data, split: str, cfg: Config, rt: Runtime, final: bool) -> dict:
        logits, labels = predict_split(inference_net(model, cfg), data, split, cfg, rt)
        return metrics(logits, labels, data.spec.num_classes)

    def finish(self, model: nn.Module, data: Data, cfg: Config, rt: Runtime, run_dir: Path, results: dict) -> dict:
        """Test metrics, confusion matrix and the worst mistakes of the finished run."""
        from deeprecipe.engine import drift, plots

        split = data.final_split()
        model.eval()
        with torch.no_grad(), rt.autocast():
            logits, labels = predict_split(inference_net(model, cfg), data, split, cfg, rt)
        m = metrics(logits, labels, data.spec.num_classes)
        names = data.spec.class_names
        plots.confusion(m["confusion"], names, Path(run_dir) / "plots" / "confusion.png", f"{split} confusion matrix")
        probs = logits.softmax(-1)
        wrong = (probs.argmax(-1) != labels).nonzero().flatten()
        order = wrong[probs[wrong, labels[wrong]].argsort()][:36]  # most confident mistakes first
        if len(order):
            n = min(len(data.split(split)), cfg.train.limit_eval or len(data.split(split)))
            imgs = data.split(split).take(order[order < n].to(torch.long))[0]
            captions = [
                f"{names[int(probs[i].argmax())]} ({probs[i].max():.2f})\ntrue: {names[int(labels[i])]}"
                for i in order.tolist()
            ]
            plots.image_grid(
                imgs.float().cpu() / 255,
                captions,
                Path(run_dir) / "plots" / "worst_mistakes.png",
                f"worst {split} mistakes: predicted (confidence) / true",
            )
            worst = order[order < n][:8].to(torch.long)
            gradcam_mistakes(
                model,
                data.spec,
                rt,
                imgs[: len(worst)],
                probs[worst].argmax(-1).tolist(),
                labels[worst].tolist(),
                Path(run_dir) / "plots" / "worst_mistakes_gradcam.png",
            )
        drift.save_reference(self, model, data, cfg, rt, run_dir)  # for `deeprecipe monitor`
        return {f"{split}_{k}": v for k, v in m.items() if k in ("acc", "top5", "loss")} | {
            f"{split}_precision": m["precision"],
            f"{split}_recall": m["recall"],
        }

    def predict(
        self, model: nn.Module, spec: DataSpec, cfg: Config, rt: Runtime, files: list[str], opts: PredictOptions
    ) -> list[dict]:
        """Image files -> top-k labels with probabilities."""
        images = [image_ops.for_model(image_ops.read(f, spec.in_channels), spec) for f in files]
        probs = classify_images(inference_net(model, cfg), spec, rt, images)
        return [top_labels(f, p, spec.class_names, opts.top) for f, p in zip(files, probs)]

    def explain(
        self, model: nn.Module, spec: DataSpec, cfg: Config, rt: Runtime, files: list[str], opts: ExplainOptions
    ) -> list[dict]:
        """Image files -> the attribution of the predicted (or --target) class's logit: Integrated Gradients from
        a black image, Grad-CAM on the last conv layer, or occlusion by black windows; an overlay PNG per file."""
        from deeprecipe.engine import explain as ex

        method = ex.check_method(opts.method, what="an image classifier")
        target = _class_index(opts.target, spec)
        images = [image_ops.for_model(image_ops.read(f, spec.in_channels), spec) for f in files]  # all read first
        results = []
        for f, img in zip(files, images):
            r = ex.save_explanation(explain_tensor(model, spec, rt, img, method, target, opts.sanity), f, opts.out)
            r |= {"file": f}
            r["text"] = f"{f}: {r['label']} ({r['score']:.3f}) {method} -> {r['out']}"
            results.append(r)
        return results

    def export_example(self, model: nn.Module, spec: DataSpec, batch: int) -> dict:
        """What `deeprecipe export` feeds the net: a normalized image batch (B, C, H, W), batch axis dynamic."""
        g = torch.Generator().manual_seed(batch)
        x = torch.randint(0, 256, (batch, spec.in_channels, *spec.image_size), dtype=torch.uint8, generator=g)
        ex = {"inputs": {"image": prepare((x, None), spec)[0].contiguous()}, "outputs": ["logits"]}
        return ex | ({"module": inference_net(model, self._cfg)} if self._cfg is not None else {})

    def serve(self, ctx: ServeContext) -> None:
        """POST /classify: an image file -> its top labels; concurrent requests run as one batch."""
        from fastapi import File, Query, UploadFile

        spec = ctx.spec

        net = inference_net(ctx.model, ctx.cfg)
        batch = ctx.batcher("classify", lambda images: classify_images(net, spec, ctx.rt, images))

        @ctx.router.post("/classify", summary="Classify an image (PNG, JPEG, ...)")
        async def classify(
            image: UploadFile = File(..., description="the image file"),
            top: int = Query(3, ge=1, le=max(1, spec.num_classes), description="labels to return"),
        ):
            out = top_labels("image", await batch(await ctx.read_image(image)), spec.class_names, top)
            return {k: out[k] for k in ("label", "prob", "top")}  # as `predict` reports the same file

        ctx.widget("/classify", "image", "Classify an image")
        serve_explain(ctx)
