"""Packaging: every source folder is a regular package, so `pip install .` (not only -e) ships all of it; a missing
optional dependency names the extra that installs it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

import deeprecipe
from deeprecipe.core import UserError, require


def test_every_source_folder_is_a_package():
    root = Path(list(deeprecipe.__path__)[0])
    folders = {root, *(p.parent for p in root.rglob("*.py") if "__pycache__" not in p.parts)}
    missing = sorted(str(d.relative_to(root.parent)) for d in folders if not (d / "__init__.py").is_file())
    assert not missing, f"add an __init__.py to: {missing} (setuptools' find_packages skips these folders)"


def test_recipes_ship_with_the_package():
    assert list((Path(list(deeprecipe.__path__)[0]) / "recipes").glob("*.yaml"))


def test_require_returns_an_installed_module():
    import json

    assert require("json", "serve") is json


def test_require_names_the_extra_of_a_missing_module(monkeypatch):
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # `import uvicorn` now raises ImportError
    with pytest.raises(UserError) as e:
        require("uvicorn", "serve", "deeprecipe serve")
    assert str(e.value) == "uvicorn is not installed (needed for deeprecipe serve): pip install 'deeprecipe[serve]'"


def test_require_names_the_missing_dependency_of_an_installed_module(tmp_path, monkeypatch):
    (tmp_path / "needs_missing.py").write_text("import no_such_module_here\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(UserError, match=r"^no_such_module_here is not installed: pip install 'deeprecipe\[drive\]'$"):
        require("needs_missing", "drive")
