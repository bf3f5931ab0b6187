"""The leaf of the package: the error types and DataSpec. Imports nothing from deeprecipe; everything may import it.

Errors a user can fix derive from UserError: the CLI prints them as one line and exits 2 (`--debug` shows the
traceback); `require` imports an optional dependency or names the extra that installs it. DataSpec is what a model
builder needs to know about the data; it is saved as `spec.json` in a run folder so that predict, export and serve
rebuild the model without the data.
"""

from __future__ import annotations

import difflib
import importlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any


class UserError(Exception):
    """Any problem the user can fix: printed as one line by the CLI, with a non-zero exit."""


class ConfigError(UserError):
    """A config problem a user can fix; the CLI prints it as one line."""


class DataError(UserError):
    """A data problem a user can fix; the CLI prints it as one line."""


@dataclass
class DataSpec:
    """What a model builder needs to know about the data (JSON-serializable: saved as spec.json)."""

    num_classes: int = 0
    class_names: list[str] = field(default_factory=list)
    in_channels: int = 0
    image_size: tuple[int, int] = (0, 0)  # (H, W)
    mean: tuple[float, ...] = ()  # per-channel mean of the train split, in [0, 1] units
    std: tuple[float, ...] = ()
    vocab_size: int = 0
    extra: dict[str, Any] = field(default_factory=dict)  # family-specific facts (tokenizer, frames, ...)


def nearest(key: str, valid: list[str]) -> str:
    """'did you mean X?' for the closest valid name, else the list of valid names."""
    near = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    return f"did you mean '{near[0]}'?" if near else f"valid keys: {', '.join(valid)}"


def lookup(registry: dict[str, Any], name: str, what: str, key: str, user_entry: Any = None) -> Any:
    """The entry registered as `name` (`path/to/file.py:Name` gives `user_entry`), or a ConfigError that
    names the nearest registered name."""
    if ":" in name and user_entry is not None:
        return user_entry
    if name not in registry:
        near = difflib.get_close_matches(name, list(registry), n=1)
        hint = f"did you mean '{near[0]}'?" if near else f"known: {', '.join(registry)}"
        raise ConfigError(f"unknown {what} '{key}={name}': {hint}")
    return registry[name]


def require(module: str, extra: str, purpose: str = "") -> ModuleType:
    """The optional dependency `module` (e.g. "uvicorn"), imported; if it or one of its own dependencies is
    missing, a UserError naming the extra of pyproject.toml that installs it (e.g. "serve")."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        # e.name is the module that failed to import: `module` itself or something it needs
        missing = e.name or module
        need = f" (needed for {purpose})" if purpose else ""
        raise UserError(f"{missing} is not installed{need}: pip install 'deeprecipe[{extra}]'") from None


def cache_dir() -> Path:
    """The folder for what deeprecipe measures or trains once per machine and reuses (the precision probe, the
    GAN families' feature nets): $DEEPRECIPE_CACHE, else ~/.cache/deeprecipe."""
    return Path(os.environ.get("DEEPRECIPE_CACHE") or Path.home() / ".cache" / "deeprecipe")


def one_line(e: BaseException) -> str:
    """The message of `e` on one line. A DataLoader worker's error arrives wrapped with the worker's traceback
    ('Caught DataError in DataLoader worker process 0. Original Traceback ...'): keep only its last line."""
    lines = [ln for ln in str(e).splitlines() if ln.strip()]
    if not lines:
        return ""
    if "Traceback" in str(e):
        return lines[-1].split(": ", 1)[-1].strip()
    return lines[0]
