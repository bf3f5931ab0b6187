"""The family contract (deeprecipe/family.py): every registered family is a `Family` whose hooks are the
contract's names with the contract's signatures, declares its METRIC and the required hooks, and declares its
checks as the contract says; and nothing outside family.py and families/ probes a family for hooks."""

from __future__ import annotations

import dataclasses
import inspect
import re
from pathlib import Path

import pytest
import torch

import deeprecipe
from deeprecipe.checks import CHECKS
from deeprecipe.checks.core import DEFAULTS
from deeprecipe.families import FAMILIES, get_family
from deeprecipe.family import Family, ServeContext, Update
from deeprecipe.runtime import Runtime

CONTRACT = {n for n in dir(Family) if not n.startswith("_")}
REQUIRED = (("loss", "step"), ("evaluate",))  # each: at least one of these is overridden


def own_names(family: Family) -> set[str]:
    """The public names a family defines itself: in its classes below Family, and on the instance."""
    names = {n for k in type(family).__mro__ if issubclass(k, Family) and k is not Family for n in vars(k)}
    names |= set(vars(family))
    return {n for n in names if not n.startswith("_")}


def params(fn) -> list[tuple[str, object]]:
    """A callable's parameter names and kinds (not defaults, not annotations)."""
    return [(p.name, p.kind) for p in inspect.signature(fn).parameters.values()]


@pytest.fixture(params=sorted(FAMILIES))
def family(request) -> Family:
    return get_family(request.param)


def test_every_family_is_a_family(family):
    assert isinstance(family, Family) and issubclass(type(family), Family), type(family)
    assert family.name in FAMILIES and get_family(family.name).name == family.name


def test_a_family_defines_only_names_of_the_contract(family):
    """A misspelt hook ('evalute') would silently never run: every public name must be the contract's."""
    unknown = sorted(own_names(family) - CONTRACT)
    assert not unknown, (
        f"{type(family).__name__} ({family.name}) defines {unknown}, which deeprecipe/family.py does not: "
        "rename a misspelt hook, or make a helper private (_name) or a module-level function"
    )


def test_overridden_hooks_keep_the_contract_signature(family):
    """Each overridden hook takes the contract's parameters: the same names, the same kinds, in order (defaults and
    annotations may differ). Compared on bound methods, so a staticmethod hook drops the contract's self."""
    base, checked = Family(), 0
    for name in sorted(own_names(family) & CONTRACT):
        want, got = getattr(base, name), getattr(family, name)
        assert callable(want) == callable(got), f"{family.name}.{name}: a hook in one place, data in the other"
        if not callable(want):
            continue
        checked += 1
        assert params(got) == params(want), (
            f"{family.name}.{name}{inspect.signature(got)} does not match the contract's "
            f"{name}{inspect.signature(want)}"
        )
    assert checked >= len(REQUIRED)


def test_required_hooks_are_overridden(family):
    cls = type(family)
    for names in REQUIRED:
        own = [n for n in names if getattr(cls, n) is not getattr(Family, n)]
        assert own, f"{family.name} must override {' or '.join(names)}"


def test_metric_names_a_value_and_a_direction(family):
    m = family.METRIC
    assert isinstance(m, tuple) and len(m) == 2, m
    name, mode = m
    assert isinstance(name, str) and name, f"{family.name}: METRIC needs the name of a value evaluate() returns"
    assert mode in ("max", "min"), m


def test_check_declarations_follow_the_contract(family):
    assert isinstance(family.CHECKS_SKIP, dict) and isinstance(family.EXTRA_CHECKS, dict)
    for key, why in family.CHECKS_SKIP.items():
        assert isinstance(key, str) and isinstance(why, str) and why, (key, why)
        assert key in CHECKS, f"{family.name} skips '{key}', which is not a built-in check ({', '.join(CHECKS)})"
    for key, check in family.EXTRA_CHECKS.items():
        assert isinstance(key, str) and callable(check), (key, check)
    assert set(family.CHECK_DEFAULTS) <= set(DEFAULTS), sorted(set(family.CHECK_DEFAULTS) - set(DEFAULTS))
    assert all(isinstance(v, int) and v > 0 for v in family.CHECK_DEFAULTS.values()), family.CHECK_DEFAULTS


