"""The engine on a GPU: the CUDA-graph step against the eager one, the device-side non-finite check, dropout
under replay. Skipped where there is no CUDA device (CI); bench/gpu.sh runs them on one."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import TINY
from deeprecipe.engine import checkpoint, loop
from deeprecipe.engine.device import setup
from deeprecipe.engine.graph import GraphedStep
from deeprecipe.families import get_family
from deeprecipe.recipe import load

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CUDA = [*TINY, "train.device=cuda", "train.precision=fp32", "train.batch_size=32", "train.steps=12"]
CNN = ["model.channels=[8, 16]", "model.dense=[32]", "model.dropout=0"]


def _train(out: Path, *overrides: str, recipe: str = "digits-cnn") -> dict:
    cfg = load(recipe, [*CUDA, *overrides])
    return loop.train(cfg, get_family(cfg.task), out)


def _weights(run: Path) -> dict[str, torch.Tensor]:
    weights, _ = checkpoint.load(checkpoint.latest(run / "checkpoints"))
    return weights


@pytest.fixture
def steppers(monkeypatch) -> list:
    """The step functions the loop made (to see whether a CUDA graph was replayed)."""
    made, plain = [], loop.stepper

    def keep(*args):
        made.append(plain(*args))
        return made[-1]

    monkeypatch.setattr(loop, "stepper", keep)
    return made


def test_graphed_training_equals_eager_training(tmp_path, steppers):
    """12 steps replayed from a CUDA graph end with the weights of 12 eager steps (random crops and flips, the
    lr schedule and BatchNorm statistics included)."""
    common = [*CNN, "data.crop_pad=1", "data.flip=true"]
    _train(tmp_path / "eager", *common, "train.cuda_graph=false")
    _train(tmp_path / "graph", *common, "train.cuda_graph=true")
    assert not isinstance(steppers[0], GraphedStep)
    assert isinstance(steppers[1], GraphedStep) and steppers[1].replays == 12 - 3  # all but the warm-up steps
    eager, graph = _weights(tmp_path / "eager"), _weights(tmp_path / "graph")
    assert eager.keys() == graph.keys()
    for k in eager:
        torch.testing.assert_close(graph[k], eager[k], rtol=1e-4, atol=1e-5, msg=f"{k} differs")


def test_graphed_dropout_draws_new_masks_at_every_replay():
    """Dropout inside a replayed graph is not frozen: with lr 0 and the same batch, each replay's loss differs."""
    small = ["model.n_layer=1", "model.n_embd=32", "model.n_head=2", "data.block_size=32"]
    cfg = load("shakespeare-char-gpt", [*CUDA, *small, "optim.lr=1e-12", "model.dropout=0.5", "optim.clip=0"])
    family, rt = get_family(cfg.task), setup("cuda", "fp32")
    data, model = loop.build(cfg, family, rt)
    parts = loop.make_parts(family, model, cfg, rt)
    step = loop.stepper(family, model, parts, cfg, rt)
    x, y = data.train.take(torch.arange(8))
    losses = [float(step([(x.cuda(), y.cuda())]).losses["model"]) for _ in range(8)]
    assert isinstance(step, GraphedStep) and step.replays == 5
    assert len(set(losses[3:])) == 5, losses


def test_nan_on_the_gpu_stops_before_the_next_checkpoint(tmp_path):
    from test_engine import NAN_MODEL

    model = tmp_path / "nan_model.py"
    model.write_text(NAN_MODEL)
    with pytest.raises(loop.NonFiniteLoss, match="NaN/inf at step 4"):
        _train(tmp_path / "run", f"model.name={model}:NaNAfter", "train.steps=6", recipe="digits-mlp")
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text() == "step-0000002"
