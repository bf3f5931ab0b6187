"""Typed configuration: dataclasses with documented defaults, YAML recipes, dotted overrides.

A run's config has fixed sections (optim, train, finetune, distill, pretrain, plus the task name and a description)
and two sections whose type depends on a name: ``data`` (chosen by ``data.name`` from the dataset registry)
and ``model`` (chosen by ``model.name`` from the model registry; deeprecipe/recipe.py looks them up). Every key
is checked: an unknown key or a value of the wrong type fails with the nearest valid name. A field's range is
declared beside it (``ranged(default, "> 0")``) and its choices in its type (``Literal[...]``); from_dict checks
both for every dataclass it builds.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from deeprecipe.core import ConfigError, nearest

RECIPES_DIR = Path(__file__).parent / "recipes"
TUNE_KEY = "tune"  # a recipe's search space for `deeprecipe tune` (path: range); not part of a run's Config
GPU_KEY = "cuda"  # a recipe's settings for training on a GPU (path: value), applied when the run trains on CUDA


def ranged(default: Any, rule: str) -> Any:
    """A dataclass field whose value (each item of a list) must lie in `rule`: "> 0", ">= 1" or an interval such
    as "[0, 1)"; from_dict checks it (a one-line ConfigError naming the field)."""
    return field(default=default, metadata={"range": rule})


@dataclass
class OptimConfig:
    name: Literal["adamw", "muon"] = "adamw"  # muon: Muon on inner Linear/conv weights, AdamW on the rest
    lr: float = ranged(3e-3, "> 0")  # peak learning rate
    weight_decay: float = ranged(5e-4, ">= 0")  # decoupled (AdamW); never on norms, biases or embeddings' positions
    betas: tuple[float, float] = ranged((0.9, 0.999), "[0, 1)")
    schedule: Literal["cosine", "onecycle", "constant"] = "cosine"  # cosine: linear warmup, cosine decay
    warmup: float = ranged(0.05, ">= 0")  # warmup length as a fraction of train.steps (or steps when >= 1)
    min_lr: float = ranged(0.0, "[0, 1]")  # floor of the decay, as a fraction of lr
    clip: float = ranged(1.0, ">= 0")  # max global gradient norm; 0 disables clipping
    label_smoothing: float = ranged(0.0, "[0, 1)")  # for classification-like losses


@dataclass
class TrainConfig:
    steps: int = ranged(1000, ">= 1")  # optimizer steps (with minutes: at most)
    # a wall-clock budget: train for this many minutes (steps, evaluations, checkpoints; not the data's building or
    # the final evaluation), the lr schedule placed by the share of the time spent (engine/clock.py); 0: off
    minutes: float = ranged(0.0, ">= 0")
    batch_size: int = ranged(128, ">= 1")  # global batch (summed over accumulation and processes)
    accum: int = ranged(1, ">= 1")  # gradient accumulation: batch_size is split into this many micro-batches
    eval_every: int = ranged(250, ">= 0")  # evaluate on the full val split every N steps (0: only at the end)
    eval_batch_size: int = 512
    ckpt_every: int = ranged(250, ">= 1")  # checkpoint every N steps (and always at the end)
    log_every: int = ranged(10, ">= 1")
    seed: int = 0
    device: str = "auto"  # auto (cuda, then mps, then cpu) | cpu | cuda | cuda:1 | mps
    precision: str = "auto"  # auto (bf16 where measured faster; docs: Automatic choices) | bf16 | fp16 | fp32
    compile: bool = False  # torch.compile the model
    cuda_graph: bool = True  # on CUDA, replay the whole training step from a CUDA graph where it can (engine/graph.py)
    channels_last: bool = True  # memory format for conv nets on 4D inputs
    ema: float = ranged(0.0, "[0, 1)")  # EMA decay of weights (e.g. 0.999); 0 disables; evaluation uses the EMA
    early_stop: int = ranged(0, ">= 0")  # stop after N evaluations without improvement of the main metric; 0: never
    nonfinite: Literal["stop", "skip"] = "stop"  # a NaN/inf loss: stop (keep last good checkpoint) | skip the batch
    workers: int = ranged(2, ">= 0")  # DataLoader workers for data streamed from disk
    limit_eval: int = ranged(0, ">= 0")  # evaluate on at most N examples (0: the full split)
    # test-time augmentation, image classification: "flip" averages the logits of each image and of its mirror in
    # evaluation, predict, serve and export (for nets trained with data.flip: true); twice the inference cost
    tta: Literal["none", "flip"] = "none"
    # experiment trackers that get every logged metric (metrics.jsonl always does): tensorboard (tb/) | mlflow
    # (parameters, metrics, config.yaml and report.html; MLFLOW_TRACKING_URI, else MLflow's local default)
    loggers: list[Literal["tensorboard", "mlflow"]] = field(default_factory=lambda: ["tensorboard"])


@dataclass
class FinetuneConfig:
    """Start from other weights (engine/finetune.py); the CLI flags --init-from, --freeze, ... set these."""

    init_from: str = ""  # a run folder, a .safetensors file or a PyTorch state dict file ("": train from scratch)
    freeze: str = ""  # "backbone" (all but the head and fresh layers), or a top-level layer to freeze up to
    head_lr: float = ranged(1.0, ">= 0")  # lr multiplier of the head and of layers left with fresh weights
    backbone_lr: float = ranged(1.0, ">= 0")  # lr multiplier of the loaded layers
    unfreeze_after: int = ranged(0, ">= 0")  # unfreeze frozen layers one every N steps from the head down (0: never)


@dataclass
class DistillConfig:
    """Knowledge distillation from a trained classifier run (families/classify; Hinton et al. 2015): the loss is
    (1 - weight) * cross-entropy with the labels + weight * T^2 * KL(teacher || student), both softmaxes at
    temperature T, + attention / 2 * the attention-transfer term (Zagoruyko & Komodakis 2017) when it is on."""

    teacher: str = ""  # the teacher's run folder, same classes, any model ("": no distillation)
    temperature: float = ranged(4.0, "> 0")  # T: softer distributions show the teacher's similarities between classes
    weight: float = ranged(0.5, "[0, 1]")  # share of the teacher's term (1: the labels are not used)
    attention: float = ranged(0.0, ">= 0")  # beta of attention transfer: the squared distance between the student's
    # and the teacher's attention maps (each stage's channel mean of squared activations, unit length) (0: off)


@dataclass
class PretrainConfig:
    """Self-supervised pretraining. Task pretrain (families/pretrain): SimCLR (Chen et al. 2020), two augmented views
    of each image told apart from the other images' views by the NT-Xent loss on a projection MLP's outputs. Task
    masked (families/masked): a dense net regresses the pixels of hidden cells (crop_scale and the mask_ fields)."""

    temperature: float = ranged(0.2, "> 0")  # NT-Xent's: lower weighs the hardest negatives more
    proj_hidden: int = ranged(512, ">= 1")  # hidden width of the projection MLP that replaces the model's head
    proj_dim: int = ranged(128, ">= 1")  # the embedding the loss compares
    crop_scale: tuple[float, float] = ranged((0.2, 1.0), "(0, 1]")  # area range of a view's random resized crop
    jitter: float = ranged(0.5, "[0, 1]")  # colour strength s: brightness, contrast, saturation 0.8 s, hue 0.2 s
    jitter_p: float = ranged(0.8, "[0, 1]")  # chance that a view's colours are jittered
    gray_p: float = ranged(0.2, "[0, 1]")  # chance that a view is turned gray
    mask_ratio: float = ranged(0.6, "(0, 1)")  # masked: the share of each image's cells hidden
    mask_patch: int = ranged(8, ">= 1")  # masked: a cell's side in pixels

    def check_for(self, task: str) -> None:
        """Refuse the other method's options (left at their defaults they are not read) and a crop range given
        largest first; `task` is pretrain (SimCLR) or masked."""
        own, other, other_task, foreign = (
            ("SimCLR", "masked pretraining", "masked", ("mask_ratio", "mask_patch"))
            if task == "pretrain"
            else ("masked pretraining", "SimCLR", "pretrain", SIMCLR_ONLY)
        )
        for f in foreign:
            if getattr(self, f) != getattr(PretrainConfig(), f):
                raise ConfigError(f"pretrain.{f} is {other}'s (task {other_task}); {own} does not read it")
        lo, hi = self.crop_scale
        if lo > hi:
            raise ConfigError(f"pretrain.crop_scale={[lo, hi]}: give (smallest, largest) area, e.g. [0.2, 1.0]")


SIMCLR_ONLY = ("temperature", "proj_hidden", "proj_dim", "jitter", "jitter_p", "gray_p")  # what masked does not read


@dataclass
class Config:
    task: str = "classify"  # the task family: classify | lm | translate | gan | segment | video ...
    description: str = ""  # one line shown by `deeprecipe recipes`
    data: Any = None  # a dataset config dataclass, chosen by data.name
    model: Any = None  # a model config dataclass, chosen by model.name
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    recipe: str = ""  # the recipe this config came from (set by the loader)

    def __post_init__(self):
        if self.distill.teacher and self.task != "classify":  # the one family that reads the section
            raise ConfigError(f"distill.teacher: distillation is for task classify, not '{self.task}'")
        if self.pretrain != PretrainConfig() and self.task not in ("pretrain", "masked"):  # the families reading it
            raise ConfigError(f"pretrain: the section is for tasks pretrain and masked, not '{self.task}'; remove it")


# ---------------------------------------------------------------------------------------------- parsing


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against the annotation `tp`, converting where it is safe (int -> float, list -> tuple)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        choices = typing.get_args(tp)
        if value in choices:
            return value
        near = difflib.get_close_matches(str(value), list(map(str, choices)), n=1, cutoff=0.5)
        hint = f"did you mean '{near[0]}'? (one of" if near else "use one of"
        shown = ", ".join(str(c) if c != "" else '""' for c in choices)  # "": a field's unset choice (model.size)
        raise ConfigError(f"{where}={value}: {hint} {shown}{')' if near else ''}")
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ConfigError:
                pass
        raise ConfigError(f"{where}: expected {tp}, got {value!r}")
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}")
            return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        inner = args[0] if args else Any
        out = [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    return value


def from_dict(cls: type, raw: dict | None, where: str) -> Any:
    """Build dataclass `cls` from a mapping, failing on unknown keys and wrong types."""
    raw = raw or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where or 'the config'}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        dotted = f"{where}.{key}" if where else key  # keys as a user types them (optim.lr): the top level is ""
        if key not in names:
            raise ConfigError(f"unknown key '{dotted}': {nearest(key, names)}")
        kwargs[key] = _coerce(value, hints[key], dotted)
    obj = cls(**kwargs)
    for f in dataclasses.fields(cls):
        if "range" in f.metadata:
            check_range(f"{where}.{f.name}" if where else f.name, getattr(obj, f.name), f.metadata["range"])
    return obj


def to_dict(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


# ---------------------------------------------------------------------------------------------- recipes


def list_recipes() -> dict[str, str]:
    """Built-in recipe name -> its one-line description."""
    out = {}
    for p in sorted(RECIPES_DIR.glob("*.yaml")):
        out[p.stem] = (yaml.safe_load(p.read_text()) or {}).get("description", "")
    return out


def read_recipe(recipe: str) -> tuple[dict, str]:
    """Raw mapping of a built-in recipe name or a YAML path, and the recipe's name."""
    path = Path(recipe)
    if recipe.endswith((".yaml", ".yml")) or path.is_file():
        if not path.is_file():
            raise ConfigError(
                f"recipe file {recipe} not found: give a YAML path or a built-in name (deeprecipe recipes)"
            )
        name = path.stem
    else:
        path = RECIPES_DIR / f"{recipe}.yaml"
        if not path.is_file():
            raise ConfigError(f"unknown recipe '{recipe}': {nearest(recipe, list(list_recipes()))}")
        name = recipe
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping of sections (data, model, optim, train)")
    return raw, name


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply `a.b=value` strings (values parsed as YAML) onto a raw mapping.

    Changing `data.name` or `model.name` drops the recipe's other keys of that section (they belong to the
    old data set or model), so `--set model.name=resnet` works on any recipe. A name is applied before the other
    overrides, whatever their order, so `data.path=X data.name=boxfiles` keeps data.path."""
    # a stable sort: the names first, everything else in the order given
    for item in sorted(overrides, key=lambda o: o.split("=", 1)[0].strip() not in ("data.name", "model.name")):
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like section.key=value, e.g. optim.lr=3e-4")
        key, text = item.split("=", 1)
        try:
            value = yaml.safe_load(text) if text != "" else ""
        except yaml.YAMLError:
            value = text
        section = raw.get(key.strip().split(".")[0])
        if key.strip() in ("data.name", "model.name") and isinstance(section, dict) and section.get("name") != value:
            section.clear()
        node = raw
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}': '{p}' is not a section")
        node[parts[-1]] = value
    return raw


def trains_on_cuda(raw: dict) -> bool:
    """Whether a raw config's run will train on CUDA (train.device cuda, or auto on a machine with a GPU)."""
    device = str((raw.get("train") or {}).get("device", "auto"))
    if device == "auto":
        import torch

        return torch.cuda.is_available()
    return device.startswith("cuda")


