"""Small helpers shared by the registries and the CLI."""

from __future__ import annotations

import importlib.util
import inspect
import sys
from pathlib import Path
from typing import Any

from deeprecipe.core import UserError


def load_object(ref: str) -> Any:
    """`path/to/file.py:Name` -> the object Name defined in that file (the file is imported, never unpickled)."""
    path, _, attr = ref.rpartition(":")
    p = Path(path)
    if not p.is_file():
        raise UserError(f"'{ref}': file {path} not found (expected path/to/file.py:Name)")
    mod_name = f"deeprecipe_user_{abs(hash(str(p.resolve())))}"
    if mod_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(mod_name, p)
        module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
        sys.modules[mod_name] = module
        try:
            spec.loader.exec_module(module)  # type: ignore[union-attr]
        except Exception as e:
            del sys.modules[mod_name]
            raise UserError(f"'{ref}': importing {path} failed: {type(e).__name__}: {e}") from e
    obj = getattr(sys.modules[mod_name], attr, None)
    if obj is None:
        raise UserError(f"'{ref}': {path} defines no '{attr}'")
    return obj


def call_with(fn: Any, args: dict, available: dict) -> Any:
    """Call fn(**args), adding those of `available` that fn's signature names and args does not set."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        params = {}
    extra = {k: v for k, v in available.items() if k in params and k not in args}
    return fn(**args, **extra)
