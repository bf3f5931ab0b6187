"""The one training loop, for every family. Everything a step does is in `train_step`; `train` runs the steps.

The CLI hands in the family (deeprecipe/family.py); the loop never looks one up. A step updates the family's
parts in turn (one part for most families; a GAN's discriminator, then its generator), each with its own optimizer
(AdamW or Muon: optim.name) and gradient scaler: the loss of every micro-batch is computed for that part with the
others frozen, then the part's gradients are clipped, checked for NaN/inf and applied. So accumulation, non-finite
handling, fine-tuning lr multipliers, compile, EMA, evaluation, early stopping, checkpoints, exact resume, metrics
and the report come from this one place for every family.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from tqdm.auto import tqdm  # the widget in a notebook (Jupyter, with ipywidgets), else the terminal bar

from deeprecipe.config import Config, to_dict
from deeprecipe.core import ConfigError, UserError
from deeprecipe.data.core import Data, micro_draws, train_batches
from deeprecipe.engine import checkpoint, finetune, optim
from deeprecipe.engine.atomic import atomic_text, atomic_write
from deeprecipe.engine.clock import Clock
from deeprecipe.engine.device import rng_state, set_rng_state, setup, step_generator
from deeprecipe.engine.run import Run
from deeprecipe.family import Family
from deeprecipe.runtime import Runtime

LONGER = {("train", "steps"), ("train", "minutes")}  # what a resumed run may change (to train longer)
PROGRESS_EVERY = 10.0  # seconds between plain progress lines when stderr is not a terminal (logs, CI, nohup)


class NonFiniteLoss(UserError):
    pass


@dataclass
class Part:
    """One network of a step and what updates it."""

    name: str
    module: nn.Module
    opt: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None


def build(cfg: Config, family: Family, rt: Runtime) -> tuple[Data, nn.Module]:
    """Data (tensor splits moved to the device) and the model (on the device, channels_last for conv nets)."""
    torch.manual_seed(cfg.train.seed)
    data = cfg.data.build()
    for name in ("train", "val", "test"):
        split = getattr(data, name)
        if split is not None:
            split.to(rt.device)
    model = place(family.build_model(cfg, data.spec), cfg, rt)
    return data, model


def place(model: nn.Module, cfg: Config, rt: Runtime) -> nn.Module:
    model = model.to(rt.device)
    if cfg.train.channels_last and any(isinstance(m, nn.Conv2d) for m in model.modules()):
        model = model.to(memory_format=torch.channels_last)
    return model


def make_parts(family: Family, model: nn.Module, cfg: Config, rt: Runtime, lr_scale: dict | None = None) -> list[Part]:
    """The family's parts, each with its optimizer (optim.name) whose groups carry the fine-tuning lr multipliers (by
    the model's own parameter names) times the part's multiplier."""
    names = {id(m): n for n, m in model.named_modules()}
    parts = []
    for name, (module, mult) in family.parts(model, cfg).items():
        prefix = names[id(module)] + "." if names.get(id(module)) else ""
        scale = {k[len(prefix) :]: v for k, v in (lr_scale or {}).items() if k.startswith(prefix)}
        opt, scaler = optim.optimizer(module, cfg.optim, scale, mult), rt.scaler()
        if scaler and getattr(opt, "views", None):  # Muon reads a kernel's gradient at its step, still scaled
            raise ConfigError(
                "optim.name=muon updates convolution kernels, which fp16 loss scaling does not reach: "
                "use train.precision=bf16 or fp32, or optim.name=adamw"
            )
        parts.append(Part(name, module, opt, scaler))
    return parts


@dataclass
class StepResult:
    losses: dict[str, torch.Tensor]  # part -> mean loss over the micro-batches (0-d, on the device)
    logs: dict[str, torch.Tensor]  # the family's logs, averaged over the micro-batches
    norms: dict[str, torch.Tensor]  # part -> gradient norm before clipping
    skipped: list[str]  # parts whose update was dropped (NaN/inf gradient)
    bad: torch.Tensor | None = None  # on_device: 1.0 when some part's update was dropped, on the device


class Update:
    """What a family's step hook drives (manual optimization): `backward(part, loss)` for the loss of each
    micro-batch, then `step(part)`, which clips the part's gradients, checks them for NaN/inf and applies its
    optimizer. It scales by the number of micro-batches (accumulation), uses the part's gradient scaler (fp16),
    and records the losses and logs the loop reports.

    `on_device` (CUDA, fused optimizers, no fp16 scaler): the NaN/inf check stays on the device, with no host
    sync: the fused optimizer skips a non-finite update itself (its found_inf input, as under a gradient
    scaler) and `result.bad` says so; the loop reads it at its next log (see on_device)."""

    def __init__(self, parts: list[Part], net: nn.Module, n: int, cfg: Config, rt: Runtime, on_device=False):
        self.parts, self.names = {p.name: p for p in parts}, [p.name for p in parts]
        self.net, self.n, self.cfg, self.rt, self.on_device = net, n, cfg, rt, on_device
        self.result = StepResult({}, {}, {}, [])

    def micro(self, k: int):
        """Around the forward and backward of micro-batch k: under DDP, gradients are all-reduced only after the
        last one."""
        ddp = isinstance(self.net, nn.parallel.DistributedDataParallel)
        return self.net.no_sync() if ddp and k < self.n - 1 else contextlib.nullcontext()

    def autocast(self):
        return self.rt.autocast()

    @contextlib.contextmanager
    def frozen(self, *names: str):
        """The named parts' parameters get no gradient from what is computed inside (their requires_grad is off)."""
        params = [p for name in names for p in self.parts[name].module.parameters() if p.requires_grad]
        for p in params:
            p.requires_grad_(False)
        try:
            yield
        finally:
            for p in params:
                p.requires_grad_(True)

    def backward(self, part: str, loss: torch.Tensor, logs: dict | None = None) -> None:
        scaler, r = self.parts[part].scaler, self.result
        (scaler.scale(loss / self.n) if scaler else loss / self.n).backward()
        r.losses[part] = r.losses.get(part, 0) + loss.detach().float() / self.n
        for key, v in (logs or {}).items():
            r.logs[key] = r.logs.get(key, 0) + v.detach().float() / self.n

    def step(self, part: str) -> None:
        p = self.parts[part]
        if p.scaler:
            p.scaler.unscale_(p.opt)
        params = [q for q in p.module.parameters() if q.requires_grad]
        norm = nn.utils.clip_grad_norm_(params, self.cfg.optim.clip if self.cfg.optim.clip > 0 else float("inf"))
        if self.on_device:  # the optimizer drops a non-finite update itself: no host sync
            bad = (~torch.isfinite(norm)).float()
            p.opt.found_inf = bad
            p.opt.step()
            r = self.result
            r.bad = bad if r.bad is None else torch.maximum(r.bad, bad)
        elif not torch.isfinite(norm):  # a NaN/inf loss or gradient: never let it reach the weights
            self.result.skipped.append(part)
            if p.scaler:  # an fp16 overflow with a finite loss is routine: the scaler lowers its scale
                p.scaler.update()
        elif p.scaler:
            p.scaler.step(p.opt)
            p.scaler.update()
        else:
            p.opt.step()
        p.opt.zero_grad(set_to_none=True)
        self.result.norms[part] = norm


