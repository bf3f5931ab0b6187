"""The family contract: every hook a family may provide, with its signature, its meaning and its default.

A family (image classification, language modelling, a GAN, ...) is one package under deeprecipe/families/ with a
subclass of `Family`, registered by one line in deeprecipe/families/__init__.py. The engine, the checks, export
and serve call hooks only through this class: a hook a family does not override runs the default written here.
Hooks take typed values and return values; they never read argparse objects and never print (the CLI prints;
a note for the user is a warnings.warn, which the CLI shows as "note: ..."). The hooks, in the order a run meets
them: training (check_config, build_model, parts, prepare, step, loss, evaluate, snapshot, finish, nonfinite),
use (predict, explain, sample, export_example, serve), and the recipe's checks (CHECKS_SKIP, EXTRA_CHECKS,
CHECK_DEFAULTS, CAUSAL, IGNORE_INDEX, expected_init_loss, per_example_loss, batch_input, replace_input, show_batch,
saliency_score).

The values hooks receive are typed here too: `rt` is a `deeprecipe.runtime.Runtime` (device, autocast dtype, rank),
`update` an `Update` and `ctx` a `ServeContext` (protocols below, implemented by engine/loop.py and
serve/server.py, which sit above this file).

`tests/test_family.py` checks every registered family against this class: the hook names it defines exist
here, their signatures match, and METRIC is set.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Awaitable, Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F

from deeprecipe.config import Config
from deeprecipe.core import DataSpec, UserError
from deeprecipe.data.core import Data, Draws
from deeprecipe.runtime import Runtime


@dataclass
class PredictOptions:
    """`deeprecipe predict RUN FILES`: what a family's predict hook may use."""

    top: int = 3  # labels to return (classifiers)
    out: Path | None = None  # folder for output files (segmentation masks, ...)


@dataclass
class ExplainOptions:
    """`deeprecipe explain RUN FILES`: what a family's explain hook may use."""

    method: str = ""  # "ig" (Integrated Gradients) | "gradcam" | "occlusion" | "attention"; "": the family's first
    target: int | None = None  # class index to explain; None: the predicted class (detectors: the N-th detection)
    out: Path | None = None  # folder for the overlays (default: next to each input file)
    sanity: bool = False  # also run the parameter-randomisation sanity check (engine/explain.py sanity)


@dataclass
class SampleOptions:
    """`deeprecipe sample RUN`: what a family's sample hook may use."""

    prompt: str = ""  # text to continue (language models)
    max_tokens: int = 500
    temperature: float = 0.8
    top_k: int = 0
    top_p: float = 1.0
    n: int = 64  # images (GANs)
    seed: int = 0
    out: Path | None = None  # output folder (images), or an image file (s.png): the grid alone
    run_dir: Path | None = None  # the run sampled from (default output place)


class Update(Protocol):
    """What a family's step hook drives: one optimizer step of the parts (Family.parts) over the micro-batches of a
    training step (manual optimization). engine/loop.py Update is the one implementation; the checks' short runs
    use it too."""

    names: list[str]  # the parts, in update order

    def micro(self, k: int) -> AbstractContextManager:
        """Around the forward and backward of micro-batch k (under DDP, gradients are all-reduced after the last)."""

    def autocast(self) -> AbstractContextManager:
        """The run's mixed precision (Runtime.autocast)."""

    def frozen(self, *names: str) -> AbstractContextManager:
        """The named parts get no gradient from what is computed inside."""

    def backward(self, part: str, loss: torch.Tensor, logs: dict | None = None) -> None:
        """Backward of one micro-batch's loss for `part` (scaled for accumulation); logs: name -> 0-d tensor."""

    def step(self, part: str) -> None:
        """Clip the part's gradients, check them for NaN/inf and apply its optimizer."""


