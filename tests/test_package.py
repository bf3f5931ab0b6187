"""Packaging: every source folder is a regular package, so `pip install .` (not only -e) ships all of it; a missing
optional dependency names the extra that installs it."""

from __future__ import annotations

import ast
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


# Packages of an extra that the test environment (.[dev]) does not install: their import name -> distribution.
NOT_INSTALLED = {"cv2": "opencv-python-headless"}


def _declared() -> dict[str, set[str]]:
    """pyproject.toml's requirements by extra ("" for the core), as canonical distribution names."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    groups = {"": project["dependencies"], **project["optional-dependencies"]}
    return {k: {canonicalize_name(Requirement(r).name) for r in v} for k, v in groups.items()}


def _imports(tree: ast.AST):
    """(top-level module, line, guarded, in a function named serve*, require's extra or None) of every import,
    function-local ones and `require("module", "extra")` calls included. Guarded: inside try/except ImportError."""
    out = []

    def visit(node, guarded, serve):
        if isinstance(node, ast.Try) and any(
            h.type is not None and "ImportError" in ast.unparse(h.type) for h in node.handlers
        ):
            for child in node.body:
                visit(child, True, serve)
            for child in [*node.handlers, *node.orelse, *node.finalbody]:
                visit(child, guarded, serve)
            return
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            serve = serve or node.name.startswith("serve")
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        for n in names:
            out.append((n.split(".")[0], node.lineno, guarded, serve, None))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "require":
            args = [a.value for a in node.args[:2] if isinstance(a, ast.Constant)]
            if len(args) == 2:
                out.append((args[0].split(".")[0], node.lineno, True, serve, args[1]))
        for child in ast.iter_child_nodes(node):
            visit(child, guarded, serve)

    visit(tree, False, False)
    return out


def test_every_imported_package_is_declared_where_it_is_needed():
    """Outside the server (serve/, cli/serve.py) and the families' serve hooks (serve*), an import of a package that
    only an extra installs is checked (core.require or try/except ImportError) in its file; everything else is a
    core dependency; require names the extra that holds the package."""
    import importlib.metadata

    from packaging.utils import canonicalize_name

    declared = _declared()
    every = set().union(*declared.values())
    dists = importlib.metadata.packages_distributions()
    root = Path(list(deeprecipe.__path__)[0])
    wrong = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        found = _imports(ast.parse(path.read_text()))
        checked = set()
        for mod, _, guarded, _, _ in found:
            if guarded:
                checked.add(mod)
        for mod, line, _, serve, extra in found:
            if mod in sys.stdlib_module_names or mod == "deeprecipe":
                continue
            names = dists.get(mod) or [NOT_INSTALLED.get(mod, mod)]
            dist = canonicalize_name(names[0])
            where = f"{rel}:{line} imports {mod} ({dist})"
            if dist not in every:
                wrong.append(f"{where}: declared nowhere in pyproject.toml")
            elif extra is not None and dist not in declared.get(extra, ()):
                wrong.append(f"{where}: require names the extra '{extra}', which does not install it")
            elif dist not in declared[""] and not (
                rel.startswith("serve/") or rel == "cli/serve.py" or serve or mod in checked
            ):
                wrong.append(f"{where}: only an extra installs it and nothing checks for it (use core.require)")
    assert not wrong, "\n".join(wrong)
