"""Packaging: every source folder is a regular package, so `pip install .` (not only -e) ships all of it."""

from __future__ import annotations

from pathlib import Path

import deeprecipe


def test_every_source_folder_is_a_package():
    root = Path(list(deeprecipe.__path__)[0])
    folders = {root, *(p.parent for p in root.rglob("*.py") if "__pycache__" not in p.parts)}
    missing = sorted(str(d.relative_to(root.parent)) for d in folders if not (d / "__init__.py").is_file())
    assert not missing, f"add an __init__.py to: {missing} (setuptools' find_packages skips these folders)"


def test_recipes_ship_with_the_package():
    assert list((Path(list(deeprecipe.__path__)[0]) / "recipes").glob("*.yaml"))
