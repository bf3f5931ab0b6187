"""Video classification: a batch is (clips uint8 (B, C, T, H, W), labels (B,)); at evaluation a real video
set gives K clips per video (B, K, C, T, H, W) and the video's prediction is the mean of their softmaxes.

Augmentation (random shift, horizontal flip) is the image classifier's, applied with the same draw to every
frame of a clip by folding time into channels. Metrics are the classifier's too: top-1, top-5, per-class
precision/recall and the confusion matrix, computed from the clip-averaged probabilities.
"""

import contextlib
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from deeprecipe.common import classes
from deeprecipe.config import Config
from deeprecipe.core import DataSpec
from deeprecipe.data.core import Data, Draws, eval_batches
from deeprecipe.data.image_ops import denormalize, normalize
from deeprecipe.family import Family, PredictOptions, ServeContext
from deeprecipe.runtime import Runtime


def prepare(batch, spec: DataSpec, draws: Draws | None = None):
    x, y = batch
    shape = x.shape  # (B, C, T, H, W) or (B, K, C, T, H, W)
    C, T, H, W = shape[-4:]
    x = normalize(x.reshape(-1, C, T * H, W), spec)  # per-channel, time folded into height
    C = x.shape[1]  # 3 from gray clips when the net's weights want RGB (image_ops.normalize)
    if draws is not None:
        x = classes.augment(x.reshape(-1, C * T, H, W), spec, draws)  # one crop and flip per clip
    return x.reshape(*shape[:-4], C, T, H, W), y


def fp32_on_cpu(x: torch.Tensor):
    """3D convolutions run in fp32 on the CPU: in torch 2.14 the bf16 weight gradient of a (3, 1, 1) Conv3d on
    clips of 2 frames comes out NaN most of the time (a CPU kernel bug; tests/test_video.py checks this path)."""
    return torch.autocast("cpu", enabled=False) if x.device.type == "cpu" else contextlib.nullcontext()