def train_step(
    family: Family, net: nn.Module, parts: list[Part], batches: list, cfg: Config, rt: Runtime, on_device=False
) -> StepResult:
    """One optimizer step of every part over the micro-batches of a step (their mean gradient: accumulation),
    as the family's step hook drives it."""
    update = Update(parts, net, len(batches), cfg, rt, on_device)
    family.step(net, batches, cfg, update)
    return update.result


def on_device(parts: list[Part], rt: Runtime) -> bool:
    """Whether the step can keep its non-finite check on the device: CUDA, every optimizer fused, no scaler."""
    return rt.device.type == "cuda" and all(p.scaler is None and p.opt.defaults.get("fused") for p in parts)


def stepper(family: Family, net: nn.Module, parts: list[Part], cfg: Config, rt: Runtime) -> Callable:
    """The loop's step function: `batches -> StepResult`; on CUDA replayed from a CUDA graph where it can be
    (engine/graph.py, train.cuda_graph)."""
    device_check = on_device(parts, rt)

    def step(batches: list) -> StepResult:
        return train_step(family, net, parts, batches, cfg, rt, device_check)

    # torch.compile's dropout draws its seeds outside a capture's control: compiled steps are not captured
    if not (device_check and cfg.train.cuda_graph and rt.world == 1 and not cfg.train.compile):
        return step
    from deeprecipe.engine.graph import GraphedStep

    def reset() -> None:
        for part in parts:
            part.opt.zero_grad(set_to_none=True)

    return GraphedStep(step, reset)


