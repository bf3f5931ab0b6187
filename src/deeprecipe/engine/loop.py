"""The training loop. Everything a step does is in `train` below; helpers are plain functions.

A task module supplies: prepare(batch, spec, draws) -> batch as it enters the net (draws: data.core.Draws, the
per-example random numbers for augmentation; None: eval, no augmentation); loss(model, batch, cfg) -> (loss,
logs); evaluate(model, data, split, cfg, rt) -> metrics; METRIC = (name, "max"|"min"); and optionally
finish(model, data, cfg, rt, run_dir) for final plots and test metrics, and train(...) to replace this loop
entirely (the GAN does).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
from tqdm import tqdm

from deeprecipe.config import Config, ConfigError, dump, to_dict
from deeprecipe.data.core import Data, micro_draws, train_batches
from deeprecipe.engine import checkpoint, optim
from deeprecipe.engine.device import Runtime, rng_state, set_rng_state, setup, step_generator
from deeprecipe.engine.run import Run
from deeprecipe.util import UserError


class NonFiniteLoss(UserError):
    pass


def build(cfg: Config, rt: Runtime) -> tuple[Data, nn.Module]:
    """Data (tensor splits moved to the device) and the model (on the device, channels_last for conv nets)."""
    torch.manual_seed(cfg.train.seed)
    data = cfg.data.build()
    for name in ("train", "val", "test"):
        split = getattr(data, name)
        if split is not None:
            split.to(rt.device)
    model = cfg.model.build(data.spec).to(rt.device)
    if cfg.train.channels_last and any(isinstance(m, nn.Conv2d) for m in model.modules()):
        model = model.to(memory_format=torch.channels_last)
    return data, model


def check_resume(run_dir: Path, cfg: Config) -> None:
    """A resumed run must be the same run: only train.steps may change (to train longer)."""
    import yaml

    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    now = to_dict(cfg)
    diffs = []
    for section, values in now.items():
        old = saved.get(section)
        if isinstance(values, dict):
            for k, v in values.items():
                ov = (old or {}).get(k)
                if (section, k) != ("train", "steps") and _norm(ov) != _norm(v):
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


def train(cfg: Config, run_dir: Path, resume: bool = False, command: str = "", init=None) -> dict[str, float]:
    from deeprecipe.tasks import get_task

    task = get_task(cfg.task)
    if hasattr(task, "train"):
        return task.train(cfg, run_dir, resume=resume, command=command, init=init)
    T, rt = cfg.train, setup(cfg.train.device, cfg.train.precision)
    micro = T.batch_size // T.accum  # examples per micro-batch, over all processes
    if micro % rt.world:
        raise ConfigError(
            f"train.batch_size={T.batch_size} / train.accum={T.accum} = {micro} examples per micro-batch "
            f"do not split evenly over {rt.world} processes"
        )
    data, model = build(cfg, rt)
    lr_scale = init(model) if init else None  # fine-tuning: load weights, freeze, per-group lr scales
    opt = optim.adamw(model, cfg.optim, lr_scale)
    ema = optim.ema(model, T.ema)
    scaler = rt.scaler()
    ckpt_dir = run_dir / "checkpoints"
    start, best, bad_evals = 0, None, 0
    folder = checkpoint.latest(ckpt_dir) if resume else None
    if resume:
        check_resume(run_dir, cfg)
        if folder is None:  # killed before its first checkpoint: the run starts again from step 0
            print(f"{run_dir}: no checkpoint yet, training from step 0", file=sys.stderr)
    if folder is not None:
        weights, state = checkpoint.load(folder)
        model.load_state_dict(checkpoint.split_prefix(weights, "model."))
        opt.load_state_dict(state["optimizer"])
        if ema is not None:
            ema.module.load_state_dict(checkpoint.split_prefix(weights, "ema."))
            ema.n_averaged.fill_(int(state["ema_n"]))
        set_rng_state(state["rng"])
        start, best, bad_evals = int(state["step"]), state.get("best"), int(state.get("bad_evals", 0))
    run = Run(run_dir, cfg, rt.main, start, command)
    if rt.main:  # what predict/export/serve need to rebuild the model without the data
        checkpoint.atomic_text(run_dir / "spec.json", json.dumps(dataclasses.asdict(data.spec)))
    net = torch.compile(model) if T.compile else model
    if rt.world > 1:
        ids = [rt.device.index] if rt.device.type == "cuda" else None
        net = nn.parallel.DistributedDataParallel(net, device_ids=ids)
    metric, mode = task.METRIC
    batches = train_batches(
        data.train, T.seed, _micro_steps(start, T.steps, T.accum), micro, rt.device, rt.rank, rt.world, T.workers
    )
    bar = tqdm(total=T.steps, initial=start, disable=None if rt.main else True, dynamic_ncols=True, unit="step")
    logged, t0, seen, nlog, results = torch.zeros((), device=rt.device), time.perf_counter(), 0, 0, {}
    model.train()
    step = start
    for step in range(start, T.steps):
        optim.set_lr(opt, cfg.optim.lr * optim.lr_factor(cfg.optim, step, T.steps), step)
        for k in range(T.accum):
            draws = micro_draws(step_generator(rt.device, T.seed, step), T.batch_size, micro, k, rt.rank, rt.world)
            batch = task.prepare(next(batches), data.spec, draws)
            sync = k == T.accum - 1 or rt.world == 1
            with net.no_sync() if not sync else contextlib.nullcontext(), rt.autocast():
                loss, logs = task.loss(net, batch, cfg)
            (scaler.scale(loss / T.accum) if scaler else loss / T.accum).backward()
            logged += loss.detach() / T.accum
            seen += len(batch[0]) * rt.world
        nlog += 1
        if scaler:
            scaler.unscale_(opt)
        norm = nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.clip if cfg.optim.clip > 0 else float("inf"))
        skipped = not torch.isfinite(norm)
        if skipped:  # a NaN/inf loss or gradient: never let it reach the weights
            opt.zero_grad(set_to_none=True)
            if scaler:  # an fp16 overflow with a finite loss is routine: the scaler lowers its scale
                scaler.update()
            if T.nonfinite != "skip" and (scaler is None or not torch.isfinite(logged)):
                run.status("failed", step=step + 1, error="non-finite loss")
                raise NonFiniteLoss(
                    f"loss became {float(loss.detach()):.4g} at step {step + 1}; the last good "
                    "checkpoint is kept in checkpoints/ (lower optim.lr, check the data, or set "
                    "train.nonfinite=skip)"
                )
            run.log(step + 1, skipped_batch=1)
            logged.zero_()
            nlog = 0  # the step still counts: evaluation and checkpoints below happen on schedule
        elif scaler:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)
        if ema is not None and not skipped:
            ema.update_parameters(model)
        done = step + 1
        if not skipped and (done % T.log_every == 0 or done == T.steps):
            dt, loss_v = time.perf_counter() - t0, float(logged) / max(nlog, 1)
            run.log(done, loss=loss_v, lr=opt.param_groups[0]["lr"], grad_norm=float(norm), examples_per_s=seen / dt)
            bar.set_postfix(loss=f"{loss_v:.4f}", ex_s=f"{seen / dt:,.0f}")
            logged.zero_()
            t0, seen, nlog = time.perf_counter(), 0, 0
        bar.update(1)
        stop = False
        if (T.eval_every and done % T.eval_every == 0) or done == T.steps:
            results = evaluate(task, ema.module if ema else model, data, cfg, rt, "val" if data.val else "train")
            run.log(done, **{f"val_{k}": v for k, v in results.items() if isinstance(v, (int, float))})
            value = results.get(metric)
            if value is not None and (best is None or (value > best if mode == "max" else value < best)):
                best, bad_evals = value, 0
                if rt.main:
                    checkpoint.save_weights(
                        ckpt_dir / "best.safetensors",
                        checkpoint.plain_state(ema.module if ema else model),
                        {"step": str(done)},
                    )
            else:
                bad_evals += 1
                stop = bool(T.early_stop) and bad_evals >= T.early_stop
            model.train()
            run.status("running", step=done, best={metric: best})
        if rt.main and (done % T.ckpt_every == 0 or done == T.steps or stop):
            weights = {f"model.{k}": v for k, v in checkpoint.plain_state(model).items()}
            if ema is not None:
                weights.update({f"ema.{k}": v for k, v in checkpoint.plain_state(ema.module).items()})
            state = {
                "step": done,
                "optimizer": opt.state_dict(),
                "rng": rng_state(),
                "best": best,
                "bad_evals": bad_evals,
                "ema_n": int(ema.n_averaged) if ema is not None else 0,
            }
            checkpoint.save(ckpt_dir, done, weights, state)
        if stop:
            bar.write(f"early stop at step {done}: val {metric} did not improve in {T.early_stop} evaluations")
            break
    bar.close()
    final = {f"val_{k}": v for k, v in results.items() if isinstance(v, (int, float))}
    if rt.main and hasattr(task, "finish"):
        final.update(task.finish(ema.module if ema else model, data, cfg, rt, run_dir) or {})
    run.status("done", step=step + 1 if T.steps > start else start, best={metric: best}, final=final)
    run.close()
    if rt.main:
        from deeprecipe.engine.report import write_report

        write_report(run_dir)
    return final


def evaluate(task, model: nn.Module, data: Data, cfg: Config, rt: Runtime, split: str) -> dict:
    model.eval()
    with torch.no_grad(), rt.autocast():
        out = task.evaluate(model, data, split, cfg, rt)
    return out


def _micro_steps(start: int, steps: int, accum: int) -> range:
    """Micro-batch index stream: step s, micro k is item s*accum + k of a stream of micro batches."""
    return range(start * accum, steps * accum)


__all__ = ["train", "build", "evaluate", "dump"]
