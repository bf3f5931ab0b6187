"""One head API for every classifier (models/head.py): each registered model that makes class scores (images,
pixels, clips, texts) gives its scoring layer through `get_classifier()` and re-sizes it with `reset_classifier(n)`;
the others have no such API; and a checkpoint written when a head had its old name (`fc`, `score`) still loads."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from deeprecipe.checks.core import init_head_from_priors
from deeprecipe.core import DataSpec
from deeprecipe.engine.finetune import head_name, load_matching
from deeprecipe.models import MODELS
from deeprecipe.models.head import HasClassifier
from test_models import TINY, Case, call


def makes_class_scores(case: Case) -> bool:
    """Whether the first output is class scores (B, classes, ...): a classifier of images, pixels, clips or texts
    (not a detector's maps, a GAN's critic logit or a language model's vocabulary)."""
    n = case.spec.num_classes
    return bool(n) and len(case.shape) >= 2 and case.shape[1] == n


def head_out(model: nn.Module, case: Case) -> tuple[int, int]:
    """(classes the model's get_classifier() module puts out, classes of the logits) of one forward pass."""
    seen = []
    hook = model.get_classifier().register_forward_hook(lambda m, args, out: seen.append(out.shape[1]))
    try:
        with torch.no_grad():
            logits = call(case, model)
    finally:
        hook.remove()
    return seen[-1], logits.shape[1]


CLASSIFIERS = sorted(n for n in TINY if makes_class_scores(TINY[n]()))
OTHERS = sorted(set(TINY) - set(CLASSIFIERS))


def test_the_tables_split_the_registry():
    assert set(CLASSIFIERS) | set(OTHERS) == set(MODELS)
    assert {"mlp", "cnn", "resnet", "fcn", "unet", "c3d", "text-lstm", "tv-resnet18"} <= set(CLASSIFIERS)
    assert {"gpt", "centernet", "gan", "pix2pix"} <= set(OTHERS)


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_every_classifier_gives_its_head_and_resizes_it(name):
    torch.manual_seed(0)
    case = TINY[name]()
    model = case.cfg.build(case.spec).eval()
    assert isinstance(model, HasClassifier), f"{name}: mix in models.head.Classifier (or give get_classifier)"
    head = model.get_classifier()
    assert any(m is head for m in model.modules())
    n = case.spec.num_classes
    assert head_out(model, case) == (n, n)
    model.reset_classifier(n + 2)
    assert head_out(model, case) == (n + 2, n + 2)


@pytest.mark.parametrize("name", OTHERS)
def test_models_without_class_scores_have_no_classifier_api(name):
    """Generators, language models and detectors state that they have no single classifier; fine-tuning takes
    their last layer and the checks' prior fix does not apply."""
    case = TINY[name]()
    assert not isinstance(case.cfg.build(case.spec), HasClassifier)


def test_the_checks_and_fine_tuning_ask_the_model_for_its_head():
    spec = DataSpec(num_classes=4, in_channels=3, image_size=(12, 12))
    model = MODELS["fcn"](width=4, stages=3, skips=1).build(spec)
    assert head_name(model) == "head"
    priors = torch.tensor([0.7, 0.1, 0.1, 0.1])
    assert init_head_from_priors(model, priors)
    torch.testing.assert_close(model.head.bias.softmax(0), priors)
    lm = MODELS["gpt"](n_layer=1, n_head=2, n_embd=8).build(DataSpec(vocab_size=4, extra={"block_size": 8}))
    assert not init_head_from_priors(lm, priors)  # a vocabulary of 4 is not 4 classes: no classifier, no guess


OLD = {  # model -> its head's name before every classifier's head was `head`
    "resnet": (MODELS["resnet"](layout="resnet8", width=4), "fc"),
    "fcn": (MODELS["fcn"](width=4, stages=3, skips=2), "score"),
}


@pytest.mark.parametrize("name", sorted(OLD))
def test_a_checkpoint_with_the_old_head_name_still_loads(name):
    cfg, old = OLD[name]
    spec = DataSpec(num_classes=5, in_channels=3, image_size=(12, 12))
    torch.manual_seed(0)
    before = cfg.build(spec).eval()
    state = {(old + k[4:] if k.startswith("head.") else k): v for k, v in before.state_dict().items()}
    assert any(k.startswith(old + ".") for k in state) and not any(k.startswith("head.") for k in state)
    x = torch.randn(2, 3, 12, 12)
    for load in ("strict", "wrapped", "by name"):
        torch.manual_seed(1)
        now = cfg.build(spec).eval()
        if load == "strict":  # what load_run, resume and the feature nets do
            now.load_state_dict(state)
        elif load == "wrapped":  # the head inside another module (a compiled model's _orig_mod.)
            nn.ModuleDict({"inner": now}).load_state_dict({"inner." + k: v for k, v in state.items()})
        else:  # fine-tuning's match by name and shape
            report = load_matching(now, state)
            assert report["new"] == report["unused"] == report["skipped"] == []
        torch.testing.assert_close(now(x), before(x), rtol=0, atol=0)
