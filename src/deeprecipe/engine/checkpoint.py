"""Checkpoints: weights as safetensors, the rest of the training state in a weights-only torch file.

Layout of runs/NAME/checkpoints/:
    step-000500/model.safetensors   weights (and `ema.`-prefixed EMA weights)
    step-000500/state.pt            optimizer, RNG states, step, early-stopping state (torch.load weights_only)
    latest                          the name of the newest complete checkpoint folder
    best.safetensors                weights of the evaluated model at the best validation metric (a tie keeps
                                    the later step); its metadata holds the step, the metric and its value

Which weights are "the model" (train's final report, eval, predict, sample, export, serve): `model_weights`.

Every file is written to a temporary name, fsynced and renamed (engine/atomic.py); `latest` is switched only after
the folder is complete, so a crash (or a full disk) at any moment leaves the previous checkpoint intact and named.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from deeprecipe.core import UserError
from deeprecipe.engine.atomic import atomic_text, atomic_write, fsync_dir


def plain_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A state dict of contiguous CPU tensors with shared storage broken (safetensors needs both)."""
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}


def save_weights(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str] | None = None) -> None:
    atomic_write(path, lambda p: save_file(tensors, str(p), metadata=meta))


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"cannot read weights {path}: {e} (the file is damaged or not safetensors)") from None


def save(ckpt_dir: Path, step: int, weights: dict[str, torch.Tensor], state: dict[str, Any], keep: int = 2) -> Path:
    """Write checkpoint `step` completely, then point `latest` at it and prune older ones."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    final = ckpt_dir / f"step-{step:07d}"
    work = ckpt_dir / f".step-{step:07d}.partial"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    try:
        save_weights(work / "model.safetensors", weights)
        atomic_write(work / "state.pt", lambda p: torch.save(state, p))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(work, final)
        fsync_dir(ckpt_dir)
        atomic_text(ckpt_dir / "latest", final.name)
    except OSError as e:  # a full disk, a lost mount: the previous checkpoint is still complete and named
        kept = latest(ckpt_dir)
        raise UserError(
            f"cannot write checkpoint {final}: {e.strerror or e}; "
            f"{f'the previous checkpoint {kept} is intact' if kept else 'no earlier checkpoint'} "
            "(free space, then resume with --resume)"
        ) from e
    finally:
        shutil.rmtree(work, ignore_errors=True)
    olds = sorted(p for p in ckpt_dir.glob("step-*") if p.is_dir() and p != final)
    for p in olds[: max(0, len(olds) - (keep - 1))]:
        shutil.rmtree(p, ignore_errors=True)
    return final


def latest(ckpt_dir: Path) -> Path | None:
    pointer = ckpt_dir / "latest"
    if not pointer.is_file():
        return None
    folder = ckpt_dir / pointer.read_text().strip()
    return folder if (folder / "model.safetensors").is_file() and (folder / "state.pt").is_file() else None


def load(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    weights = load_weights(folder / "model.safetensors")
    try:
        state = torch.load(folder / "state.pt", map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"cannot read training state {folder / 'state.pt'}: {e}") from None
    return weights, state


def split_prefix(weights: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)}


class About(NamedTuple):
    """Which weights are the model of a run: the file, its training step, and a line for people."""

    file: str  # "best.safetensors" or "step-0000600/model.safetensors"
    step: int | None
    text: str  # "best.safetensors (step 400, val acc 0.9721)" or "last checkpoint (step 600, EMA)"


def model_weights(run_dir: Path, load: bool = True) -> tuple[dict[str, torch.Tensor] | None, About]:
    """The one rule for which weights are "the model" of a run, used by train's final report and by every verb that
    loads a run: the best on the family's metric at the evaluations (best.safetensors: on the val split, or the
    training split where the data has none, as a GAN's FID; a tie keeps the later step), else, when no evaluation
    gave the metric, the last checkpoint's (its EMA weights when kept). Returns (the weights, or None unless
    `load`; what they are)."""
    ckpt = Path(run_dir) / "checkpoints"
    best = ckpt / "best.safetensors"
    if best.is_file():
        meta, _ = _header(best)
        step = int(meta["step"]) if meta.get("step", "").isdigit() else None
        said = [f"step {step}"] if step is not None else []
        if meta.get("metric") and meta.get("value"):
            said.append(f"{meta.get('split', 'val')} {meta['metric']} {float(meta['value']):.4f}")
        about = About(best.name, step, f"{best.name} ({', '.join(said)})" if said else best.name)
        return (load_weights(best) if load else None), about
    folder = latest(ckpt)
    if folder is None:
        raise UserError(f"{run_dir}: no checkpoint found (is it a run folder? has it trained a step?)")
    step = int(folder.name.removeprefix("step-")) if folder.name.removeprefix("step-").isdigit() else None
    ema = any(k.startswith("ema.") for k in _header(folder / "model.safetensors")[1])
    about = About(f"{folder.name}/model.safetensors", step, f"last checkpoint (step {step}{', EMA' if ema else ''})")
    if not load:
        return None, about
    w = load_weights(folder / "model.safetensors")
    return split_prefix(w, "ema." if ema else "model."), about


def _header(path: Path) -> tuple[dict[str, str], list[str]]:
    """The metadata and tensor names of a safetensors file, without reading the tensors."""
    try:
        with safe_open(str(path), "pt") as f:
            return f.metadata() or {}, list(f.keys())
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"cannot read weights {path}: {e} (the file is damaged or not safetensors)") from None


def inference_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """The weights of the model of a run (see model_weights)."""
    return model_weights(run_dir)[0]
