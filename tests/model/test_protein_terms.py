"""The fused protein terms (native/protein_kernel.c) against the torch path and a float64 reference."""

from __future__ import annotations

import pytest
import torch

from streamtotal.model import native
from streamtotal.model.protein_terms import protein_terms, torch_protein_terms

needs_native = pytest.mark.skipif(not native.available(), reason="compiled kernels not built or turned off")

NAMES = ("log_back", "back_scale", "back_mean", "fore_scale", "mix_logits", "theta", "prior_mean", "prior_log_scale")


def _inputs(n=40, t=12, seed=0, theta_per_cell=False):
    g = torch.Generator().manual_seed(seed)
    back_mean = 3.0 + 0.8 * torch.randn(n, t, generator=g)
    back_scale = 0.05 + torch.rand(n, t, generator=g)
    log_back = back_mean + back_scale * torch.randn(n, t, generator=g)
    fore_scale = 1.0 + 4.0 * torch.rand(n, t, generator=g)
    mix_logits = 3.0 * torch.randn(n, t, generator=g)
    theta = (torch.randn(n, t, generator=g) if theta_per_cell else torch.randn(t, generator=g)).mul(1.5).exp()
    theta.view(-1)[:3] = torch.tensor([0.02, 900.0, 5000.0])  # very overdispersed, and nearly Poisson
    prior_mean = 3.0 + 0.3 * torch.randn(n, t, generator=g)
    prior_log_scale = -0.5 + 0.3 * torch.randn(n, t, generator=g)
    foreground = torch.rand(n, t, generator=g) < 0.4
    rate = log_back.exp() * torch.where(foreground, fore_scale, torch.ones(()))
    y = torch.poisson(rate, generator=g)
    y[0, :4] = torch.tensor([0.0, 1.0, 2500.0, 60000.0])  # zero, one, and counts far above the means
    mask = torch.rand(n, t, generator=g) > 0.15
    mask[1] = False  # a cell with no protein measured
    y[~mask] = float("nan")  # whatever an unmeasured entry holds must not matter
    params = (log_back, back_scale, back_mean, fore_scale, mix_logits, theta, prior_mean, prior_log_scale)
    return y, mask, params


def _with_grads(fn, y, mask, params, weights, dtype=torch.float32):
    leaves = [p.to(dtype).clone().requires_grad_() for p in params]
    nll, kl = fn(y.to(dtype), mask, *leaves)
    (nll * weights[0].to(dtype) + kl * weights[1].to(dtype)).sum().backward()
    return nll.detach(), kl.detach(), [p.grad for p in leaves]


def _weights(n, seed=7):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g), torch.randn(n, generator=g)


@needs_native
@pytest.mark.parametrize("theta_per_cell", [False, True])
def test_kernel_matches_a_float64_reference_in_values_and_every_gradient(theta_per_cell):
    y, mask, params = _inputs(theta_per_cell=theta_per_cell)
    weights = _weights(y.shape[0])
    nll, kl, grads = _with_grads(protein_terms, y, mask, params, weights)
    nll64, kl64, grads64 = _with_grads(torch_protein_terms, y, mask, params, weights, torch.float64)
    # float64 torch is the reference; the kernel works in float64 and rounds its outputs to float32
    torch.testing.assert_close(nll.double(), nll64, rtol=2e-6, atol=1e-4)
    torch.testing.assert_close(kl.double(), kl64, rtol=2e-6, atol=1e-5)
    for name, got, want in zip(NAMES, grads, grads64):
        assert got.shape == want.shape, name
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")


@needs_native
def test_kernel_is_at_least_as_accurate_as_the_float32_torch_path():
    y, mask, params = _inputs(n=256, t=50, seed=1)
    weights = _weights(256)
    kernel = _with_grads(protein_terms, y, mask, params, weights)
    torch32 = _with_grads(torch_protein_terms, y, mask, params, weights)
    reference = _with_grads(torch_protein_terms, y, mask, params, weights, torch.float64)
    flat = [lambda r, i=i: r[i] for i in range(2)] + [lambda r, j=j: r[2][j] for j in range(len(NAMES))]
    for name, get in zip(("nll", "kl") + NAMES, flat):
        want = get(reference)
        kernel_error = (get(kernel).double() - want).abs().max()
        torch_error = (get(torch32).double() - want).abs().max()
        # the kernel computes in float64 and rounds once; allow it float32 rounding of the largest value
        assert kernel_error <= torch_error + 2e-7 * want.abs().max(), (name, float(kernel_error), float(torch_error))


@needs_native
def test_unmeasured_entries_get_no_value_and_no_gradient():
    y, mask, params = _inputs(seed=2)
    nll, kl, grads = _with_grads(protein_terms, y, mask, params, _weights(y.shape[0]))
    assert torch.isfinite(nll).all() and torch.isfinite(kl).all()
    assert nll[1] == 0 and kl[1] == 0  # the cell with nothing measured
    for name, grad in zip(NAMES, grads):
        assert torch.isfinite(grad).all(), name
        if grad.shape == mask.shape:
            assert (grad[~mask] == 0).all(), name


@needs_native
def test_no_derivatives_are_stored_without_gradients():
    y, mask, params = _inputs(seed=3)
    with torch.no_grad():
        nll, kl = protein_terms(y, mask, *params)
    nll_grad, kl_grad, _ = _with_grads(protein_terms, y, mask, params, _weights(y.shape[0]))
    torch.testing.assert_close(nll, nll_grad)
    torch.testing.assert_close(kl, kl_grad)


def test_torch_path_is_used_where_the_kernel_does_not_apply(monkeypatch):
    y, mask, params = _inputs(seed=4)
    monkeypatch.setenv("STREAMTOTAL_NATIVE", "0")
    nll, kl = protein_terms(y, mask, *params)
    nll_t, kl_t = torch_protein_terms(y, mask, *params)
    torch.testing.assert_close(nll, nll_t)
    torch.testing.assert_close(kl, kl_t)
    # float64 inputs always take the torch path, whatever is built
    monkeypatch.delenv("STREAMTOTAL_NATIVE")
    nll64, _ = protein_terms(y.double(), mask, *(p.double() for p in params))
    assert nll64.dtype == torch.float64
