"""The CPU dropout mask (models/dropout.py) against its definition: keep with probability 1 - p, scale by 1/(1-p)."""

import pytest
import torch

from deeprecipe.models.dropout import Dropout


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mask_keeps_each_element_with_probability_1_minus_p_and_scales_the_kept(dtype):
    torch.manual_seed(0)
    p, n = 0.3, 1_000_000
    x = (torch.rand(n) + 0.5).to(dtype).requires_grad_()
    y = Dropout(p).train()(x)
    kept = y != 0
    # binomial: the dropped share is within 6 standard deviations of p
    assert abs(1 - kept.float().mean().item() - p) < 6 * (p * (1 - p) / n) ** 0.5
    torch.testing.assert_close(y[kept], (x[kept].float() / (1 - p)).to(dtype))
    y.sum().backward()  # d y / d x: the same mask and scale
    torch.testing.assert_close(x.grad, (kept.float() / (1 - p)).to(dtype))


def test_same_seed_same_mask_and_eval_is_the_identity():
    x = torch.randn(64, 32)
    torch.manual_seed(1)
    a = Dropout(0.5).train()(x)
    torch.manual_seed(1)
    b = Dropout(0.5).train()(x)
    assert torch.equal(a, b)  # drawn from the global generator: a resumed run redraws the same masks
    assert Dropout(0.5).eval()(x) is x and torch.equal(Dropout(0.0).train()(x), x)
    assert not Dropout(1.0).train()(x).any()
    assert isinstance(Dropout(0.1), torch.nn.Dropout)
