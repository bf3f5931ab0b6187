"""Self-supervised pretraining of a vision backbone on unlabelled images: SimCLR (Chen et al. 2020).

A batch is (images uint8 (B, C, H, W), whatever labels the data set has): the labels are never read, so any image
data set serves (the generated scenes, an image folder, ...). `prepare` makes two views of every image on the
device (data/views.py: crop, flip, colour jitter, grayscale, all images at once) -> (view 1, view 2), each
(B, C, H, W) normalized. For evaluation (draws None) view 1 is the image itself and view 2 a fixed view of it.

The model is the recipe's registered classifier (tv-resnet18: torchvision's ResNet-18) with its head replaced by
the projection MLP (`Projector`: Linear-BN-ReLU-Linear to pretrain.proj_dim). The trunk keeps the classifier's own
tensor names, so the run's weights load by name wherever that trunk is: `finetune.init_from RUN` into tv-resnet18,
into unet-resnet18's `encoder.` or a CenterNet's `backbone.` (engine/finetune.py, models/pretrained.py
best_prefix); `finish` also writes the trunk alone, in that layout, as RUN/backbone.safetensors for
`model.weights`.

Loss: NT-Xent over the 2B views. Each view's positive is the other view of its image and its 2B - 2 negatives the
other images' views; the logits are cosine similarities / pretrain.temperature, the loss their cross-entropy. The
negatives come from the micro-batch, so gradient accumulation would not equal the big batch: refused.
Metric: `acc`, the top-1 retrieval accuracy over a split: each image (view 1: itself) must find its own fixed view
among the views of all the split's images (chance: 1 / N); `top5`; `loss` (NT-Xent per batch of
train.eval_batch_size, so it depends on that size); `pos_cos`, the mean cosine of an image and its view.
Serving: POST /embed gives an image's trunk features (the projector's input).
"""

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from deeprecipe.checks.data import configured_batch
from deeprecipe.config import Config
from deeprecipe.core import ConfigError, DataSpec
from deeprecipe.data.core import Data, Draws, eval_batches
from deeprecipe.data.image_ops import denormalize
from deeprecipe.data.views import view
from deeprecipe.family import Family, ServeContext
from deeprecipe.models.pretrained import classifier
from deeprecipe.runtime import Runtime

BACKBONE_FILE = "backbone.safetensors"  # the trunk alone, in the model's own (torchvision) layout


class Projector(nn.Sequential):
    """SimCLR's projection head g: the trunk's features (B, F) -> (B, dim). The loss compares its outputs;
    fine-tuning keeps the features before it (they transfer better: SimCLR section 4.2)."""

    def __init__(self, features: int, hidden: int, dim: int):
        super().__init__(
            nn.Linear(features, hidden, bias=False),
            nn.BatchNorm1d(hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, dim),
        )


def projector_name(model: nn.Module) -> str:
    return next(n for n, m in model.named_modules() if isinstance(m, Projector))


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent of the views' embeddings z1, z2 (B, D), row i of each the same image: the mean over the 2B views of
    the cross-entropy of picking the partner among the 2B - 1 other views, by cosine similarity / temperature."""
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)  # (2B, D)
    n = len(z1)
    sim = z @ z.T / temperature  # (2B, 2B)
    sim = sim.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))  # not itself
    i = torch.arange(n, device=z.device)  # made on the device: no host copy inside a captured CUDA step
    partner = torch.cat([i + n, i])
    return F.cross_entropy(sim, partner)


def eval_draws(device: torch.device, k: int = 0) -> Draws:
    """The fixed random numbers of evaluation batch k's views (the same views at every evaluation)."""
    return Draws(torch.Generator(device=device).manual_seed(1_000_003 + k))