class DeviceHealth:
    """Which steps since the last read dropped their update, recorded on the device (one small copy per step, no
    host sync); `read()` is the one sync, at a log, evaluation or checkpoint step (at most `size` steps apart)."""

    def __init__(self, device: torch.device, size: int):
        self.flags = torch.zeros(size, device=device)
        self.steps: list[int] = []

    def add(self, bad: torch.Tensor, step: int) -> None:
        self.flags[len(self.steps)].copy_(bad)
        self.steps.append(step)

    def read(self) -> list[int]:
        """The steps since the last read whose update was dropped."""
        flags = self.flags[: len(self.steps)].tolist()
        bad = [s for s, f in zip(self.steps, flags) if f]
        self.steps = []
        return bad


def check_resume(run_dir: Path, cfg: Config) -> None:
    """A resumed run must be the same run: only train.steps and train.minutes may change (to train longer)."""
    import yaml

    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    now, defaults = to_dict(cfg), to_dict(Config())  # a key added to the code since the run began: its default
    diffs = []
    for section, values in now.items():
        old = saved.get(section)
        if isinstance(values, dict):
            for k, v in values.items():
                ov = (old or {}).get(k, (defaults.get(section) or {}).get(k))
                if (section, k) not in LONGER and _norm(ov) != _norm(v):
                    diffs.append(f"{section}.{k}: {ov!r} -> {v!r}")
        elif _norm(old) != _norm(values):
            diffs.append(f"{section}: {old!r} -> {values!r}")
    if diffs:
        raise ConfigError(
            f"cannot resume {run_dir} with a changed config ({'; '.join(diffs[:3])}): "
            "drop those --set options, or start a new run with --init-from"
        )


def _norm(v):
    return [_norm(x) for x in v] if isinstance(v, (list, tuple)) else v


@dataclass
class Best:
    """The evaluation state a checkpoint keeps: the best value of the main metric and its step, the evaluations
    since it last improved (early stopping); and in memory the latest evaluation and the best one's metrics."""

    value: float | None = None
    step: int | None = None
    bad_evals: int = 0
    results: dict = dataclasses.field(default_factory=dict)
    best_results: dict | None = None