def test_a_misspelt_hook_or_signature_is_caught():
    """The oracle for the two tests above: a family with a typo and one with another signature fail them."""

    class Typo(Family):
        METRIC = ("acc", "max")

        def loss(self, model, batch, cfg, part):
            return None, {}

        def evalute(self, model, data, split, cfg, rt, final):  # misspelt
            return {}

    class Reordered(Typo):
        def evaluate(self, model, data, cfg, split, rt, final):  # split and cfg swapped
            return {}

    assert own_names(Typo()) - CONTRACT == {"evalute"}
    with pytest.raises(AssertionError, match="does not match"):
        test_overridden_hooks_keep_the_contract_signature(Reordered())


# ------------------------------------------------------------------------------------------ typed values

TYPED = {"rt": "Runtime", "update": "Update", "ctx": "ServeContext"}  # parameter -> its type in every hook


def untyped(family: Family) -> list[str]:
    """The hook parameters named in TYPED that do not carry their type (the contract's own hooks included)."""
    bad = []
    for name in sorted(CONTRACT):
        fn = getattr(family, name)
        if not callable(fn) or isinstance(fn, type):
            continue
        for p in inspect.signature(fn).parameters.values():
            want = TYPED.get(p.name)
            if want and p.annotation not in (want, f"{want} | None", globals()[want]):
                bad.append(f"{name}({p.name}: {p.annotation})")
    return bad


def test_hooks_type_the_runtime_the_update_and_the_serve_context(family):
    assert not untyped(Family()), "deeprecipe/family.py"
    assert not untyped(family), f"{family.name}: annotate {untyped(family)} as the contract does"


def test_an_untyped_hook_is_caught():
    class Loose(Family):
        def evaluate(self, model, data, split, cfg, rt, final):
            return {}

    assert untyped(Loose()) == ["evaluate(rt: <class 'inspect._empty'>)"]


def members(proto: type) -> set[str]:
    return {n for n in vars(proto) if not n.startswith("_")} | set(proto.__annotations__)


def test_the_engine_and_the_server_give_what_the_contract_types():
    """engine/loop.py Update and serve/server.py ServeContext have every member of the contract's protocols, each
    method with the protocol's parameters."""
    pytest.importorskip("fastapi")
    from deeprecipe.engine.loop import Update as LoopUpdate
    from deeprecipe.serve.server import ServeContext as ServerContext

    update = vars(LoopUpdate([], None, 1, None, Runtime(torch.device("cpu"), None)))  # what __init__ sets
    fields = {f.name for f in dataclasses.fields(ServerContext)}
    for proto, impl, data in ((Update, LoopUpdate, set(update)), (ServeContext, ServerContext, fields)):
        for name in sorted(members(proto)):
            if callable(getattr(proto, name, None)):
                assert params(getattr(impl, name)) == params(getattr(proto, name)), f"{proto.__name__}.{name}"
            else:
                assert name in data or hasattr(impl, name), f"{impl} has no {name} ({proto.__name__})"
    assert members(Update) >= {"names", "backward", "step"} and members(ServeContext) >= {"model", "batcher"}


# ------------------------------------------------------------------------------------------ no hook probing

PROBES = re.compile(r"\b(?:hasattr|getattr)\(\s*(?:self\.)?(?:family|task)\b|\bctx\.task\b")


def test_no_code_outside_the_families_probes_a_family_for_hooks():
    """The engine, checks, export, serve and the CLI call hooks through the contract (every hook has a default
    there); only family.py and families/ may look at a family's attributes."""
    root = Path(list(deeprecipe.__path__)[0])
    hits = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if rel == Path("family.py") or rel.parts[0] == "families":
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if PROBES.search(line):
                hits.append(f"{rel}:{i}: {line.strip()}")
    assert not hits, "call the hook (add a default to deeprecipe/family.py) instead of probing:\n" + "\n".join(hits)
    assert PROBES.search("if hasattr(family, 'predict'):") and PROBES.search("fn = getattr(task, name, None)")
    assert PROBES.search("ctx.task.loss(m, b)") and not PROBES.search("cfg.task")
