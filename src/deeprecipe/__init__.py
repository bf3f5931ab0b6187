"""deeprecipe: train, check, evaluate, export and serve the classic deep-learning systems.

The Python API (deeprecipe/api.py) is re-exported here lazily: `import deeprecipe` and `deeprecipe --version`
import neither torch nor a family; the first use of `deeprecipe.train` (or any name below) imports the API.

    import deeprecipe
    run = deeprecipe.train("digits-cnn", {"train.steps": 200})
    run.evaluate(), run.predict("seven.png"), deeprecipe.load(run.dir).export("onnx")
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from deeprecipe.api import Run, check, configure, dataset, load, model, recipes, time_step, train

__all__ = ["Run", "check", "configure", "dataset", "load", "model", "recipes", "time_step", "train"]


def __getattr__(name: str) -> Any:
    # a module __getattr__ (PEP 562) runs only for names not found; other names (submodules) raise AttributeError,
    # so `from deeprecipe import config` still imports the submodule
    if name in __all__:
        import deeprecipe.api

        value = getattr(deeprecipe.api, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'deeprecipe' has no attribute '{name}'")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
