"""Loading a recipe: read it, apply the dotted overrides, and resolve the data and model names through the
registries into a typed Config.

config.py is a leaf (the dataclasses, parsing, overrides); this module sits above the data and model registries,
which pick the config class of the ``data`` and ``model`` sections by their ``name``.
"""

from __future__ import annotations

from deeprecipe.config import (
    GPU_KEY,
    TUNE_KEY,
    Config,
    check_train,
    from_dict,
    read_recipe,
    with_overrides,
)
from deeprecipe.core import ConfigError
from deeprecipe.data import data_config_class
from deeprecipe.models import model_config_class


def resolve(raw: dict, name: str = "") -> Config:
    """Typed Config from a raw mapping (a recipe with its overrides applied, or a run's config.yaml); `name` is
    the recipe's name, recorded in cfg.recipe unless the mapping has one."""
    raw = dict(raw)
    raw.pop(GPU_KEY, None)  # applied by with_overrides
    if not isinstance(raw.pop(TUNE_KEY, None) or {}, dict):  # read by `deeprecipe tune` only (engine/tune.py)
        raise ConfigError(f"'{TUNE_KEY}' must map config paths to ranges or choices, e.g. optim.lr: log:1e-4:1e-2")
    sections = {}
    for key, default in (("data", "digits"), ("model", "cnn")):
        sec = raw.pop(key, None) or {}
        if not isinstance(sec, dict):
            raise ConfigError(f"'{key}' must be a mapping with a name (e.g. {key}.name={default}), got {sec!r}")
        if not isinstance(sec.get("name", default), str):
            raise ConfigError(f"{key}.name: expected a string, got {sec['name']!r}")
        sections[key] = dict(sec)
    raw.setdefault("recipe", name)
    cfg = from_dict(Config, raw, "")
    cfg.data = from_dict(data_config_class(sections["data"].get("name", "digits")), sections["data"], "data")
    cfg.model = from_dict(model_config_class(sections["model"].get("name", "cnn")), sections["model"], "model")
    check_train(cfg.train)
    ft = cfg.finetune
    pretrained = getattr(cfg.model, "weights", "")  # a zoo model's start (models/pretrained.py)
    if not (ft.init_from or pretrained) and (ft.freeze or ft.head_lr != 1 or ft.backbone_lr != 1 or ft.unfreeze_after):
        raise ConfigError(
            "finetune.freeze, head_lr, backbone_lr and unfreeze_after need a start: finetune.init_from "
            "(--init-from) or a zoo model's model.weights"
        )
    return cfg


def load(recipe: str, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """The typed Config of a built-in recipe name or a YAML path, with `section.key=value` overrides applied."""
    raw, name = read_recipe(recipe)
    return resolve(with_overrides(raw, list(overrides)), name)