class ServeContext(Protocol):
    """What a family's serve(ctx) hook gets (serve/server.py ServeContext is the one implementation): the run's
    model and what it was built from, and helpers that add endpoints to the app."""

    model: nn.Module
    spec: DataSpec
    cfg: Config
    rt: Runtime
    router: Any  # fastapi.APIRouter: routes on it require the token
    lock: threading.Lock  # one model call at a time

    def batcher(self, name: str, fn: Callable[[list], list], max_batch: int | None = None) -> Callable:
        """An awaitable `batch(item)`: concurrent requests' items go through `fn` together, under the lock."""

    def admit(self, path: str) -> Callable[[], None]:
        """Admit a whole-endpoint request (503 past the queue limit); returns its release."""

    def locked(self, fn: Callable[..., Any], *args: Any, bad: int | None = None) -> Awaitable[Any]:
        """fn(*args) in a worker thread under the lock: an unbatched endpoint's model call (a UserError of fn is
        answered with status `bad` when given)."""

    def widget(self, path: str, kind: str, title: str, **params: Any) -> None:
        """Show the endpoint on the server's page."""

    def read_upload(self, upload: Any, types: set[str], what: str) -> Awaitable[bytes]:
        """An uploaded file's bytes, its content type one of `types` (415 and 400 otherwise)."""

    def read_image(
        self, upload: Any, channels: int | None = None, size: tuple[int, int] | None = None, max_side: int = 0
    ) -> Awaitable[torch.Tensor]:
        """An uploaded image as uint8 (C, H, W), made as the training images were (or resized to `size`)."""

    def text_generation(self, path: str, generate: Callable[..., Iterator[str]], title: str = "Generate text"):
        """POST a prompt -> the text streamed as `generate` makes it."""

    def translation(self, path: str, translate: Callable[[list[str]], list[str]], title: str = "Translate"):
        """POST a text -> its translation, concurrent requests batched."""

    def image_sampler(self, path: str, sample: Callable[[int, int], torch.Tensor], title: str = "Sample images"):
        """POST {n, seed} -> sampled images as PNGs."""


