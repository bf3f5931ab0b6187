"""Family registry: a plain dict from a task name (cfg.task) to the `module:Class` of its Family subclass.

A family is one package in this folder (its hooks, metrics, plots, checks and endpoints; a verb of its own lives in
cli/); adding one is one line here. The contract every family follows is deeprecipe/family.py.
"""

from __future__ import annotations

import importlib

from deeprecipe.core import lookup
from deeprecipe.family import Family

FAMILIES: dict[str, str] = {
    "classify": "deeprecipe.families.classify:Classify",
    "lm": "deeprecipe.families.lm:LanguageModel",
    "translate": "deeprecipe.families.translate:Translate",
    "segment": "deeprecipe.families.segment:Segment",
    "video": "deeprecipe.families.video:Video",
    "gan": "deeprecipe.families.gan:GAN",
    "textclass": "deeprecipe.families.textclass:TextClassify",
    "detect": "deeprecipe.families.detect:Detect",
    "img2img": "deeprecipe.families.img2img:Img2Img",
    "drive": "deeprecipe.families.drive:Drive",
    "pretrain": "deeprecipe.families.pretrain:Pretrain",
    "masked": "deeprecipe.families.masked:Masked",
}


def get_family(name: str) -> Family:
    """A new instance of the family registered as `name` (a family may keep state for one run: a GAN's scorer)."""
    module, _, cls = lookup(FAMILIES, name, "task", "task").partition(":")
    family = getattr(importlib.import_module(module), cls)()
    family.name = name
    return family
