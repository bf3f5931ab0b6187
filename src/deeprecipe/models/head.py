"""One classifier API for every model whose last layer makes the class scores: timm's `get_classifier()` and
`reset_classifier(n)`, so fine-tuning (engine/finetune.py) and the checks (checks/core.py) ask the model for its
head and never guess a layer by its name.

A model of this package names that layer `head` and mixes in `Classifier` (`class CNN(Classifier, nn.Module)`);
torchvision's nets keep their published names and get the same two methods from models/pretrained.py (`mix_in`);
timm's models have them already. `HasClassifier` is the type all of them share.

Models with no single classifier do not have the API: a GAN's generator and critic, a language model or translator
(whose head is tied to the token embeddings), a detector (several heads) and the image-to-image generators.

A head renamed since a checkpoint was written (ResNet's `fc`, FCN's `score`) is listed in the model's `OLD_NAMES`;
`rename_old` reads those tensors under the new name, in every `load_state_dict` of the model and in fine-tuning's
match by name (`current_names`), so old run folders and weight files still load.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
import torch.nn as nn

HEAD = "head"


@runtime_checkable
class HasClassifier(Protocol):
    """A model with timm's classifier API."""

    def get_classifier(self) -> nn.Module: ...

    def reset_classifier(self, num_classes: int) -> None: ...


def classifier(model: nn.Module) -> nn.Module | None:
    """The layer that makes the model's class scores (`get_classifier()`); None for a model without a classifier."""
    return model.get_classifier() if isinstance(model, HasClassifier) else None


def fresh_like(layer: nn.Module, num_classes: int) -> nn.Module:
    """A new class-scoring layer shaped like `layer` (a Linear, or a Conv of any dimension) with `num_classes`
    outputs, on its device: small weights and zero bias, so every class starts equally likely (loss ln C)."""
    if isinstance(layer, nn.Linear):
        new = nn.Linear(layer.in_features, num_classes, bias=layer.bias is not None)
    elif isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        new = type(layer)(
            layer.in_channels, num_classes, layer.kernel_size, layer.stride, layer.padding, bias=layer.bias is not None
        )
    else:
        raise TypeError(f"a head must be a Linear or a Conv layer, not {type(layer).__name__}")
    nn.init.trunc_normal_(new.weight, std=0.01)
    if new.bias is not None:
        nn.init.zeros_(new.bias)
    return new.to(layer.weight.device, layer.weight.dtype)


def rename_old(state: dict[str, torch.Tensor], prefix: str, old_names: tuple[str, ...]) -> None:
    """Read the tensors of a head saved under an old name (`<prefix><old>.*`) as `<prefix>head.*`, in place; a
    state that already has `<prefix>head.*` is left as it is."""
    if not old_names or any(k.startswith(f"{prefix}{HEAD}.") for k in state):
        return
    for old in old_names:
        for k in [k for k in state if k.startswith(f"{prefix}{old}.")]:
            state[f"{prefix}{HEAD}.{k[len(prefix) + len(old) + 1 :]}"] = state.pop(k)


def current_names(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` with every old head name of `model` and its submodules read as `head` (for loaders that match
    tensors by name before load_state_dict: engine/finetune.py)."""
    state = dict(state)
    for name, m in model.named_modules():
        if isinstance(m, Classifier):
            rename_old(state, f"{name}." if name else "", m.OLD_NAMES)
    return state


class Classifier:
    """Mixed in first by a model whose class scores come from its `head` layer (Linear or Conv): timm's API."""

    OLD_NAMES: tuple[str, ...] = ()  # names the head had in earlier versions (their checkpoints still load)

    def stage_outputs(self) -> list[nn.Module]:
        """The modules whose outputs are the net's stage feature maps (B, C, H, W), first to last: what attention
        transfer (distill.attention) matches between a student and its teacher. [] where there are none."""
        return []

    def get_classifier(self) -> nn.Module:
        """The layer that makes the class scores: (B, D) -> (B, classes), or (B, D, ...) -> (B, classes, ...)."""
        return self.head

    def reset_classifier(self, num_classes: int) -> None:
        """A fresh head for `num_classes` classes (small weights, zero bias: the loss starts at ln C)."""
        self.head = fresh_like(self.head, num_classes)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # torch's own hook for reading older state dicts (BatchNorm uses it for num_batches_tracked): it runs
        # before this module's and its children's tensors are read, on every load_state_dict
        rename_old(state_dict, prefix, self.OLD_NAMES)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
