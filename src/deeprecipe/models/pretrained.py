"""Pretrained starts: published weights into a registered model, and the inputs those weights expect.

`model.weights` names where a model's first weights come from:

- a local file: `.safetensors`, or a `.pth`/`.pt` state dict read with `torch.load(weights_only=True)` (never
  unpickled); a training checkpoint's `state_dict` / `model` / `state_dict_ema` entry is unwrapped and wrapper
  prefixes (`module.`, `_orig_mod.`) dropped, so torchvision's and timm's published files load as they are;
- a published name (`IMAGENET1K_V1`, `DEFAULT`, ... for a torchvision model; a pretrained tag for a timm one),
  fetched by that library's own mechanism into its usual cache (torchvision: torch.hub's
  `$TORCH_HOME/hub/checkpoints/<file>`; timm: the Hugging Face hub cache) when the machine is online. Offline
  with no cached file, one line names the file expected and where to put it.

Tensors load by name and shape (`load`); every load is reported as a warning (the CLI's `note:` line) with the
counts of loaded, missing, unexpected and shape-mismatched tensors: a new head sized to the data's classes is the
expected mismatch. `follow_weights` records in the DataSpec the inputs the weights were trained on (mean/std, RGB
channels, gray data repeated to three channels, their crop size), and the run saves that spec as spec.json, so
predict, serve and export prepare images the same way.

A classifier exposes its head through timm's API, `get_classifier()` / `reset_classifier(n)` (models/head.py);
torchvision's nets get it from `mix_in`, keeping their published names.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from urllib.parse import urlparse

import torch
import torch.nn as nn

from deeprecipe.core import ConfigError, DataSpec, UserError
from deeprecipe.models.head import classifier as classifier  # re-exported: the head as the model names it
from deeprecipe.models.head import fresh_like

FILE_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")
WRAPPERS = ("state_dict", "model", "state_dict_ema", "model_state_dict")  # keys checkpoints keep a state dict under
PREFIXES = ("module.", "_orig_mod.")  # what DDP and torch.compile add to parameter names


def is_file(weights: str) -> bool:
    """Whether model.weights names a file (a path or a weights suffix) rather than a published name."""
    return weights.endswith(FILE_SUFFIXES) or os.sep in weights or "/" in weights or Path(weights).is_file()


def read_file(path: str, where: str = "") -> dict[str, torch.Tensor]:
    """A weights file -> name -> tensor, read without unpickling (a checkpoint dict's state dict unwrapped, wrapper
    prefixes dropped). `where` starts the errors (default `model.weights=PATH`)."""
    where = where or f"model.weights={path}"
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"{where}: no such file (give a .safetensors/.pth file or a published weights name)")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return strip(load_file(str(p)))
        except Exception as e:
            raise UserError(f"{where}: not a readable safetensors file ({first_line(e)})") from None
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(
            f"{where}: not a weights-only PyTorch state dict ({first_line(e)}); "
            "save it with torch.save(model.state_dict(), path) or as .safetensors"
        ) from None
    for key in WRAPPERS:
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"{where}: expected a mapping of parameter names to tensors (a state dict)")
    return strip(obj)


def first_line(e: Exception) -> str:
    """An exception's message in one short line (a library's may span many, or be empty)."""
    lines = str(e).strip().splitlines()
    return lines[0][:160] if lines else type(e).__name__


def strip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in state.items():
        for pre in PREFIXES:
            k = k.removeprefix(pre)
        out[k] = v
    return out


def hub_file(url: str) -> Path:
    """Where torch.hub keeps (and looks for) the file of `url`: $TORCH_HOME/hub/checkpoints/<file name>."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)