def with_overrides(raw: dict, overrides: list[str]) -> dict:
    """The recipe with the --set overrides applied; on CUDA, with its `cuda` section applied first (a recipe
    written for the CPU says there what changes on a GPU: a larger batch with fewer steps and a higher lr, say),
    so an override still wins. The run's config.yaml records the values used."""
    raw = dict(raw)
    gpu = raw.pop(GPU_KEY, None) or {}
    if not isinstance(gpu, dict):
        raise ConfigError(f"'{GPU_KEY}' must map config paths to values, e.g. train.batch_size: 512")
    plain = apply_overrides(copy.deepcopy(raw), list(overrides))
    if not gpu or not trains_on_cuda(plain):
        return plain
    given = {o.split("=", 1)[0].strip() for o in overrides}
    used = {str(k): v for k, v in gpu.items() if str(k) not in given}
    if used:
        shown = ", ".join(f"{k}={v}" for k, v in used.items())
        warnings.warn(f"training on CUDA: the recipe's {GPU_KEY} section sets {shown}", stacklevel=2)
    return apply_overrides(raw, [f"{k}={json.dumps(v)}" for k, v in used.items()] + list(overrides))


def _within(v: float, rule: str) -> bool:
    if rule.startswith(">"):
        lo = float(rule.lstrip(">= "))
        return v >= lo if rule.startswith(">=") else v > lo
    lo, hi = (float(t) for t in rule[1:-1].split(","))
    return (v >= lo if rule[0] == "[" else v > lo) and (v <= hi if rule[-1] == "]" else v < hi)


def check_range(key: str, value: Any, rule: str) -> None:
    """`value` (each item of a list or tuple) lies in `rule`, else a one-line ConfigError naming `key`."""
    items = value if isinstance(value, (list, tuple)) else [value]
    for v in items:
        if isinstance(v, (int, float)) and not isinstance(v, bool) and not _within(v, rule):
            shown = list(value) if isinstance(value, (list, tuple)) else value
            each = "each value " if isinstance(value, (list, tuple)) else ""
            raise ConfigError(f"{key}={shown}: {each}must be {'in ' if rule[0] in '[(' else ''}{rule}")


def check_train(t: TrainConfig) -> None:
    """What the ranges of single fields cannot say: a batch that splits into its micro-batches."""
    if t.batch_size % t.accum:
        raise ConfigError(f"train.batch_size={t.batch_size} is not divisible by train.accum={t.accum}")


def dump(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
