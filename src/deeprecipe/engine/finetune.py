"""Fine-tuning: start a model from other weights, freeze part of it, and give its parts their own learning rates.

The config section `finetune` (config.FinetuneConfig; the CLI flags --init-from, --freeze, --head-lr,
--backbone-lr and --unfreeze-after set it) is applied by the training loop after it builds the model
(`apply`), for every family:

1. reads the source weights without unpickling: a run folder (its inference weights), a .safetensors file,
   or a PyTorch state dict file such as a torchvision ResNet's (`torch.load(weights_only=True)`);
2. copies every tensor whose name and shape match; a first conv whose input channels differ is adapted
   (RGB -> gray sums the kernel over its input channels, which is the RGB net fed the gray image three times);
   everything else keeps its fresh initialization: a new head when the class count changes;
3. freezes the backbone (everything but the head and the newly initialized tensors) or every top-level
   layer up to and including a named one;
4. returns the lr multipliers by name prefix (engine/optim.py param_groups). With unfreeze_after N the
   frozen layers are not frozen for good: they get learning rate 0 until their start step, one top-level
   layer every N steps from the head down to the stem (gradual unfreezing). Being a function of the step,
   it resumes exactly.

The config is saved in config.yaml and the plan (source, frozen parameters, lr multipliers) in finetune.json,
so `deeprecipe train --resume RUN` rebuilds the same optimizer groups and freezing without being told again.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn

from deeprecipe.core import UserError
from deeprecipe.engine import checkpoint
from deeprecipe.engine.atomic import atomic_text
from deeprecipe.models.head import classifier, current_names
from deeprecipe.models.pretrained import read_file, reprefixed, strip

# prefixes that wrappers add to parameter names: DDP, torch.compile, and our own checkpoints' model/ema halves


def read_source(src: str) -> dict[str, torch.Tensor]:
    """Name -> tensor of a run folder, a .safetensors file, or a state-dict file (read weights-only)."""
    p = Path(src)
    if p.is_dir():
        if not (p / "checkpoints").is_dir():
            raise UserError(f"--init-from {src}: a folder must be a run folder (with checkpoints/)")
        weights = checkpoint.inference_weights(p)
    elif not p.is_file():
        raise UserError(f"--init-from {src}: no such run folder or weights file")
    elif p.suffix == ".safetensors":
        weights = checkpoint.load_weights(p)
    else:  # a state dict, or a checkpoint dict holding one (models/pretrained.py read_file: weights-only)
        weights = read_file(src, f"--init-from {src}")
    # a training checkpoint's model.safetensors holds model.* and ema.*: prefer the EMA weights
    for half in ("ema.", "model."):
        if any(k.startswith(half) for k in weights):
            weights = {k[len(half) :]: v for k, v in weights.items() if k.startswith(half)}
            break
    return strip(weights)  # names as DDP or torch.compile wrote them, unwrapped


def adapt_channels(src: torch.Tensor, dst_shape: torch.Size) -> torch.Tensor | None:
    """A conv kernel (out, c_in, kh, kw) for another number of input channels, or None if it cannot be."""
    if src.ndim != 4 or len(dst_shape) != 4 or src.shape[0] != dst_shape[0] or src.shape[2:] != dst_shape[2:]:
        return None
    cin, want = src.shape[1], dst_shape[1]
    if want == 1:  # gray from RGB: the sum gives the same output as the gray image copied into 3 channels
        return src.sum(1, keepdim=True)
    if cin == 1:  # RGB from gray: split the kernel evenly over the channels
        return src.repeat(1, want, 1, 1) / want
    return None


def load_matching(model: nn.Module, weights: dict[str, torch.Tensor]) -> dict[str, list]:
    """Copy matching tensors into `model` in place; returns what was loaded, adapted, skipped, new and unused.
    Names match after best_prefix's renaming, so a trunk kept under another top-level name loads: a U-Net's
    `encoder.` into a detector's `backbone.`, a plain torchvision file into either; a head saved under an older name
    (torchvision's and this package's ResNet `fc`) is matched as the model's `head` (models/head.py)."""
    state = model.state_dict()
    weights, drop, add = reprefixed(weights, state)
    weights = current_names(model, weights)
    report: dict[str, list] = {"loaded": [], "adapted": [], "skipped": [], "new": [], "unused": []}
    report["renamed"] = [] if (drop, add) == ("", "") else [(drop, add)]
    new_state = {}
    for name, cur in state.items():
        src = weights.get(name)
        if src is None:
            report["new"].append(name)
        elif src.shape == cur.shape:
            new_state[name] = src
            report["loaded"].append(name)
        elif (ad := adapt_channels(src, cur.shape)) is not None:
            new_state[name] = ad
            report["adapted"].append((name, tuple(src.shape), tuple(cur.shape)))
        else:
            report["skipped"].append((name, tuple(src.shape), tuple(cur.shape)))
    report["unused"] = [k for k in weights if k not in state]
    model.load_state_dict(new_state, strict=False)
    return report


def format_report(src: str, report: dict[str, list]) -> str:
    def shapes(items):
        return ", ".join(f"{n} {list(a)}->{list(b)}" for n, a, b in items[:6]) + (" ..." if len(items) > 6 else "")

    lines = [
        f"init from {src}: loaded {len(report['loaded'])} tensors, adapted {len(report['adapted'])}, "
        f"skipped {len(report['skipped'])} (shape mismatch), newly initialized "
        f"{len(report['new']) + len(report['skipped'])}, unused from the source {len(report['unused'])}"
    ]
    for drop, add in report.get("renamed", []):
        lines.append(f"  names {drop or ''}* of the source read as {add or ''}*")
    if report["adapted"]:
        lines.append(f"  adapted (input channels): {shapes(report['adapted'])}")
    if report["skipped"]:
        lines.append(f"  skipped, kept fresh init: {shapes(report['skipped'])}")
    if report["new"]:
        lines.append(
            f"  not in the source, fresh init: {', '.join(report['new'][:8])}"
            + (" ..." if len(report["new"]) > 8 else "")
        )
    return "\n".join(lines)