def torchvision_state(arch: str, name: str, progress: bool = True) -> dict[str, torch.Tensor]:
    """The state dict of torchvision's published weights `name` for `arch`, through torchvision's own mechanism
    (torch.hub's cache; a download, hash-checked, when the file is not there yet)."""
    w = torchvision_weights(arch, name)
    path = hub_file(w.url)
    try:
        state = w.get_state_dict(progress=progress, check_hash=True, map_location="cpu", weights_only=True)
    except Exception as e:  # offline (URLError, OSError, ...) or a damaged download: say which file is expected
        if path.is_file():
            raise UserError(f"model.weights={name}: cannot read {path} ({first_line(e)})") from None
        raise UserError(
            f"model.weights={name}: {path.name} is not in torch.hub's cache and could not be downloaded "
            f"({type(e).__name__}); put {w.url} at {path}, or give the file itself as model.weights"
        ) from None
    return strip(state)


def torchvision_weights(arch: str, name: str):
    """The torchvision weights entry `name` (IMAGENET1K_V1, DEFAULT, ...) of `arch`."""
    from torchvision.models import get_model_weights

    enum = get_model_weights(arch)
    try:
        return enum[name]
    except KeyError:
        raise ConfigError(
            f"model.weights={name}: not a file, nor a published weights name of torchvision's {arch} "
            f"(one of {', '.join(['DEFAULT', *(w.name for w in enum)])})"
        ) from None


def torchvision_inputs(arch: str, name: str) -> dict:
    """What the weights' images looked like (torchvision's weights.transforms()): mean, std, crop size (a
    segmenter's weights have none: they saw whole images resized)."""
    w = torchvision_weights(arch, name)
    t = w.transforms()
    size = {"size": int(t.crop_size[0])} if getattr(t, "crop_size", None) else {}
    return {"mean": list(t.mean), "std": list(t.std), **size, "resize": int(t.resize_size[0])}


def best_prefix(state: dict[str, torch.Tensor], own: dict[str, torch.Tensor]) -> tuple[str, str]:
    """(prefix dropped from the source's names, prefix added): the pair of top-level names under which most
    tensors match by name and shape; ("", "") unless another pair matches more. So a classifier's weights go into
    a segmenter's `backbone.` or a U-Net's `encoder.`, and MobileNet's `features.` into a segmenter's `backbone.`."""

    def count(drop: str, add: str) -> int:
        return sum(
            1
            for k, v in state.items()
            if k.startswith(drop) and (n := add + k[len(drop) :]) in own and own[n].shape == v.shape
        )

    drops = {""} | {k.split(".")[0] + "." for k in state}
    adds = {""} | {k.split(".")[0] + "." for k in own}
    return max(((d, a) for d in sorted(drops) for a in sorted(adds)), key=lambda p: (count(*p), p == ("", "")))


def reprefixed(state: dict[str, torch.Tensor], own: dict[str, torch.Tensor]):
    """(`state` with best_prefix's renaming applied, drop, add)."""
    drop, add = best_prefix(state, own)
    return {(add + k[len(drop) :] if k.startswith(drop) else k): v for k, v in state.items()}, drop, add


