"""The layers compute the same functions as their plain (concatenating, separate-network) equivalents."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from streamtotal.model import native
from streamtotal.model.layers import CovariateLinear, Dropout, FCStack


def test_covariate_linear_equals_linear_on_the_one_hot_concatenation():
    torch.manual_seed(0)
    layer = CovariateLinear(7, 5, n_cov=3)
    x, cov = torch.randn(10, 7), torch.randint(0, 3, (10,))
    weight = torch.cat([layer.weight, layer.cov_weight.t()], dim=1)  # [n_out, n_in + n_cov]
    expected = F.linear(torch.cat([x, F.one_hot(cov, 3).float()], dim=1), weight, layer.bias)
    torch.testing.assert_close(layer(x, cov), expected)
    assert CovariateLinear(7, 5, n_cov=1).cov_weight is None  # one category carries no information


def test_parallel_stack_equals_separate_stacks():
    torch.manual_seed(0)
    n_in, hidden, layers, n_cov, p = 6, 4, 3, 2, 3
    stack = FCStack(n_in, hidden, layers, n_cov, dropout_rate=0.0, use_batch_norm=True, use_layer_norm=True,
                    n_parallel=p)
    x, cov = torch.randn(16, n_in), torch.randint(0, n_cov, (16,))
    out = stack(x, cov)
    assert out.shape == (16, p * hidden)
    for k in range(p):
        rows = slice(k * hidden, (k + 1) * hidden)
        h = x
        for i, (linear, norm) in enumerate(zip(stack.linears, stack.norms)):
            w = linear.weight[rows] if i == 0 else linear.weight[k].t()
            h = F.linear(h, w, linear.bias[rows]) + linear.cov_weight[cov][:, rows]
            h = F.batch_norm(h, None, None, norm.weight[rows], norm.bias[rows], training=True, eps=norm.eps)
            h = F.relu(F.layer_norm(h, (hidden,)))
        torch.testing.assert_close(out[:, rows], h)


@pytest.fixture(params=["native", "torch"])
def dropout_path(request, monkeypatch):
    """Runs a test with the compiled dropout kernel and with the torch path."""
    if request.param == "native" and not native.available():
        pytest.skip("compiled kernels not built")
    if request.param == "torch":
        monkeypatch.setenv("STREAMTOTAL_NATIVE", "0")
    return request.param


def test_dropout_keeps_the_right_fraction_and_is_unbiased(dropout_path):
    torch.manual_seed(0)
    layer = Dropout(0.2).train()
    x = torch.ones(400, 500)
    y = layer(x)
    kept = (y > 0).float().mean().item()
    assert abs(kept - 0.8) < 0.005  # 200,000 draws: 5 standard deviations is 0.0045
    assert abs(y.mean().item() - 1.0) < 0.01
    assert torch.equal(layer.eval()(x), x)
    reference = nn.Dropout(0.2)  # same keep probability up to the 2^-16 resolution
    assert abs((1 / layer._scale) - (1 - reference.p)) < 2**-16


def test_dropout_masks_are_independent_reproducible_and_differentiated(dropout_path):
    layer = Dropout(0.3).train()
    x = torch.rand(256, 1024) + 0.5
    torch.manual_seed(1)
    first, second = layer(x), layer(x)
    torch.manual_seed(1)
    assert torch.equal(layer(x), first)  # torch's seed fixes the masks (runs repeat, checkpoints resume)
    a, b = (first > 0).float(), (second > 0).float()
    assert abs((a * b).mean().item() - 0.49) < 0.01  # consecutive masks independent: P(both kept) = 0.7^2
    flat = a.view(-1)
    for lag in (1, 2, 3, 4, 1024):  # neighbours independent, including across 16-bit lanes and rows
        assert abs((flat[:-lag] * flat[lag:]).mean().item() - 0.49) < 0.01, lag
    leaf = x.clone().requires_grad_()
    torch.manual_seed(2)
    out = layer(leaf)
    out.backward(torch.full_like(out, 2.0))
    kept = out > 0
    torch.testing.assert_close(leaf.grad[kept], torch.full_like(leaf.grad[kept], 2.0 * layer._scale))
    assert (leaf.grad[~kept] == 0).all()
    torch.testing.assert_close(out[kept], (x * layer._scale)[kept])