class Family:
    """The hooks of a family, each a documented default. Subclasses override what their family needs."""

    name: str = ""  # the registry name (cfg.task), set by the registry
    METRIC: tuple[str, str] = ("", "max")  # (name in evaluate()'s dict, "max" | "min"); required
    TTA: tuple[str, ...] = ("none",)  # the train.tta modes the family's inference honours

    # ------------------------------------------------------------------------------------------ training
    def check_config(self, cfg: Config) -> None:
        """Raise a ConfigError for any config field this family cannot honour (never ignore one silently)."""

    def build_model(self, cfg: Config, spec: DataSpec) -> nn.Module:
        """The model of the recipe for this data: a plain nn.Module on the CPU (the engine places and wraps it)."""
        return cfg.model.build(spec)

    def parts(self, model: nn.Module, cfg: Config) -> dict[str, tuple[nn.Module, float]]:
        """The networks of one training step, in the order they are updated: name -> (module, lr multiplier).

        Each part gets its own AdamW optimizer (and gradient scaler), driven by the step hook. A GAN returns
        {"d": discriminator, "g": generator}. Default: one part."""
        return {"model": (model, 1.0)}

    def step(self, model: nn.Module, batches: list, cfg: Config, update: Update) -> None:
        """One optimizer step over the prepared micro-batches of a training step, driven through `update`
        (Update above: backward(part, loss, logs), step(part), micro(k), autocast(), frozen(*parts)).
        Default: each part in turn, the others frozen, the loss hook on every micro-batch, then its update. A family
        overrides it when its parts share work (a GAN's discriminator and generator turns share G's images)."""
        for part in update.names:
            with update.frozen(*(p for p in update.names if p != part)):
                for k, batch in enumerate(batches):
                    with update.micro(k):
                        with update.autocast():
                            loss, logs = self.loss(model, batch, cfg, part)
                        update.backward(part, loss, logs)
            update.step(part)

    def prepare(self, batch: tuple, spec: DataSpec, draws: Draws | None) -> tuple:
        """A raw batch (on the device) -> the batch exactly as it enters the net. `draws` gives per-example random
        numbers for augmentation, independent of accumulation and data-parallel splits; None means evaluation."""
        return batch

    def loss(self, model: nn.Module, batch: tuple, cfg: Config, part: str) -> tuple[torch.Tensor, dict]:
        """(scalar loss, logs: name -> 0-d tensor, averaged over the log interval) of a prepared micro-batch, for
        `part` (see parts). The checks call it with part "model"."""
        raise NotImplementedError

    def evaluate(self, model: nn.Module, data: Data, split: str, cfg: Config, rt: Runtime, final: bool) -> dict:
        """Metrics over a whole split (the model in eval mode, no grad, autocast on). `final` is the last evaluation
        of a run or `deeprecipe eval`: a family may measure more thoroughly then (a GAN scores more samples)."""
        raise NotImplementedError

    def snapshot(self, model: nn.Module, data: Data, cfg: Config, rt: Runtime) -> dict[str, torch.Tensor]:
        """Pictures of the model at an evaluation: name -> image (C, H, W) in [0, 1]; the engine writes them to
        plots/<name>/step-<step>.png and TensorBoard. Default: none."""
        return {}

    def finish(self, model: nn.Module, data: Data, cfg: Config, rt: Runtime, run_dir: Path, results: dict) -> dict:
        """Final metrics and plots (into run_dir/plots) of a finished run. `model` holds the run's model, the weights
        every verb loads (engine/checkpoint.py model_weights: the best evaluated, else the last); `results` is the
        evaluation of those weights."""
        return {}

    def nonfinite(self, cfg: Config, run_dir: Path, step: int, losses: dict[str, float]) -> str | None:
        """A run stops at `step` on a NaN/inf loss or gradient (losses: part -> its loss at that step): the error
        to show (None: the engine's own), after leaving any notes of the family's in run_dir. Default: None."""
        return None

    # ------------------------------------------------------------------------------------------ use
    def predict(
        self, model: nn.Module, spec: DataSpec, cfg: Config, rt: Runtime, files: list[str], opts: PredictOptions
    ) -> list[dict]:
        """`deeprecipe predict`: one result per file; a result's "text" is the line the CLI prints."""
        raise UserError(f"task '{self.name}' has no predict; see its own verbs (deeprecipe --help)")

    def explain(
        self, model: nn.Module, spec: DataSpec, cfg: Config, rt: Runtime, files: list[str], opts: ExplainOptions
    ) -> list[dict]:
        """`deeprecipe explain`: one result per file: {"file", "label" (explained class), "target" (its index),
        "method", "score" (its probability), "out" (the overlay written, if any), "text" (the line the CLI
        prints)}, and with opts.sanity "sanity" (engine/explain.py sanity's verdict) and "sanity_plot". Runs with
        gradients enabled on a copy of the model (engine/explain.py); the model itself is left unchanged."""
        raise UserError(
            f"task '{self.name}' has no explain (it works for classifiers, segmenters, detectors and language models)"
        )

    def sample(self, model: nn.Module, spec: DataSpec, cfg: Config, rt: Runtime, opts: SampleOptions) -> Iterator[str]:
        """`deeprecipe sample`: text pieces for the CLI to show as they come."""
        raise UserError(f"task '{self.name}' does not generate samples (sample works for language models and GANs)")

    def export_example(self, model: nn.Module, spec: DataSpec, batch: int) -> dict:
        """What `deeprecipe export` feeds the net: {"inputs": {name: tensor}, "outputs": [names], "module": the
        nn.Module to export (default the model), "dynamic": {input: {axis: name}} (default axis 0 "batch")}.
        Default: an image batch (B, C, H, W) as prepare makes it, else token ids (B, T)."""
        g = torch.Generator().manual_seed(batch)
        if spec.image_size and spec.image_size[0] and spec.in_channels:
            x = torch.randn(batch, spec.in_channels, *spec.image_size, generator=g)  # (B, C, H, W), normalized
            return {"inputs": {"image": x}, "outputs": ["logits"]}
        if spec.vocab_size:
            t = int(spec.extra.get("block_size", 16) or 16)
            ids = torch.randint(0, spec.vocab_size, (batch, min(t, 16)), generator=g)  # (B, T)
            return {"inputs": {"tokens": ids}, "outputs": ["logits"], "dynamic": {"tokens": {0: "batch", 1: "time"}}}
        raise UserError(
            f"task '{self.name}' has no export_example and its spec has neither an image size nor a vocabulary"
        )

    def serve(self, ctx: ServeContext) -> None:
        """Add the family's endpoints through `ctx` (ServeContext above: ctx.router, ctx.batcher, ctx.widget, ...)."""
        raise UserError(f"task '{self.name}' has no serve hook yet (see docs/architecture.md)")

    # ------------------------------------------------------------------------------------------ checks
    CHECKS_SKIP: dict[str, str] = {}  # built-in checks that do not apply: name -> why
    EXTRA_CHECKS: dict[str, Callable] = {}  # the family's own checks fn(ctx) -> Verdict; a built-in name replaces it
    CHECK_DEFAULTS: dict[str, int] = {}  # the short runs' work: steps, batch_size, overfit_examples, overfit_steps
    CAUSAL: bool = False  # the dependency check also proves that position t ignores inputs after t
    IGNORE_INDEX: int | None = None  # a label value that means "no label" (not out of range, not in losses)

    def expected_init_loss(self, spec: DataSpec, cfg: Config) -> tuple[float, str] | None:
        """(closed-form loss of the untrained net, where it comes from); None: not known."""
        if spec.num_classes:
            return math.log(spec.num_classes), f"ln {spec.num_classes} classes"
        if spec.vocab_size:
            return math.log(spec.vocab_size), f"ln {spec.vocab_size} vocab"
        return None

    def per_example_loss(self, model: nn.Module, batch: tuple, cfg: Config) -> torch.Tensor:
        """(B,) losses, or (B, T) for sequences. Default: cross-entropy of model(input) (first output when it
        returns a tuple) against batch[-1], class dim last or dim 1 (dense: mean over the labelled pixels)."""
        out = model(self.batch_input(batch))
        out = out[0] if isinstance(out, (tuple, list)) else out
        return per_example_ce(out.float(), batch[-1], -100 if self.IGNORE_INDEX is None else self.IGNORE_INDEX)

    def batch_input(self, batch: tuple) -> torch.Tensor:
        """The net's input in a prepared batch (the checks differentiate through it and blank it)."""
        return batch[0]

    def replace_input(self, batch: tuple, x: torch.Tensor) -> tuple:
        return (x, *batch[1:])

    def show_batch(self, batch: tuple, spec: DataSpec) -> tuple[torch.Tensor, list[str]] | str | None:
        """A prepared batch for the eye: (images in [0, 1], captions), a text, or None for no picture."""
        return None

    def saliency_score(self, model: nn.Module, batch: tuple, cfg: Config) -> torch.Tensor | None:
        """(B,) the score of each example's label whose Grad-CAM the saliency check judges (a classifier's logit
        of the true class, a segmenter's mean true-class logit over its labelled pixels: label_score); None: the
        check does not apply to this family (the default)."""
        return None


