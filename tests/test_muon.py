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


def test_hidden_matrices_are_the_inner_layers_weights():
    """GPT: the blocks' projections, never the embeddings or the tied output layer; CNN: every convolution but the
    first and every dense layer but the classifier."""
    gpt = GPT(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=16)
    want = {
        n
        for n, p in gpt.named_parameters()
        if n.startswith("blocks.") and p.ndim == 2 and "norm" not in n  # qkv, proj, the MLP's two layers
    }
    assert names(gpt, optim.hidden_matrices(gpt)) == want and len(want) == 2 * 4
    cnn = CNN(1, 10, (28, 28), CNNConfig(channels=(4, 8, 16), dense=(16, 12)))
    layers = [n + ".weight" for n, m in cnn.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    assert names(cnn, optim.hidden_matrices(cnn)) == set(layers[1:-1]) and len(layers) == 3 + 3


def test_one_step_orthogonalises_the_hidden_update_and_is_adamw_elsewhere():
    """Oracle: the first Muon step of a matrix is lr * 0.2 * sqrt(max(A, B)) times the orthogonal factor U V^T of
    its gradient (Newton-Schulz approximates it: singular values near 1, not exactly 1); every other parameter
    moves exactly as under torch's AdamW with the same settings."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 12), nn.ReLU(), nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 24), nn.Linear(24, 3))
    cfg = optim.OptimConfig(name="muon", lr=0.01, weight_decay=0.0, betas=(0.9, 0.99))
    ref = copy.deepcopy(net)
    grads = {n: torch.randn_like(p) for n, p in net.named_parameters()}
    for n in ("2.weight", "4.weight"):  # full rank, singular values spread over 10x: far from orthogonal
        u, _, vh = torch.linalg.svd(grads[n], full_matrices=False)
        grads[n] = u @ torch.diag(torch.logspace(0, -1, vh.shape[0])) @ vh
    for m in (net, ref):
        for n, p in m.named_parameters():
            p.grad = grads[n].clone()
    opt = optim.optimizer(net, cfg)
    hidden = {"2.weight", "4.weight"}
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


def test_a_channels_last_kernel_steps_as_its_matrix():
    """Oracle: a (channels-last) convolution kernel moves exactly as torch's Muon moves the (out, in*kh*kw) matrix
    of the same kernel with the same gradient (up to the bf16 rounding of Newton-Schulz in another column order)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 16, 3), nn.Conv2d(16, 4, 1)).to(
        memory_format=torch.channels_last
    )
    k = net[1].weight
    assert k.is_contiguous(memory_format=torch.channels_last) and not k.is_contiguous()
    cfg = optim.OptimConfig(name="muon", lr=0.01, weight_decay=0.1)
    for p in net.parameters():
        p.grad = torch.randn_like(p)
    matrix = nn.Parameter(k.detach().reshape(16, -1).clone())
    matrix.grad = k.grad.reshape(16, -1).clone()
    ref = torch.optim.Muon([matrix], lr=cfg.lr, weight_decay=0.1, momentum=0.95, adjust_lr_fn="match_rms_adamw")
    opt = optim.optimizer(net, cfg)
    assert names(net, optim.hidden_matrices(net)) == {"1.weight"}
    before = k.detach().clone()
    for _ in range(2):  # two steps: the momentum buffer is carried too
        opt.step()
        ref.step()
    assert not torch.equal(before, k)
    assert torch.allclose(k.detach().reshape(16, -1), matrix.detach(), atol=2e-4, rtol=0)
    opt.zero_grad()
    assert all(p.grad is None for p in net.parameters())


def test_state_round_trips_and_a_foreign_state_is_refused():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
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


def test_a_resumed_conv_net_run_equals_an_uninterrupted_one(tmp_path):
    """Muon on a channels-last CNN's kernels (views of their storage) through the loop: 3 steps then resume to 6
    gives bitwise the weights of 6 steps straight, so the views still write the model's weights after a restore."""
    import deeprecipe
    from deeprecipe.engine import checkpoint

    sets = {"optim.name": "muon", "optim.schedule": "constant", "train.steps": 6, "train.ckpt_every": 3}
    sets |= {"train.batch_size": 16, "train.device": "cpu", "train.eval_every": 0, "train.channels_last": True}
    sets |= {"train.precision": "fp32", "model.channels": [4, 8, 8], "model.dense": [16]}
    deeprecipe.train("digits-cnn", sets, out=tmp_path / "full")
    deeprecipe.train("digits-cnn", sets | {"train.steps": 3}, out=tmp_path / "split")
    deeprecipe.train(tmp_path / "split", {"train.steps": 6}, resume=True)
    a = checkpoint.load(checkpoint.latest(tmp_path / "full" / "checkpoints"))[0]
    b = checkpoint.load(checkpoint.latest(tmp_path / "split" / "checkpoints"))[0]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    mid = checkpoint.load(tmp_path / "full" / "checkpoints" / "step-0000003")[0]
    kernels = [k for k, v in a.items() if v.ndim == 4]
    assert len(kernels) >= 3 and all(not torch.equal(a[k], mid[k]) for k in kernels)  # every kernel moved


def test_muon_on_kernels_with_fp16_loss_scaling_is_refused_in_one_line():
    """The scaler unscales the gradients of the optimizer's groups; a kernel's matrix view gets its gradient only
    at the step, still scaled: refused rather than silently mixing scales in Muon's momentum."""
    from deeprecipe.engine import loop
    from deeprecipe.families import get_family
    from deeprecipe.runtime import Runtime

    cfg = config.Config()
    cfg.optim.name = "muon"
    cnn = CNN(1, 10, (28, 28), CNNConfig(channels=(4, 8, 16), dense=(16,)))
    with pytest.raises(ConfigError, match="fp16 loss scaling.*precision=bf16 or fp32"):
        loop.make_parts(get_family("classify"), cnn, cfg, Runtime(torch.device("cpu"), torch.float16))
    assert loop.make_parts(get_family("classify"), cnn, cfg, Runtime(torch.device("cpu"), torch.bfloat16))
