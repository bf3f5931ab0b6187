"""What every check is handed (`Ctx`) and what it returns (`Verdict`).

A check is a plain function `check(ctx) -> Verdict`. The context builds the data once, builds fresh models
from the recipe (seeded, so two builds are equal), and gives batches exactly as the training loop would
(`family.prepare` with the loop's per-step generator). Checks run in fp32 so that exact properties hold
(two seeded runs agree bitwise on CPU; the gradient across examples is exactly zero). What a family adapts
(checks that do not apply, its own checks, the work of the short runs, the closed-form loss at init, the
per-example loss, the net's input, pictures of a batch) are hooks of the contract, deeprecipe/family.py.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from deeprecipe.config import Config
from deeprecipe.core import DataSpec
from deeprecipe.data.core import Data, Draws, StreamSplit, TensorSplit, step_indices
from deeprecipe.engine import optim
from deeprecipe.engine.device import setup, step_generator
from deeprecipe.engine.loop import make_parts, place, train_step
from deeprecipe.family import Family
from deeprecipe.models.head import classifier
from deeprecipe.runtime import Runtime

# the work of the short runs (shared run length and batch, the tiny batch to memorize and its step budget);
# a family's CHECK_DEFAULTS overrides some, the caller's arguments (--steps, --batch, ...) override both
DEFAULTS = {"steps": 50, "batch_size": 32, "overfit_examples": 8, "overfit_steps": 200}


@dataclass
class Verdict:
    name: str
    status: str  # pass | warn | fail | skip
    measured: str = ""
    expected: str = ""
    advice: str = ""  # one line: what it means and what to do
    value: float | None = None  # the measured number (checks.json, tests)
    plots: list[str] = field(default_factory=list)  # paths relative to the run folder
    seconds: float = 0.0


class Ctx:
    """Everything a check needs. Tests build one from parts to plant a bug (make_model, data, family)."""

    def __init__(
        self,
        cfg: Config,
        out: Path,
        family: Family,
        *,
        rt: Runtime | None = None,
        data: Data | None = None,
        make_model: Callable[[DataSpec], nn.Module] | None = None,
        steps: int | None = None,
        batch_size: int | None = None,
        overfit_examples: int | None = None,
        overfit_steps: int | None = None,
        heldout: int = 256,
        max_files: int = 2000,
    ):
        self.cfg = copy.deepcopy(cfg)
        self.cfg.optim.label_smoothing = 0.0  # the closed-form values assume plain cross-entropy
        self.family = family
        self.rt = rt or setup(cfg.train.device, "fp32")
        self.out = Path(out)
        self._data, self._make_model = data, make_model
        # the amount of work: given > the family's CHECK_DEFAULTS (a sequence costs more per example) > DEFAULTS
        asked = dict(steps=steps, batch_size=batch_size, overfit_examples=overfit_examples, overfit_steps=overfit_steps)
        work = {**DEFAULTS, **family.CHECK_DEFAULTS}
        work.update({k: v for k, v in asked.items() if v is not None})
        self.steps, self.batch_size = work["steps"], min(work["batch_size"], cfg.train.batch_size)
        self.overfit_examples, self.overfit_steps = work["overfit_examples"], work["overfit_steps"]
        self.heldout, self.max_files = heldout, max_files
        self.memo: dict[str, Any] = {}
        self.debug = False  # a check that raises re-raises (deeprecipe check --debug)

    # ------------------------------------------------------------------ data and models
    @property
    def data(self) -> Data:
        if self._data is None:
            self._data = self.cfg.data.build()
            if self._make_model is None and getattr(self.cfg.model, "weights", ""):
                # pretrained weights set the inputs they expect in the spec when their model is built
                # (models/pretrained.py follow_weights), as in the loop: before any batch is made
                self.family.build_model(self.cfg, self._data.spec)
        if not self.memo.get("moved"):
            for name in ("train", "val", "test"):
                s = getattr(self._data, name)
                if isinstance(s, TensorSplit):
                    s.to(self.rt.device)
            self.memo["moved"] = True
        return self._data

    @property
    def spec(self) -> DataSpec:
        return self.data.spec

    def model(self) -> nn.Module:
        """A fresh model, seeded by train.seed: two calls give the same weights (unless the model is buggy)."""
        torch.manual_seed(self.cfg.train.seed)
        m = (
            self._make_model(self.spec)
            if self._make_model is not None
            else self.family.build_model(self.cfg, self.spec)
        )
        return place(m, self.cfg, self.rt)

    def raw(self, split, idx: torch.Tensor) -> tuple:
        return tuple(t.to(self.rt.device) for t in split.take(idx))

    def train_batch(self, step: int, size: int | None = None, augment: bool = True):
        """The prepared batch of training step `step`, as the loop makes it (same indices, same augmentation)."""
        split, n, seed = self.data.train, size or self.batch_size, self.cfg.train.seed
        if hasattr(split, "step_batch"):  # a split that draws its own batches (text windows, sentence pairs)
            raw = tuple(t.to(self.rt.device) for t in split.step_batch(seed, step, min(n, len(split))))
        else:
            raw = self.raw(split, step_indices(len(split), seed, step, min(n, len(split))))
        draws = Draws(step_generator(self.rt.device, seed, step)) if augment else None
        return self.family.prepare(raw, self.spec, draws)

    def heldout_batch(self, n: int | None = None):
        """The first n examples of val (else test, else train), prepared for evaluation."""
        d = self.data
        split = d.val if d.val is not None and len(d.val) else d.test if d.test is not None and len(d.test) else d.train
        n = min(n or self.heldout, len(split))
        return self.family.prepare(self.raw(split, torch.arange(n)), self.spec, None)

    # ------------------------------------------------------------------ the family's hooks, bound to this run
    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        return self.family.loss(model, batch, self.cfg, "model")[0]

    def get_input(self, batch) -> torch.Tensor:
        return self.family.batch_input(batch)

    def put_input(self, batch, x: torch.Tensor):
        return self.family.replace_input(batch, x)

    def blank(self, batch):
        """The batch with its input zeroed (the baseline; integer ids become token 0 everywhere)."""
        return self.put_input(batch, torch.zeros_like(self.get_input(batch)))

    def per_example_loss(self, model: nn.Module, batch) -> torch.Tensor:
        return self.family.per_example_loss(model, batch, self.cfg)

    def expected_init_loss(self) -> tuple[float, str] | None:
        return self.family.expected_init_loss(self.spec, self.cfg)

    @property
    def causal(self) -> bool:
        return self.family.CAUSAL

    def plot_path(self, name: str) -> Path:
        p = self.out / "plots" / name
        p.parent.mkdir(parents=True, exist_ok=True)
        return p


def labels_of(split) -> torch.Tensor | None:
    """All labels of a split without decoding its inputs: the last tensor of a TensorSplit when it is integer,
    or what a streamed split's dataset says (StreamSplit.labels: image files, video clips). None when the
    split has no such labels."""
    if split is None:
        return None
    if isinstance(split, TensorSplit):
        y = split.tensors[-1]
        if len(split.tensors) > 1 and not y.is_floating_point():
            return y.cpu().long()
        return None
    if isinstance(split, StreamSplit):
        return split.labels()
    return None


def output_layer(model: nn.Module, num_classes: int) -> nn.Module | None:
    """The layer that makes the logits, as the model says (`get_classifier()`, timm's API: models/head.py), when
    it has a bias per class; None for a model without a classifier (a detector, a language model)."""
    head = classifier(model)
    bias = getattr(head, "bias", None)
    return head if isinstance(bias, torch.Tensor) and bias.shape == (num_classes,) else None


def init_head_from_priors(model: nn.Module, priors: torch.Tensor) -> bool:
    """The fix the init_prior check offers: set the logits' bias to log(priors), so the net predicts the
    label frequencies at step 0 instead of spending its first steps learning them. False: no head found."""
    head = output_layer(model, len(priors))
    if head is None:
        return False
    with torch.no_grad():
        logp = priors.clamp_min(1e-8).log().to(head.bias)
        head.bias.copy_(logp - logp.mean())
    return True


# ---------------------------------------------------------------------------------------------- short runs


@dataclass
class Fit:
    losses: list[float]
    got_grad: dict[str, bool]  # parameter name -> received a nonzero gradient at some step
    frozen: list[str]  # parameters with requires_grad=False


def fit(
    ctx: Ctx,
    model: nn.Module,
    steps: int,
    batch: Callable[[int], Any],
    *,
    lr: float | None = None,
    transform: Callable | None = None,
    watch: Callable[[int, nn.Module], None] | None = None,
    watch_every: int = 5,
    weight_decay: float | None = None,
    until: float = -1.0,
) -> Fit:
    """A short training run through the loop's own step (engine.loop.train_step: the family's parts and
    optimizers, clipping) at the recipe's peak lr, held constant after the recipe's warmup (as a fraction of
    these steps). `watch(step, model)` sees the model every few steps;
    the run stops early once the loss is below `until`."""
    # zeroed inputs and vanishing gradients make denormal floats, many times slower on CPUs: flush them
    flushed = torch.set_flush_denormal(True)
    try:
        return _fit(ctx, model, steps, batch, lr, transform, watch, watch_every, weight_decay, until)
    finally:
        if flushed:
            torch.set_flush_denormal(False)


def _fit(ctx, model, steps, batch, lr, transform, watch, watch_every, weight_decay, until) -> Fit:
    cfg = copy.deepcopy(ctx.cfg)
    if weight_decay is not None:
        cfg.optim.weight_decay = weight_decay
    parts = make_parts(ctx.family, model, cfg, ctx.rt)  # the loop's optimizers, one per part
    lr = cfg.optim.lr if lr is None else lr
    warm = int(cfg.optim.warmup * steps) if cfg.optim.warmup < 1 else min(int(cfg.optim.warmup), steps // 4)
    named = [(n, p) for n, p in model.named_parameters()]
    got = {n: False for n, p in named if p.requires_grad}

    def seen(n):  # the gradient as backward makes it (the step applies and clears it)
        def hook(grad):
            got[n] = got[n] or bool(grad.ne(0).any())

        return hook

    hooks = [p.register_hook(seen(n)) for n, p in named if p.requires_grad]
    losses: list[float] = []
    model.train()
    try:
        for s in range(steps):
            for part in parts:
                optim.set_lr(part.opt, lr * min(1.0, (s + 1) / warm) if warm else lr)
            b = batch(s)
            if transform is not None:
                b = transform(b)
            if watch is not None and s % watch_every == 0:
                watch(s, model)
                model.train()
            r = train_step(ctx.family, model, parts, [b], cfg, ctx.rt)  # the loop's own step
            losses += [float(v) for v in r.losses.values()]  # a GAN: d, g, d, g, ...
            if not math.isfinite(losses[-1]) or losses[-1] < until:
                break
    finally:
        for h in hooks:
            h.remove()
    if watch is not None:
        watch(steps, model)
    return Fit(losses, got, [n for n, p in named if not p.requires_grad])


def real_run(ctx: Ctx) -> tuple[Fit, dict]:
    """The shared short run on real inputs (used by baseline, loss_down, dynamics, grad_flow), with the
    per-example losses of a fixed held-out batch recorded along the way (prediction dynamics)."""
    if "real" not in ctx.memo:
        fixed = ctx.heldout_batch(32)
        dyn: dict[int, list[float]] = {}

        def watch(step, model):
            with batch_stats_eval(model):
                per = ctx.per_example_loss(model, fixed)
            dyn[step] = (per.flatten(1).mean(1) if per.ndim > 1 else per).cpu().tolist()

        model = ctx.model()
        f = fit(ctx, model, ctx.steps, ctx.train_batch, watch=watch, watch_every=max(1, ctx.steps // 10))
        ctx.memo["real"] = (f, dyn, model)
    f, dyn, _ = ctx.memo["real"]
    return f, dyn


@contextlib.contextmanager
def batch_stats_eval(model: nn.Module):
    """Evaluation (dropout off) with norms on the batch's statistics, their running statistics left as they
    are: after a few dozen steps the running statistics of BatchNorm lag far behind the weights, and an
    eval-mode measurement would judge the lag, not the net."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in norms]
    model.eval()
    for m in norms:
        m.train()
        m.momentum = 0.0  # running = (1 - 0) * running + 0 * batch: unchanged
    try:
        with torch.no_grad():
            yield model
    finally:
        for m, mom in zip(norms, saved):
            m.momentum = mom
        model.train()


def eval_loss(ctx: Ctx, model: nn.Module, batch) -> float:
    with batch_stats_eval(model):
        return float(ctx.loss(model, batch))
