"""Task registry: a plain dict from a task name to the module that implements it (see engine/loop.py)."""

from __future__ import annotations

import importlib
from types import ModuleType

from deeprecipe.config import ConfigError

TASKS: dict[str, str] = {
    "classify": "deeprecipe.tasks.classify",
    "lm": "deeprecipe.tasks.lm",
    "translate": "deeprecipe.tasks.translate",
    "segment": "deeprecipe.tasks.segment",
    "video": "deeprecipe.tasks.video",
    "gan": "deeprecipe.tasks.gan",
}


def get_task(name: str) -> ModuleType:
    if name not in TASKS:
        raise ConfigError(f"unknown task '{name}': known tasks are {', '.join(TASKS)}")
    return importlib.import_module(TASKS[name])