def unwrapped(model: nn.Module) -> nn.Module:
    """The plain model under DDP / torch.compile wrappers (for its own methods and attributes)."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model


def label_score(logits: torch.Tensor, y: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """The logit of each example's label: (B, C) vs (B,) -> (B,); (B, C, H, W) vs (B, H, W) -> (B,) (the mean
    of the true class's logit over the pixels that are not ignore_index)."""
    y = y.long()
    if logits.ndim == 2 and y.shape == logits.shape[:1]:
        return logits.gather(1, y[:, None])[:, 0]
    if logits.ndim == 4 and logits.shape[0] == y.shape[0] and logits.shape[2:] == y.shape[1:]:
        keep = y != ignore_index
        per = logits.gather(1, y.clamp(0, logits.shape[1] - 1)[:, None])[:, 0] * keep
        return per.flatten(1).sum(1) / keep.flatten(1).sum(1).clamp_min(1)
    raise UserError(f"no label score for model output {tuple(logits.shape)} and targets {tuple(y.shape)}")


def per_example_ce(logits: torch.Tensor, y: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Cross-entropy per example: (B, C) vs (B,) -> (B,); (B, T, V) vs (B, T) -> (B, T);
    (B, C, H, W) vs (B, H, W) -> (B,) (mean over the pixels that are not ignore_index)."""
    if y.dtype not in (torch.long, torch.int, torch.int16, torch.uint8):
        raise UserError(
            "the checks' fallback loss needs integer targets in batch[-1]: override per_example_loss in the family"
        )
    y = y.long()
    if logits.shape[:-1] == y.shape:  # class dim last
        return F.cross_entropy(logits.flatten(0, -2), y.flatten(), reduction="none", ignore_index=ignore_index).view(
            y.shape
        )
    if logits.shape[0] == y.shape[0] and logits.shape[2:] == y.shape[1:]:  # class dim 1 (dense prediction)
        per = F.cross_entropy(logits, y, reduction="none", ignore_index=ignore_index).flatten(1)
        return per.sum(1) / (y != ignore_index).flatten(1).sum(1).clamp_min(1)  # mean over labelled pixels
    raise UserError(
        f"the checks cannot match model output {tuple(logits.shape)} with targets {tuple(y.shape)}: "
        "override per_example_loss in the family"
    )