def top_level(model: nn.Module) -> list[str]:
    """Names of the model's top-level children that hold parameters, in registration (forward) order."""
    return [n for n, m in model.named_children() if any(True for _ in m.parameters())]


def head_name(model: nn.Module) -> str:
    """The top-level layer that holds the model's classifier (`get_classifier()`, timm's API: models/head.py); for
    a model without one (a detector, a language model) its last top-level layer with parameters."""
    head = classifier(model)
    for n, m in model.named_children():
        if head is not None and any(sub is head for sub in m.modules()):
            return n
    return top_level(model)[-1]


def plan(
    model: nn.Module, fresh: list[str], freeze: str, head_lr: float, backbone_lr: float, unfreeze_after: int
) -> dict[str, float | tuple[float, int]]:
    """Set requires_grad for frozen layers and return lr multipliers by prefix ("layer1." -> scale or
    (scale, start step)). The head and any layer left with fresh weights train at head_lr and are never
    frozen (a frozen random layer would stay random)."""
    layers = top_level(model)
    head = head_name(model)
    new = {head} | {n.split(".")[0] for n in fresh}
    if freeze == "backbone":
        frozen = [n for n in layers if n not in new]
    elif freeze:
        if freeze not in layers:
            raise UserError(
                f"--freeze {freeze}: not a top-level layer of this model; use 'backbone' or one of {', '.join(layers)}"
            )
        if layers.index(freeze) >= layers.index(head):
            raise UserError(f"--freeze {freeze} would freeze the head '{head}': name an earlier layer")
        frozen = [n for n in layers[: layers.index(freeze) + 1] if n not in new]
    else:
        frozen = []
    lr_scale: dict[str, float | tuple[float, int]] = {n + ".": head_lr if n in new else backbone_lr for n in layers}
    if unfreeze_after > 0:  # the frozen layer nearest the head starts first, the stem last
        for k, n in enumerate(reversed(frozen), 1):
            lr_scale[n + "."] = (backbone_lr, k * unfreeze_after)
    else:
        for n in frozen:
            for p in getattr(model, n).parameters():
                p.requires_grad_(False)
    return lr_scale


PLAN = "finetune.json"


def apply(model: nn.Module, ft, run_dir: Path, resume: bool = False, main: bool = True) -> dict | None:
    """Fine-tune as config section `ft` (config.FinetuneConfig) says: the lr multipliers by name prefix, after
    loading the source weights and freezing; None without a source. The source is ft.init_from, or else the
    pretrained weights the model was built from (model.weights: models/pretrained.py load leaves the names of
    the tensors it did not fill in `model.pretrained_fresh`) when the section asks for freezing or lr
    multipliers. A resumed run re-applies the plan saved in run_dir/finetune.json (its weights come from the
    checkpoint, so the source is not read again)."""
    pretrained = getattr(model, "pretrained_fresh", None)
    tuning = ft.freeze or ft.head_lr != 1 or ft.backbone_lr != 1 or ft.unfreeze_after
    if not ft.init_from and not (pretrained is not None and tuning):
        return None
    path = Path(run_dir) / PLAN
    if resume and path.is_file() and checkpoint.latest(Path(run_dir) / "checkpoints") is not None:
        return _reapply(model, path)
    if ft.init_from:
        weights = read_source(ft.init_from)
        report = load_matching(model, weights)
        if not report["loaded"] and not report["adapted"]:
            raise UserError(
                f"--init-from {ft.init_from}: no tensor matches this model by name and shape "
                f"(source names look like {list(weights)[:3]}, the model's like {list(model.state_dict())[:3]})"
            )
        fresh = report["new"] + [n for n, _, _ in report["skipped"]]
    else:  # the model's own pretrained start; its load was reported when it was built
        fresh, report = pretrained, None
    lr_scale = plan(model, fresh, ft.freeze, ft.head_lr, ft.backbone_lr, ft.unfreeze_after)
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    if main:
        if report is not None:
            print(format_report(ft.init_from, report))
        n_frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
        desc = ", ".join(
            f"{k.rstrip('.')}: x{v[0]:g} from step {v[1]}" if isinstance(v, tuple) else f"{k.rstrip('.')}: x{v:g}"
            for k, v in lr_scale.items()
        )
        print(
            f"  frozen {n_frozen:,} of {sum(p.numel() for p in model.parameters()):,} parameters; lr multipliers {desc}"
        )
        saved = {
            "init_from": str(Path(ft.init_from).resolve()) if ft.init_from else "model.weights",
            "frozen": frozen,
            "lr_scale": {k: list(v) if isinstance(v, tuple) else v for k, v in lr_scale.items()},
        }
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        atomic_text(path, json.dumps(saved, indent=1))
    return lr_scale


def _reapply(model: nn.Module, path: Path) -> dict:
    try:
        saved = json.loads(path.read_text())
        frozen, scales = saved["frozen"], saved["lr_scale"]
    except (ValueError, KeyError) as e:
        raise UserError(f"{path}: unreadable fine-tuning plan ({e}); start a new run with --init-from") from None
    params = dict(model.named_parameters())
    missing = [n for n in frozen if n not in params]
    if missing:
        raise UserError(f"{path}: frozen parameter {missing[0]} is not in this model; the run folder is damaged")
    for n in frozen:
        params[n].requires_grad_(False)
    return {k: tuple(v) if isinstance(v, list) else v for k, v in scales.items()}