class Meter:
    """What the next log line averages: each loss and log summed on the device over the steps since the last log
    (under train.nonfinite=skip with the check on the device, a dropped step masked out), examples and time."""

    def __init__(self, masked: bool):
        self.masked = masked
        self.restart()

    def restart(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.n, self.seen, self.t0 = 0, 0, time.perf_counter()

    def add(self, r: StepResult, single: bool) -> None:
        # under nonfinite=stop a dropped step ends the run at the next read: nothing to mask
        good = 1 - r.bad if self.masked and r.bad is not None else 1
        named = [("loss" if single else f"{name}_loss", v) for name, v in r.losses.items()] + list(r.logs.items())
        for key, v in named:
            self.sums[key] = self.sums.get(key, 0) + (torch.where(good > 0, v, 0.0) if self.masked else v)
        self.n += good

    def drop(self) -> None:
        """Forget the sums (a dropped step on the host); the examples and the time still count."""
        self.sums, self.n = {}, 0


def train(
    cfg: Config,
    family: Family,
    run_dir: Path,
    resume: bool = False,
    command: str = "",
    monitor: Callable[[int, dict], bool] | None = None,
) -> dict[str, float]:
    """Train `cfg` into `run_dir` (a new run, or continue it from its last checkpoint with `resume`); the final
    metrics. `monitor(step, results)` is called after every evaluation with the evaluated metrics (a tuner reports
    them); when it returns True before the last step, the run stops there like an early stop, with status "pruned".
    """
    family.check_config(cfg)
    if cfg.train.tta not in family.TTA:
        raise ConfigError(
            f"train.tta={cfg.train.tta}: task '{family.name}' has no test-time augmentation "
            f"(image classification has 'flip'); remove the key"
        )
    T, rt = cfg.train, setup(cfg.train.device, cfg.train.precision)
    if rt.main and cfg.train.precision == "auto":
        warnings.warn(rt.why, stacklevel=2)  # the CLI's `note:` line: what auto chose on this machine, and why
    micro = micro_batch(cfg, rt)
    data, model = build(cfg, family, rt)
    lr_scale = finetune.apply(model, cfg.finetune, run_dir, resume, rt.main)  # load weights, freeze, lr scales
    parts = make_parts(family, model, cfg, rt, lr_scale)
    if rt.world > 1 and len(parts) > 1:
        raise UserError(f"task '{cfg.task}' updates {len(parts)} networks in turn: run it in one process (no torchrun)")
    ema = optim.ema(model, T.ema)
    start, best, spent = restore(run_dir, cfg, model, parts, ema) if resume else (0, Best(), 0.0)
    run = Run(run_dir, cfg, rt.main, start, command, rt.why)
    if rt.main:  # what predict/export/serve need to rebuild the model without the data
        atomic_text(run_dir / "spec.json", json.dumps(dataclasses.asdict(data.spec)))
    if T.compile:  # in place: parameter names, checkpoints and the parts' modules stay as they are
        for part in parts:
            part.module.compile()
    net = model
    if rt.world > 1:
        ids = [rt.device.index] if rt.device.type == "cuda" else None
        net = nn.parallel.DistributedDataParallel(model, device_ids=ids)
    step_fn, single = stepper(family, net, parts, cfg, rt), len(parts) == 1
    health = DeviceHealth(rt.device, T.log_every) if on_device(parts, rt) else None  # dropped steps, read at logs
    meter = Meter(masked=health is not None and T.nonfinite == "skip")  # a dropped step stays out of the means
    batches = train_batches(
        data.train, T.seed, _micro_steps(start, T.steps, T.accum), micro, rt.device, rt.rank, rt.world, T.workers
    )
    total = None if T.minutes else T.steps  # under a time budget the step count is not known beforehand
    bar = tqdm(total=total, initial=start, disable=None if rt.main else True, dynamic_ncols=True, unit="step")
    clock = Clock(T.minutes, T.steps, start, spent, rt.world, rt.device) if T.minutes else None
    plain = Progress(start, T.steps, T.batch_size, clock) if rt.main and bar.disable else None  # no terminal: lines
    split = "val" if data.val else "train"  # without a val split, evaluations watch the training split (a GAN's FID)
    model.train()
    step, pruned = start, False
    end = start if clock and start and clock.over(start) else T.steps  # a resumed run whose budget was spent
    for step in range(start, end):
        position = clock.position(step) if clock else None
        for part in parts:
            optim.set_lr(part.opt, cfg.optim.lr * optim.lr_factor(cfg.optim, step, T.steps, position), step)
        micro_batches = []
        for k in range(T.accum):
            draws = micro_draws(step_generator(rt.device, T.seed, step), T.batch_size, micro, k, rt.rank, rt.world)
            micro_batches.append(family.prepare(next(batches), data.spec, draws))
            meter.seen += len(micro_batches[-1][0]) * rt.world
        r = step_fn(micro_batches)
        done = step + 1
        if clock:
            clock.tick(done, done % T.log_every == 0)
        last = clock.over(done) if clock else done == T.steps
        if health is not None and r.bad is not None:
            health.add(r.bad, done)
        meter.add(r, single)
        at_eval = bool(T.eval_every and done % T.eval_every == 0) or last
        at_log = done % T.log_every == 0 or last
        sync = at_log or at_eval or done % T.ckpt_every == 0
        nonfinite(family, cfg, rt, run, r, done, health if sync else None, single)
        if r.skipped:
            meter.drop()  # the step still counts: evaluation and checkpoints below happen on schedule
        elif ema is not None:
            ema.update_parameters(model)
        if not r.skipped and at_log:
            log_line(run, bar, plain, meter, r, parts, done, single)
        bar.update(1)
        if plain:
            plain.tick(done)
        stop = False
        if at_eval:
            stop = evaluate_step(family, ema.module if ema else model, data, cfg, rt, run, split, done, best, last)
            if monitor is not None and monitor(done, best.results) and not last:
                stop = pruned = True
            model.train()
            run.status("running", step=done, **_best(split, family.METRIC[0], best.value, best.step))
        if rt.main and (done % T.ckpt_every == 0 or last or stop):
            save_state(run_dir / "checkpoints", done, model, ema, parts, best, clock)
        if clock and last and done < T.steps:
            bar.write(f"time budget spent: {T.minutes:g} min after {done} steps (train.minutes; at most {T.steps})")
            break
        if stop:
            metric = family.METRIC[0]
            if pruned:
                bar.write(
                    f"pruned at step {done}: val {metric} {best.results.get(metric)} (the tuner's pruner stopped it)"
                )
            else:
                bar.write(f"early stop at step {done}: val {metric} did not improve in {T.early_stop} evaluations")
            break
    bar.close()
    if plain and plain.shown < step + 1 and (step + 1 == T.steps or clock):  # trained to the end: the closing line
        plain.tick(step + 1, force=True)
    last = step + 1 if end > start else start
    return end_run(family, ema.module if ema else model, data, cfg, rt, run, split, best, last, pruned)


def micro_batch(cfg: Config, rt: Runtime) -> int:
    """Examples per micro-batch, over all processes (they must split evenly)."""
    micro = cfg.train.batch_size // cfg.train.accum
    if micro % rt.world:
        raise ConfigError(
            f"train.batch_size={cfg.train.batch_size} / train.accum={cfg.train.accum} = {micro} examples per "
            f"micro-batch do not split evenly over {rt.world} processes"
        )
    return micro


def restore(run_dir: Path, cfg: Config, model: nn.Module, parts: list[Part], ema) -> tuple[int, Best, float]:
    """Resume: the same run (check_resume), its last checkpoint's weights, optimizers, EMA and RNG loaded; the step
    to continue from and the evaluation state. A run killed before its first checkpoint starts again from step 0."""
    check_resume(run_dir, cfg)
    folder = checkpoint.latest(run_dir / "checkpoints")
    if folder is None:
        print(f"{run_dir}: no checkpoint yet, training from step 0", file=sys.stderr)
        return 0, Best(), 0.0
    weights, state = checkpoint.load(folder)
    model.load_state_dict(checkpoint.split_prefix(weights, "model."))
    for part in parts:
        part.opt.load_state_dict(state["optimizers"][part.name])
        if part.opt.defaults.get("capturable"):
            optim.device_lr(part.opt)
    if ema is not None:
        ema.module.load_state_dict(checkpoint.split_prefix(weights, "ema."))
        ema.n_averaged.fill_(int(state["ema_n"]))
    set_rng_state(state["rng"])
    best = Best(state.get("best"), state.get("best_step"), int(state.get("bad_evals", 0)))
    return int(state["step"]), best, float(state.get("seconds", 0.0))


def save_state(ckpt_dir: Path, done: int, model: nn.Module, ema, parts: list[Part], best: Best, clock=None) -> None:
    """A checkpoint for exact resume: the weights (and the EMA's), the optimizers, the RNG and the evaluation state
    (and under a time budget the seconds spent)."""
    weights = {f"model.{k}": v for k, v in checkpoint.plain_state(model).items()}
    if ema is not None:
        weights.update({f"ema.{k}": v for k, v in checkpoint.plain_state(ema.module).items()})
    state = {
        "step": done,
        "optimizers": {part.name: part.opt.state_dict() for part in parts},
        "rng": rng_state(),
        "best": best.value,
        "best_step": best.step,
        "bad_evals": best.bad_evals,
        "ema_n": int(ema.n_averaged) if ema is not None else 0,
        "seconds": clock.seconds() if clock is not None else 0.0,
    }
    checkpoint.save(ckpt_dir, done, weights, state)


def nonfinite(
    family: Family,
    cfg: Config,
    rt: Runtime,
    run: Run,
    r: StepResult,
    done: int,
    health: DeviceHealth | None,
    single: bool,
) -> None:
    """The one handler of a NaN/inf loss or gradient at step `done`. Under train.nonfinite=stop the run ends with one
    error (the family's note, a GAN's health, else the engine's; the last good checkpoint kept); under skip the
    dropped steps are logged (skipped_batch). With the check on the device, `health` is given at the steps that read
    it (one host sync); on the host, r.skipped says so at every step (under fp16 a step the gradient scaler skipped
    with a finite loss is no failure)."""
    stop = cfg.train.nonfinite != "skip"

    def fail(step: int, losses: dict[str, float], what: str):
        run.status("failed", step=step, error="non-finite loss")
        said = family.nonfinite(cfg, run.path, step, losses) if rt.main else None
        raise NonFiniteLoss(
            said
            or f"{what}; the last good checkpoint is kept in checkpoints/ (lower optim.lr, check the data, or set "
            "train.nonfinite=skip)"
        )

    dropped = health.read() if health is not None else []
    if dropped and stop:
        what = f"the loss or its gradient became NaN/inf at step {dropped[0]} (the update was not applied)"
        fail(dropped[0], {k: float("nan") for k in r.losses}, what)
    if dropped:
        run.log(done, skipped_batch=len(dropped))
    if r.skipped:
        lost = not all(torch.isfinite(v) for v in r.losses.values())
        if stop and (rt.dtype != torch.float16 or lost):
            shown = ", ".join(f"{'' if single else k + ' '}{float(v):.4g}" for k, v in r.losses.items())
            fail(done, {k: float(v) for k, v in r.losses.items()}, f"loss became {shown} at step {done}")
        run.log(done, skipped_batch=1)


def log_line(run: Run, bar, plain, meter: Meter, r: StepResult, parts: list[Part], done: int, single: bool) -> None:
    """One row of metrics.jsonl (the means since the last log, lr, gradient norms, speed) and the progress bar's."""
    dt = time.perf_counter() - meter.t0
    n = float(meter.n)
    means = {k: float(v) / max(n, 1) for k, v in meter.sums.items()}
    norms = {"grad_norm" if single else f"{k}_grad_norm": float(v) for k, v in r.norms.items()}
    lr = float(parts[0].opt.param_groups[0]["lr"])
    run.log(done, **means, lr=lr, **norms, examples_per_s=meter.seen / dt)
    losses = {k: f"{v:.4f}" for k, v in means.items() if k.endswith("loss")}
    bar.set_postfix(losses | {"ex_s": f"{meter.seen / dt:,.0f}"})
    if plain:
        plain.losses = losses
    meter.restart()


def evaluate_step(
    family: Family,
    shown: nn.Module,
    data: Data,
    cfg: Config,
    rt: Runtime,
    run: Run,
    split: str,
    done: int,
    best: Best,
    last: bool,
) -> bool:
    """An evaluation during training (of the EMA weights when there are some): logged, pictured, and the best
    weights kept in checkpoints/best.safetensors (a tie keeps the later ones); whether early stopping ends the run."""
    metric, mode = family.METRIC
    best.results = results = evaluate(family, shown, data, cfg, rt, split, final=last)
    run.log(done, **{f"val_{k}": v for k, v in results.items() if isinstance(v, (int, float))})
    if rt.main:
        snapshot(family, shown, data, cfg, rt, run, done)
    value = results.get(metric)
    better = value is not None and (best.value is None or (value > best.value if mode == "max" else value < best.value))
    if better or (value is not None and value == best.value):  # a tie keeps the later weights
        best.value, best.step, best.best_results = value, done, results
        if rt.main:
            meta = {"step": str(done), "split": split, "metric": metric, "value": repr(float(value))}
            checkpoint.save_weights(run.path / "checkpoints" / "best.safetensors", checkpoint.plain_state(shown), meta)
    if better:
        best.bad_evals = 0
        return False
    best.bad_evals += 1  # a tie is no improvement for early stopping
    return bool(cfg.train.early_stop) and best.bad_evals >= cfg.train.early_stop


def end_run(
    family: Family,
    shown: nn.Module,
    data: Data,
    cfg: Config,
    rt: Runtime,
    run: Run,
    split: str,
    best: Best,
    last: int,
    pruned: bool,
) -> dict[str, float]:
    """The end of a run: the final report of the model every verb loads (checkpoint.model_weights: best, else last),
    the family's final metrics and plots, status.json and report.html; the final metrics."""
    about, results = None, best.results
    if rt.main:
        weights, about = checkpoint.model_weights(run.path)
        shown.load_state_dict(weights)
        if about.file == "best.safetensors":
            kept = best.best_results is not None and best.step == about.step
            results = best.best_results if kept else _logged(run.path, about.step)
    final = {f"{split}_{k}": v for k, v in results.items() if isinstance(v, (int, float))}
    if rt.main:
        with torch.no_grad():
            final.update(family.finish(shown.eval(), data, cfg, rt, run.path, results) or {})
    metric = family.METRIC[0]
    run.status(
        "pruned" if pruned else "done",
        step=last,
        **_best(split, metric, best.value, best.step),
        weights=about and about.text,
        final=final,
    )
    if rt.main:
        from deeprecipe.engine.report import write_report

        write_report(run.path)
    run.close()  # after the report: a tracker keeps it with the run
    return final


class Progress:
    """A plain line on stderr every PROGRESS_EVERY seconds and after the last step, where tqdm draws no bar:
    step/total (under a time budget the step and the share of the budget), the last logged losses, examples per
    second and the time left."""

    def __init__(self, start: int, total: int, batch: int, clock: Clock | None = None):
        self.start, self.total, self.batch, self.clock = start, total, batch, clock
        self.t0 = self.last = time.perf_counter()
        self.losses: dict[str, str] = {}
        self.shown = start

    def tick(self, done: int, force: bool = False) -> None:
        now = time.perf_counter()
        if now - self.last < PROGRESS_EVERY and not force:
            return
        self.last, self.shown, elapsed, n = now, done, now - self.t0, done - self.start
        left = elapsed / n * (self.total - done) if n else 0.0
        where = f"step {done}/{self.total} ({done / self.total:.0%})"
        if self.clock:
            c = self.clock
            left = max(0.0, min(c.budget - c.seconds(), (self.total - done) * c.per_step()))
            where = f"step {done} ({self.clock.pos:.0%} of {self.clock.budget / 60:g} min)"
        m, sec = divmod(int(left + 0.5), 60)
        parts = [where, *(f"{k} {v}" for k, v in self.losses.items())]
        parts += [f"{n * self.batch / max(elapsed, 1e-9):,.0f} ex/s", f"ETA {m // 60}:{m % 60:02d}:{sec:02d}"]
        print("  ".join(parts), file=sys.stderr, flush=True)


def evaluate(
    family: Family, model: nn.Module, data: Data, cfg: Config, rt: Runtime, split: str, final: bool = True
) -> dict:
    """The family's metrics over a whole split: eval mode, no autograd, autocast."""
    model.eval()
    with torch.no_grad(), rt.autocast():
        return family.evaluate(model, data, split, cfg, rt, final)


def snapshot(family: Family, model: nn.Module, data: Data, cfg: Config, rt: Runtime, run: Run, step: int) -> None:
    """The family's pictures of the model at an evaluation: plots/<name>/step-<step>.png and TensorBoard."""
    from torchvision.utils import save_image

    model.eval()
    with torch.no_grad(), rt.autocast():
        images = family.snapshot(model, data, cfg, rt)
    for name, img in images.items():
        path = run.path / "plots" / name / f"step-{step:07d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda p, img=img: save_image(img.float().cpu(), p, format="png"))
        if run.tb is not None:
            run.tb.add_image(name, img.float().cpu(), step)


def _best(split: str, metric: str, best, step) -> dict:
    """status.json's best evaluation metric, its split and its step."""
    return {"best": {metric: best}, "best_split": split, "best_step": step}


def _logged(run_dir: Path, step: int | None) -> dict:
    """The val metrics logged at `step` (after a resume, the best weights' evaluation is no longer in memory)."""
    from deeprecipe.engine.run import read_metrics

    rows = [r for r in read_metrics(run_dir) if r.get("step") == step]
    return {k[4:]: v for r in rows for k, v in r.items() if k.startswith("val_")}


def _micro_steps(start: int, steps: int, accum: int) -> range:
    """Micro-batch index stream: step s, micro k is item s*accum + k of a stream of micro batches."""
    return range(start * accum, steps * accum)


__all__ = ["train", "train_step", "build", "make_parts", "evaluate", "NonFiniteLoss"]