def clip_average(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Log of the mean softmax over the K clips of each video: (B, K, C, T, H, W) -> (B, classes)."""
    with fp32_on_cpu(x):
        if x.ndim == 5:
            return model(x).float().log_softmax(-1)
        B, K = x.shape[:2]
        probs = model(x.flatten(0, 1)).float().softmax(-1).view(B, K, -1).mean(1)
    return probs.clamp_min(1e-12).log()


def predict_split(model: nn.Module, data: Data, split: str, cfg: Config, rt: Runtime):
    logits, labels = [], []
    for batch in eval_batches(
        data.split(split), cfg.train.eval_batch_size, rt.device, cfg.train.limit_eval, cfg.train.workers
    ):
        x, y = prepare(batch, data.spec)
        logits.append(clip_average(model, x).cpu())
        labels.append(y.cpu())
    return torch.cat(logits), torch.cat(labels)


def metrics(logp: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict:
    m = classes.metrics(logp, labels, num_classes)
    m["top1"] = m["acc"]
    if "top5" not in m:
        m["top5"] = 1.0  # five or fewer classes: the right one is always among the top five
    return m


def read_clips(path: str, spec: DataSpec) -> torch.Tensor:
    """A video file or frame folder -> uint8 clips (K, C, T, S, S): `eval_clips` clips spread over the video."""
    from deeprecipe.data.video import clip_indices, eval_starts, probe, read_frames

    T, stride, K = spec.extra.get("frames", 16), spec.extra.get("stride", 1), max(1, spec.extra.get("eval_clips", 1))
    n, size = probe(path), spec.image_size[0]
    idx = [j for s in eval_starts(n, (T - 1) * stride + 1, K) for j in clip_indices(s, T, stride, max(n, 1))]
    x = read_frames(path, idx, spec.in_channels, size)  # (C, K*T, S, S)
    return x.view(spec.in_channels, K, T, size, size).transpose(0, 1).contiguous()


@torch.no_grad()
def classify_clips(model: nn.Module, spec: DataSpec, rt: Runtime, clips: list[torch.Tensor]) -> list[torch.Tensor]:
    """Clips of each video (K, C, T, S, S), uint8 -> class probabilities, averaged over each video's clips."""
    x, _ = prepare((torch.stack(clips).to(rt.device), None), spec)  # (B, K, C, T, S, S)
    with rt.autocast():
        return list(clip_average(model, x).exp().cpu())


VIDEO_TYPES = {
    "video/mp4",
    "video/webm",
    "video/x-msvideo",
    "video/avi",
    "video/quicktime",
    "video/x-matroska",
    "video/mpeg",
    "image/gif",
    "application/octet-stream",
}  # PyAV decides; octet-stream is what many clients send


class Video(Family):
    """Video classification (see the module docstring)."""

    prepare = staticmethod(prepare)

    METRIC = ("top1", "max")

    def show_batch(self, batch, spec: DataSpec) -> tuple[torch.Tensor, list[str]]:
        """Four frames (first to last) of the first clips, de-normalized, captioned by label (deeprecipe check)."""
        x, y = batch[0][:8], batch[1][:8]
        T = x.shape[2]
        frames = x[:, :, torch.linspace(0, T - 1, min(4, T)).round().long()]  # (N, C, 4, H, W)
        n, k = frames.shape[0], frames.shape[2]
        imgs = denormalize(frames.transpose(1, 2).flatten(0, 1), spec)  # (N * 4, C, H, W)
        names = spec.class_names
        caps = [f"{names[int(v)]} t{j}" if 0 <= int(v) < len(names) else f"?{int(v)}" for v in y[:n] for j in range(k)]
        return imgs, caps

    def loss(self, model: nn.Module, batch, cfg: Config, part: str):
        """Cross-entropy of clips (B, C, T, H, W); of an evaluation batch (B, K, C, T, H, W), that of the videos'
        clip-averaged predictions (the checks measure held-out losses on evaluation batches)."""
        x, y = batch
        if x.ndim == 6:
            return F.nll_loss(clip_average(model, x), y), {}
        with fp32_on_cpu(x):
            logits = model(x)
        return F.cross_entropy(logits.float(), y, label_smoothing=cfg.optim.label_smoothing), {}

    def per_example_loss(self, model: nn.Module, batch, cfg: Config) -> torch.Tensor:
        """(B,) losses of clips, or of videos (K clips averaged) for an evaluation batch."""
        x, y = batch
        return F.nll_loss(clip_average(model, x), y, reduction="none")

    def evaluate(self, model: nn.Module, data: Data, split: str, cfg: Config, rt: Runtime, final: bool) -> dict:
        return metrics(*predict_split(model, data, split, cfg, rt), data.spec.num_classes)

    def finish(self, model: nn.Module, data: Data, cfg: Config, rt: Runtime, run_dir: Path, results: dict) -> dict:
        """Test top-1/top-5 and the confusion matrix."""
        from deeprecipe.engine import plots

        split = data.final_split()
        model.eval()
        with torch.no_grad(), rt.autocast():
            m = metrics(*predict_split(model, data, split, cfg, rt), data.spec.num_classes)
        plots.confusion(
            m["confusion"],
            data.spec.class_names,
            Path(run_dir) / "plots" / "confusion.png",
            f"{split} confusion matrix (top-1 {m['top1']:.3f})",
        )
        return {f"{split}_{k}": m[k] for k in ("top1", "top5", "loss")}

    def predict(
        self, model: nn.Module, spec: DataSpec, cfg: Config, rt: Runtime, files: list[str], opts: PredictOptions
    ) -> list[dict]:
        """Video files (or frame folders) -> top-k classes, averaging `eval_clips` clips spread over each video."""
        top = opts.top
        return [
            classes.top_labels(f, classify_clips(model, spec, rt, [read_clips(f, spec)])[0], spec.class_names, top)
            for f in files
        ]

    def serve(self, ctx: ServeContext) -> None:
        """POST /classify-video: a video file -> its top labels (clips averaged as in evaluation); the file is
        decoded from a private temporary copy that is removed at once, and concurrent requests run as one batch."""
        import asyncio
        import os
        import tempfile

        from fastapi import File, HTTPException, Query, UploadFile

        from deeprecipe.core import UserError

        spec = ctx.spec
        batch = ctx.batcher("classify-video", lambda clips: classify_clips(ctx.model, spec, ctx.rt, clips))

        def decode(data: bytes) -> torch.Tensor:
            fd, path = tempfile.mkstemp(prefix="deeprecipe-upload-")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                return read_clips(path, spec)
            except UserError as e:  # DataError names the temporary file: keep server paths out of the reply
                raise HTTPException(
                    400, "video: " + str(e).replace(path + ": ", "").replace(path, "the upload")
                ) from None
            finally:
                os.unlink(path)

        @ctx.router.post("/classify-video", summary="Classify a video (MP4, WebM, AVI, ...)")
        async def classify_video(
            video: UploadFile = File(..., description="the video file"),
            top: int = Query(3, ge=1, le=max(1, spec.num_classes), description="labels to return"),
        ):
            data = await ctx.read_upload(video, VIDEO_TYPES, "video")
            probs = await batch(await asyncio.to_thread(decode, data))
            out = classes.top_labels("video", probs, spec.class_names, top)
            return {k: out[k] for k in ("label", "prob", "top")}

        ctx.widget("/classify-video", "image", "Classify a video", field="video", accept="video/*")

    def export_example(self, model: nn.Module, spec: DataSpec, batch: int) -> dict:
        """Normalized clips (B, C, T, H, W) in, class logits out."""
        g = torch.Generator().manual_seed(batch)
        channels = max(spec.in_channels, len(spec.mean))  # a net on RGB weights sees gray clips as RGB
        x = torch.randn(batch, channels, int(spec.extra["frames"]), *spec.image_size, generator=g)
        return {"inputs": {"clip": x}, "outputs": ["logits"]}
