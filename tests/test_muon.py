"""optim.name=muon: torch.optim.Muon on the hidden Linear weights, AdamW on everything else, one optimizer."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn

from deeprecipe import config
from deeprecipe.core import ConfigError
from deeprecipe.engine import optim
from deeprecipe.models.cnn import CNN, CNNConfig
from deeprecipe.models.gpt import GPT

pytestmark = pytest.mark.usefixtures("one_thread")


def names(model: nn.Module, params: list[nn.Parameter]) -> set[str]:
    ids = {id(p) for p in params}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def test_hidden_matrices_are_the_inner_linear_weights():
    """GPT: the blocks' projections, never the embeddings or the tied output layer; CNN: the dense layers but not
    the classifier, never a convolution."""
    gpt = GPT(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=16)
    want = {
        n
        for n, p in gpt.named_parameters()
        if n.startswith("blocks.") and p.ndim == 2 and "norm" not in n  # qkv, proj, the MLP's two layers
    }
    assert names(gpt, optim.hidden_matrices(gpt)) == want and len(want) == 2 * 4
    cnn = CNN(1, 10, (28, 28), CNNConfig(channels=(4, 8), dense=(16, 12)))
    linears = [n + ".weight" for n, m in cnn.named_modules() if isinstance(m, nn.Linear)]
    assert names(cnn, optim.hidden_matrices(cnn)) == set(linears[:-1]) and len(linears) == 3


def test_one_step_orthogonalises_the_hidden_update_and_is_adamw_elsewhere():
    """Oracle: the first Muon step of a matrix is lr * 0.2 * sqrt(max(A, B)) times the orthogonal factor U V^T of
    its gradient (Newton-Schulz approximates it: singular values near 1, not exactly 1); every other parameter
    moves exactly as under torch's AdamW with the same settings."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 3))
    cfg = optim.OptimConfig(name="muon", lr=0.01, weight_decay=0.0, betas=(0.9, 0.99))
    ref = copy.deepcopy(net)
    grads = {n: torch.randn_like(p) for n, p in net.named_parameters()}
    for n in ("0.weight", "2.weight"):  # full rank, singular values spread over 10x: far from orthogonal
        u, _, vh = torch.linalg.svd(grads[n], full_matrices=False)
        grads[n] = u @ torch.diag(torch.logspace(0, -1, vh.shape[0])) @ vh
    for m in (net, ref):
        for n, p in m.named_parameters():
            p.grad = grads[n].clone()
    opt = optim.optimizer(net, cfg)
    hidden = {"0.weight", "2.weight"}
    assert isinstance(opt, optim.Muon) and names(net, optim.hidden_matrices(net)) == hidden
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    opt.step()
    after = dict(net.named_parameters())
    for n in sorted(hidden):
        delta = before[n] - after[n].detach()
        u, _, vh = torch.linalg.svd(grads[n], full_matrices=False)
        cos = torch.nn.functional.cosine_similarity((u @ vh).flatten(), delta.flatten(), dim=0)
        plain = torch.nn.functional.cosine_similarity(grads[n].flatten(), delta.flatten(), dim=0)
        assert cos > 0.97 and plain < cos - 0.05, (n, cos, plain)  # nearer U V^T than the raw gradient
        sv = torch.linalg.svdvals(delta / (cfg.lr * 0.2 * math.sqrt(max(delta.shape))))
        assert 0.6 < sv.min() and sv.max() < 1.25, (n, sv)  # every direction moved by about the same step
    rest = [p for n, p in ref.named_parameters() if n not in hidden]
    torch.optim.AdamW(rest, lr=cfg.lr, betas=cfg.betas, weight_decay=0.0).step()
    for n, p in ref.named_parameters():
        if n not in hidden:
            assert torch.allclose(p, after[n], atol=1e-7), n


def test_state_round_trips_and_a_foreign_state_is_refused():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    cfg = optim.OptimConfig(name="muon", lr=0.01)
    opt = optim.optimizer(net, cfg)
    net(torch.randn(5, 4)).sum().backward()
    opt.step()
    again = optim.optimizer(copy.deepcopy(net), cfg)
    again.load_state_dict(opt.state_dict())
    assert again.state_dict().keys() == opt.state_dict().keys() == {"Muon", "AdamW"}
    with pytest.raises(ConfigError, match="optim.name=muon"):
        again.load_state_dict(optim.adamw(net, cfg).state_dict())


def test_an_unknown_optimizer_is_a_config_error():
    with pytest.raises(ConfigError, match="optim.name"):
        config.from_dict(config.OptimConfig, {"name": "sgd"}, "optim")


def test_a_torch_without_muon_gets_a_one_line_error(monkeypatch):
    monkeypatch.delattr(torch.optim, "Muon")
    with pytest.raises(ConfigError, match=r"needs torch >= 2\.9.*optim\.name=adamw"):
        optim.optimizer(nn.Linear(3, 2), optim.OptimConfig(name="muon"))