def load(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> dict[str, list]:
    """Copy the tensors of `state` that match `model` by name and shape (after best_prefix's renaming), in place;
    warn the counts (loaded, missing, unexpected, shape-mismatched) and return the names of each."""
    own = model.state_dict()
    state, drop, add = reprefixed(state, own)
    renamed = f" (names {drop or ''}* read as {add or ''}*)" if (drop, add) != ("", "") else ""
    fit = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    report = {
        "loaded": list(fit),
        "missing": [k for k in own if k not in state],
        "unexpected": [k for k in state if k not in own],
        "mismatched": [(k, tuple(state[k].shape), tuple(own[k].shape)) for k in own if k in state and k not in fit],
    }
    if not fit:
        raise UserError(
            f"model.weights={source}: no tensor matches this model by name and shape (the file's names look like "
            f"{list(state)[:3]}, the model's like {list(own)[:3]})"
        )
    model.load_state_dict(fit, strict=False)
    # what kept its fresh init (the new head): fine-tuning never freezes it (engine/finetune.py apply)
    model.pretrained_fresh = report["missing"] + [k for k, _, _ in report["mismatched"]]
    mism = ", ".join(f"{k} {list(a)}->{list(b)}" for k, a, b in report["mismatched"][:4])
    warnings.warn(
        f"model.weights {source}{renamed}: loaded {len(fit)} tensors, missing {len(report['missing'])}, unexpected "
        f"{len(report['unexpected'])}, shape-mismatched {len(report['mismatched'])}"
        + (f" ({mism}{' ...' if len(report['mismatched']) > 4 else ''}: kept fresh)" if mism else "")
        + (f"; missing {', '.join(report['missing'][:4])}" if report["missing"] else ""),
        stacklevel=2,
    )
    return report


def torchvision_start(
    net: nn.Module, spec: DataSpec, weights: str, arch: str, progress: bool = True, rename=None
) -> nn.Module:
    """`net` started from `weights` (a file, taken for torchvision's `arch`: its layout, its inputs; or a name
    of arch's published weights), the spec following their inputs (follow_weights); "" leaves the fresh init.
    `rename` maps a published name to the net's (a torchvision backbone inside another model)."""
    file = bool(weights) and is_file(weights)
    inputs = torchvision_inputs(arch, "DEFAULT" if file else weights) if weights else None  # a bad name fails here
    if weights:
        state = read_file(weights) if file else torchvision_state(arch, weights, progress)
        load(net, {rename(k): v for k, v in state.items()} if rename else state, weights)
    follow_weights(spec, inputs, weights)
    return net


def follow_weights(spec: DataSpec, inputs: dict | None, weights: str) -> None:
    """Make the spec ask for three-channel inputs (gray data is repeated to RGB by image_ops.normalize) and, with
    `inputs` (the weights' mean, std and size), normalize the way the weights were trained; the run saves the
    spec as spec.json, so predict, serve and export do the same."""
    if inputs:
        spec.mean, spec.std = tuple(inputs["mean"]), tuple(inputs["std"])
        spec.extra["inputs"] = {"weights": weights, "channels": "RGB", **inputs}
        size = inputs.get("size")
        if size and spec.image_size and max(spec.image_size) and tuple(spec.image_size) != (size, size):
            warnings.warn(
                f"model.weights {weights} were trained on {size} x {size} RGB crops; the data's images are "
                f"{spec.image_size[0]} x {spec.image_size[1]} (data.image_size={size} gives the weights the size "
                "they know)",
                stacklevel=2,
            )
    elif len(spec.mean) == 1:  # a three-channel net on gray data: the gray image in every channel
        spec.mean, spec.std = spec.mean * 3, spec.std * 3


# ------------------------------------------------------------------------------------------ the head


class ClassifierAPI:
    """timm's classifier API for a torchvision net (mixed into its class): the head is its last nn.Linear."""

    @property
    def head_path(self) -> str:
        return [n for n, m in self.named_modules() if isinstance(m, nn.Linear)][-1]

    def get_classifier(self) -> nn.Linear:
        return self.get_submodule(self.head_path)

    def reset_classifier(self, num_classes: int) -> None:
        """A fresh head for `num_classes` classes (small weights, zero bias: the loss starts at ln C)."""
        self.set_submodule(self.head_path, fresh_like(self.get_classifier(), num_classes))


_MIXED: dict[tuple[type, type], type] = {}


def mix_in(net: nn.Module, api: type = ClassifierAPI) -> nn.Module:
    """The same net (same modules, same state-dict names: published weights still load by name) whose class is
    a subclass of its own with `api` mixed in first (its methods win: a DenseLogits forward)."""
    cls = type(net)
    if (cls, api) not in _MIXED:
        _MIXED[cls, api] = type(cls.__name__, (api, cls), {"__module__": cls.__module__})
    net.__class__ = _MIXED[cls, api]
    return net
