"""AdamW with decoupled weight decay on weights only (or Muon on the hidden matrices), LR schedules, and an EMA of
the weights."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from deeprecipe.config import OptimConfig
from deeprecipe.core import ConfigError


def param_groups(
    model: nn.Module, weight_decay: float, lr_scale: dict | None = None, lr_mult: float = 1.0
) -> list[dict]:
    """Decay matrices and conv kernels; never biases, norm scales or other 1-D parameters.

    `lr_scale` maps a parameter-name prefix to a learning-rate multiplier (discriminative fine-tuning), or to
    (multiplier, start step): lr 0 before that step (gradual unfreezing, see engine/finetune.py). `lr_mult`
    multiplies every group (a family's part, e.g. a GAN's discriminator)."""
    groups: dict[tuple[bool, float, int], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = p.ndim >= 2 and "norm" not in name and "pos_emb" not in name
        scale, start = 1.0, 0
        for prefix, s in (lr_scale or {}).items():
            if name.startswith(prefix):
                scale, start = s if isinstance(s, tuple) else (s, 0)
        groups.setdefault((decay, scale, start), []).append(p)
    return [
        {"params": ps, "weight_decay": weight_decay if d else 0.0, "lr_scale": s * lr_mult, "start_step": t}
        for (d, s, t), ps in groups.items()
    ]


def adamw(
    model: nn.Module, cfg: OptimConfig, lr_scale: dict[str, float] | None = None, lr_mult: float = 1.0
) -> torch.optim.AdamW:
    groups = param_groups(model, cfg.weight_decay, lr_scale, lr_mult)
    if not groups:
        raise ConfigError("the model has no trainable parameters (everything is frozen)")
    devices = {p.device.type for g in groups for p in g["params"]}
    cuda = devices == {"cuda"}
    # the fused kernel on CUDA and on the CPU (on the CPU 3-4x faster than the foreach update: about 5% of a
    # small CNN's step); on CUDA also capturable (a CUDA graph of the whole step may replay it), each group's lr
    # a 0-d tensor on the device that set_lr changes in place (a captured step reads the current value)
    fused = cuda or devices == {"cpu"}
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, fused=fused or None, capturable=cuda)
    if cuda:
        device_lr(opt)
    return opt


def optimizer(model: nn.Module, cfg: OptimConfig, lr_scale: dict | None = None, lr_mult: float = 1.0):
    """The optimizer `cfg.name` names: AdamW, or Muon on the hidden matrices and AdamW on the rest (Muon)."""
    if cfg.name == "adamw":
        return adamw(model, cfg, lr_scale, lr_mult)
    if cfg.name != "muon":
        raise ConfigError(f"optim.name={cfg.name}: use adamw or muon")
    return muon(model, cfg, lr_scale, lr_mult)


def hidden_matrices(model: nn.Module) -> list[nn.Parameter]:
    """The weights Muon updates: those of the Linear and convolution layers between the first and the last
    (the input and output layers stay with AdamW, as do embeddings, any weight tied to one, norms and biases)."""
    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding))]
    embedded = {id(m.weight) for m in layers if isinstance(m, nn.Embedding)}
    return [m.weight for m in layers[1:-1] if id(m.weight) not in embedded and m.weight.requires_grad]


def as_matrix(p: torch.Tensor) -> tuple[torch.Tensor, list[int]] | None:
    """A (out, fan-in) view of a kernel's storage, and the permutation of its dims that the view reads (a
    channels-last kernel reads (out, kh, kw, in)); None when no view exists. The order of the fan-in columns does
    not matter to Muon: orthogonalising permuted columns gives the same permutation of the result."""
    w = p.detach()
    perm = sorted(range(w.ndim), key=lambda d: -w.stride(d))
    if perm[0] != 0 or not w.permute(perm).is_contiguous():
        return None
    return w.permute(perm).view(w.shape[0], -1), perm


class Muon:
    """torch.optim.Muon (momentum orthogonalised by Newton-Schulz iterations; Jordan et al. 2024) on the hidden
    layers' weights (a convolution's kernel as its (out, fan-in) matrix), AdamW on every other parameter, as one
    optimizer for the loop. Muon's step is scaled to AdamW's update size (adjust_lr_fn "match_rms_adamw"), so the
    recipe's lr, schedule and weight decay serve both; its momentum is 0.95 with Nesterov. Not fused: on CUDA the
    step runs eagerly (no CUDA graph)."""

    def __init__(self, groups: list[dict], cfg: OptimConfig, hidden: list[nn.Parameter]):
        self.views: list[tuple[torch.Tensor, torch.Tensor, list[int]]] = []  # (kernel, its matrix view, perm)
        matrices = {}  # id(weight) -> what Muon updates: the weight, or a kernel's matrix view
        for p in hidden:
            if p.ndim == 2:
                matrices[id(p)] = p
            elif (m := as_matrix(p)) is not None:  # else (an odd layout) the kernel stays with AdamW
                matrices[id(p)] = m[0]
                self.views.append((p, *m))
        split: dict[bool, list[dict]] = {True: [], False: []}
        for g in groups:
            for is_hidden in (True, False):
                ps = [matrices.get(id(p), p) for p in g["params"] if (id(p) in matrices) == is_hidden]
                if ps:
                    split[is_hidden].append({**g, "params": ps})
        self.opts = []
        if split[True]:
            kw = {"weight_decay": cfg.weight_decay, "momentum": 0.95, "nesterov": True}
            self.opts.append(torch.optim.Muon(split[True], lr=cfg.lr, adjust_lr_fn="match_rms_adamw", **kw))
        if split[False]:
            fused = {p.device.type for g in split[False] for p in g["params"]} == {"cpu"} or None
            self.opts.append(torch.optim.AdamW(split[False], lr=cfg.lr, betas=cfg.betas, fused=fused))
        self.defaults: dict = {}  # not fused: the loop keeps its host-side NaN/inf check

    @property
    def param_groups(self) -> list[dict]:
        return [g for o in self.opts for g in o.param_groups]

    def step(self, closure=None) -> None:
        for p, view, perm in self.views:  # a kernel's gradient, read as its matrix view reads the kernel
            view.grad = None if p.grad is None else p.grad.permute(perm).reshape(view.shape)
        for o in self.opts:
            o.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p, view, _ in self.views:  # the kernels themselves are in no optimizer's groups
            view.grad = None
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()
        for o in self.opts:
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {type(o).__name__: o.state_dict() for o in self.opts}

    def load_state_dict(self, state: dict) -> None:
        if set(state) != {type(o).__name__ for o in self.opts}:
            raise ConfigError(f"the checkpoint's optimizer state holds {sorted(state)}; this run uses optim.name=muon")
        for o in self.opts:
            o.load_state_dict(state[type(o).__name__])


def muon(model: nn.Module, cfg: OptimConfig, lr_scale: dict | None = None, lr_mult: float = 1.0) -> Muon:
    if not hasattr(torch.optim, "Muon"):
        raise ConfigError(
            f"optim.name=muon needs torch >= 2.9 (torch.optim.Muon); this is torch {torch.__version__}: "
            "upgrade torch or set optim.name=adamw"
        )
    groups = param_groups(model, cfg.weight_decay, lr_scale, lr_mult)
    if not groups:
        raise ConfigError("the model has no trainable parameters (everything is frozen)")
    return Muon(groups, cfg, hidden_matrices(model))


POSITIONS = 1_000_000  # the schedule's resolution under a time budget: a position is this many virtual steps


def device_lr(opt: torch.optim.Optimizer) -> None:
    """Each param group's lr as its own 0-d tensor on the group's device (again after load_state_dict, which
    brings the saved lr back as a CPU tensor)."""
    for g in opt.param_groups:
        g["lr"] = torch.tensor(float(g["lr"]), device=g["params"][0].device)


def lr_factor(cfg: OptimConfig, step: int, total: int, position: float | None = None) -> float:
    """Multiplier of the peak learning rate at `step` (0-based) of `total`. Under a time budget (train.minutes)
    `position`, the run's progress in [0, 1] (engine/clock.py), places the schedule instead; a warmup given in
    steps (optim.warmup >= 1) still counts steps, under the decay that the position gives."""
    if cfg.schedule not in ("cosine", "onecycle", "constant"):
        raise ConfigError(f"optim.schedule={cfg.schedule}: use cosine, onecycle or constant")
    if position is not None and cfg.warmup >= 1:
        warm = int(cfg.warmup)
        return min(_rise(cfg, step, warm), decay(cfg, position)) if step < warm else decay(cfg, position)
    if position is not None:
        step, total = round(position * POSITIONS), POSITIONS
    warm = int(cfg.warmup if cfg.warmup >= 1 else cfg.warmup * total)
    if cfg.schedule == "onecycle":  # linear up to the peak over `warmup` (default 30%), then linear to ~0
        warm = warm or int(0.3 * total)
    if step < warm:
        return _rise(cfg, step, warm)
    return decay(cfg, (step - warm) / max(1, total - warm))


def _rise(cfg: OptimConfig, step: int, warm: int) -> float:
    """The warmup's factor at `step` < `warm`: linear to the peak (onecycle from a tenth of it)."""
    return 0.1 + 0.9 * step / warm if cfg.schedule == "onecycle" else (step + 1) / warm


def decay(cfg: OptimConfig, t: float) -> float:
    """The factor after the warmup at share `t` of the decay: cosine to min_lr, linear to min_lr (onecycle), or 1."""
    t = min(1.0, t)
    if cfg.schedule == "cosine":
        return cfg.min_lr + (1 - cfg.min_lr) * 0.5 * (1 + math.cos(math.pi * t))
    if cfg.schedule == "onecycle":
        return max(cfg.min_lr, 1 - t)
    return 1.0


def set_lr(opt: torch.optim.Optimizer, lr: float, step: int = 0) -> None:
    for g in opt.param_groups:
        value = lr * g.get("lr_scale", 1.0) if step >= g.get("start_step", 0) else 0.0
        if isinstance(g["lr"], torch.Tensor):
            g["lr"].fill_(value)
        else:
            g["lr"] = value


def ema(model: nn.Module, decay: float) -> AveragedModel | None:
    """EMA of parameters and buffers (BatchNorm statistics too), updated after every optimizer step."""
    if not decay:
        return None
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