def prepare(
    batch: tuple, spec: DataSpec, cfg: Config, draws: Draws | None, k: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw images (B, C, H, W) uint8 -> two normalized views of each; without draws (evaluation batch k), the image
    itself and a fixed view of it."""
    x = batch[0].float() / 255
    p = cfg.pretrain
    make = lambda d: view(x, d, p.crop_scale, p.jitter, p.jitter_p, p.gray_p)  # noqa: E731
    v1, v2 = (make(draws), make(draws)) if draws is not None else (x, make(eval_draws(x.device, k)))
    shape = (1, -1, 1, 1)  # gray data under a three-channel mean/std: the gray image in every channel
    mean = torch.tensor(spec.mean, device=x.device).view(shape)
    std = torch.tensor(spec.std, device=x.device).view(shape)
    return (v1 - mean) / std, (v2 - mean) / std


@torch.no_grad()
def trunk_features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The trunk's features (B, F) of normalized images (B, C, H, W): the projector's input, in fp32."""
    got: list[torch.Tensor] = []
    hook = model.get_submodule(projector_name(model)).register_forward_pre_hook(lambda m, a: got.append(a[0]))
    try:
        model(x)
    finally:
        hook.remove()
    return got[0].float()


class Pretrain(Family):
    """Self-supervised pretraining (see the module docstring)."""

    METRIC = ("acc", "max")
    CHECKS_SKIP = {
        "labels": "pretraining never reads the data set's labels",
        "balance": "pretraining never reads the data set's labels",
        "init_prior": "the model embeds images; it predicts no classes",
        # measured on 32 px scenes, batch 16: NT-Xent on fresh random views falls by a few percent in 50 steps, inside
        # its step-to-step noise (the overfit check drives fixed views to ~0; dynamics follows held-out alignment)
        "loss_down": "NT-Xent on fresh random views falls too slowly for the short run to tell from noise",
        "baseline": "zeroed inputs score ln(2N - 1) exactly; the short run is too short to beat it by the margin",
    }
    EXTRA_CHECKS = {"batch": configured_batch}

    def __init__(self):
        self._cfg: Config | None = None  # the views' options (pretrain section) for prepare, which takes no config

    def check_config(self, cfg: Config) -> None:
        """Refuse what the method cannot honour, and keep the config for prepare's views."""
        cfg.pretrain.check_for("pretrain")
        if cfg.train.accum > 1:
            raise ConfigError(
                f"train.accum={cfg.train.accum}: NT-Xent takes its negatives from the micro-batch, so accumulation "
                "would not equal the big batch; use train.accum=1 (a smaller train.batch_size if memory is short)"
            )
        self._cfg = cfg

    def build_model(self, cfg: Config, spec: DataSpec) -> nn.Module:
        """The recipe's classifier with its head (one nn.Linear) replaced by the projection MLP."""
        self._cfg = cfg
        net = cfg.model.build(spec)
        head = classifier(net)
        if not isinstance(head, nn.Linear):
            raise ConfigError(
                f"model.name={cfg.model.name}: pretraining replaces a classifier's linear head with the projection "
                "MLP; use a classifier such as tv-resnet18, resnet or cnn"
            )
        name = next(n for n, m in net.named_modules() if m is head)
        net.set_submodule(name, Projector(head.in_features, cfg.pretrain.proj_hidden, cfg.pretrain.proj_dim))
        return net

    def prepare(self, batch: tuple, spec: DataSpec, draws: Draws | None) -> tuple:
        if self._cfg is None:
            raise RuntimeError("Pretrain.prepare before check_config or build_model gave it the views' options")
        return prepare(batch, spec, self._cfg, draws)

    def loss(self, model: nn.Module, batch: tuple, cfg: Config, part: str) -> tuple[torch.Tensor, dict]:
        v1, v2 = batch
        z = model(torch.cat([v1, v2]))  # (2B, D): one pass, so BatchNorm sees both views
        return nt_xent(z[: len(v1)], z[len(v1) :], cfg.pretrain.temperature), {}

    def per_example_loss(self, model: nn.Module, batch: tuple, cfg: Config) -> torch.Tensor:
        """(B,) 1 - cosine of each image's two embeddings: the part of NT-Xent that belongs to the example alone
        (the rest compares it with the batch by design), so the dependency check proves that the encoder never
        mixes examples, and the dynamics check follows held-out alignment."""
        v1, v2 = batch
        return 1 - F.cosine_similarity(model(v1).float(), model(v2).float(), dim=1)

    def expected_init_loss(self, spec: DataSpec, cfg: Config) -> None:
        """None: an untrained net already tells some views apart (random conv features are not blind), and the
        value depends on the batch size, which this hook is not given."""
        return None

    def evaluate(self, model: nn.Module, data: Data, split: str, cfg: Config, rt: Runtime, final: bool) -> dict:
        z1s, z2s, total, n = [], [], 0.0, 0
        batches = eval_batches(data.split(split), cfg.train.eval_batch_size, rt.device, cfg.train.limit_eval)
        for k, batch in enumerate(batches):
            v1, v2 = prepare(batch, data.spec, cfg, None, k)
            z1, z2 = model(v1).float(), model(v2).float()
            if len(z1) > 1:
                total, n = total + float(nt_xent(z1, z2, cfg.pretrain.temperature)) * len(z1), n + len(z1)
            z1s.append(F.normalize(z1, dim=1).cpu()), z2s.append(F.normalize(z2, dim=1).cpu())
        z1, z2 = torch.cat(z1s), torch.cat(z2s)  # (N, D) each
        ranks = []
        for i in range(0, len(z1), 1024):  # rows of the (N, N) similarities a block at a time
            sim = z1[i : i + 1024] @ z2.T
            own = sim[torch.arange(len(sim)), torch.arange(i, i + len(sim))]
            ranks.append((sim > own[:, None]).sum(1))  # how many other images' views beat its own
        rank = torch.cat(ranks)
        return {
            "acc": float((rank == 0).float().mean()),
            "top5": float((rank < 5).float().mean()),
            "loss": total / max(n, 1),
            "pos_cos": float((z1 * z2).sum(1).mean()),  # alignment of an image with its view
        }

    def show_batch(self, batch: tuple, spec: DataSpec) -> tuple[torch.Tensor, list[str]]:
        """The first images' two views side by side (de-normalized)."""
        v1, v2 = (denormalize(v[:8], spec) for v in batch)
        pairs = torch.stack([v1, v2], 1).flatten(0, 1)  # view 1, view 2 of image 0, then of image 1, ...
        return pairs, [f"{i} view {k}" for i in range(len(v1)) for k in (1, 2)]

    def snapshot(self, model: nn.Module, data: Data, cfg: Config, rt: Runtime) -> dict[str, torch.Tensor]:
        """The views the loss compares, for the first held-out images: a grid of (image, its fixed view) pairs."""
        from torchvision.utils import make_grid

        split = data.split("val" if data.val is not None else "train")
        raw = split.take(torch.arange(min(8, len(split))))
        pairs, _ = self.show_batch(prepare(tuple(t.to(rt.device) for t in raw), data.spec, cfg, None), data.spec)
        return {"views": make_grid(pairs.float().cpu(), nrow=8, padding=1)}

    def finish(self, model: nn.Module, data: Data, cfg: Config, rt: Runtime, run_dir: Path, results: dict) -> dict:
        """The final split's metrics, and the trunk alone (no projector) as run_dir/backbone.safetensors."""
        from deeprecipe.engine import checkpoint

        head = projector_name(model) + "."
        trunk = {k: v for k, v in checkpoint.plain_state(model).items() if not k.startswith(head)}
        checkpoint.save_weights(Path(run_dir) / BACKBONE_FILE, trunk, {"format": "pt", "source": "deeprecipe pretrain"})
        split = data.final_split()
        with torch.no_grad(), rt.autocast():
            m = self.evaluate(model, data, split, cfg, rt, True)
        return {f"{split}_{k}": v for k, v in m.items()}

    def serve(self, ctx: ServeContext) -> None:
        """POST /embed: an image -> the trunk's feature vector (what fine-tuning starts from); concurrent requests
        run as one batch."""
        from fastapi import File, UploadFile

        spec = ctx.spec

        def embed(images: list[torch.Tensor]) -> list[torch.Tensor]:
            x, _ = self.prepare((torch.stack(images).to(ctx.rt.device),), spec, None)  # the image itself
            with ctx.rt.autocast():
                return list(trunk_features(ctx.model, x).cpu())

        batch = ctx.batcher("embed", embed)

        @ctx.router.post("/embed", summary="The backbone's features of an image (PNG, JPEG, ...)")
        async def embed_one(image: UploadFile = File(..., description="the image file")):
            f = await batch(await ctx.read_image(image))
            return {"dim": len(f), "features": [round(float(v), 6) for v in f]}

        ctx.widget("/embed", "image", "Embed an image")
