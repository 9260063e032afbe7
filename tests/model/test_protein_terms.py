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


# ----------------------------------------------------------------------------- large theta, against float64

def _textbook_mixture(y, log_mu_back, log_mu_fore, theta, logits):
    """log(pi NB(y; mu_b, theta) + (1 - pi) NB(y; mu_f, theta)) as the textbook writes it (float64 reference: its
    cancellations at large theta cost ~1e-9 there, where float32 lost everything)."""
    def log_nb(log_mu):
        mu = log_mu.exp()
        return (torch.lgamma(y + theta) - torch.lgamma(theta) - torch.lgamma(y + 1.0)
                + theta * (theta.log() - (theta + mu).log()) + y * (log_mu - (theta + mu).log()))
    return torch.logaddexp(-torch.nn.functional.softplus(-logits) + log_nb(log_mu_back),
                           -torch.nn.functional.softplus(logits) + log_nb(log_mu_fore))


def _large_theta_grid():
    """Every (theta, count, mean, component) case, one per cell of a one-protein panel. Logits +-12 put all the
    weight on the background or on the foreground component; 0 mixes them."""
    cases = [(theta, y, mu, logit) for theta in (0.5, 3.0, 9.99, 10.01, 1e2, 1e3, 1e4, 1e5, 1e6)
             for y in (0.0, 3.0, 20.0, 300.0) for mu in (0.5, 15.0) for logit in (12.0, -12.0, 0.0)]
    theta, y, mu_back, logits = (torch.tensor(c, dtype=torch.float64).unsqueeze(1) for c in zip(*cases))
    return y, mu_back.log(), torch.full_like(y, 4.0), logits, theta


def _float64_reference(y, log_back, fore_scale, logits, theta):
    """ll, d ll / d log mu_back, d ll / d log mu_fore, d ll / d log theta by autograd through the textbook form."""
    leaves = [log_back.clone().requires_grad_(), (log_back + fore_scale.log()).requires_grad_(),
              theta.log().requires_grad_()]
    ll = _textbook_mixture(y, leaves[0], leaves[1], leaves[2].exp(), logits)
    ll.sum().backward()
    return (ll.detach(), *(leaf.grad for leaf in leaves))


def _path_values(fn, y, log_back, fore_scale, logits, theta):
    """The same four quantities from ``protein_terms``' interface in float32 (theta per cell: its own gradient)."""
    n = y.shape[0]
    f32 = [t.float().clone().requires_grad_() for t in (log_back, fore_scale, theta)]
    zeros, ones = torch.zeros(n, 1), torch.ones(n, 1)
    nll, _ = fn(y.float(), torch.ones(n, 1, dtype=torch.bool), f32[0], ones, zeros, f32[1], logits.float(), f32[2],
                zeros, zeros)
    nll.sum().backward()
    lb, a, th = (t.grad.double() for t in f32)
    d_log_fore = -a * fore_scale  # log mu_fore = log_back + log a
    d_log_back = -lb - d_log_fore  # d/d log_back moves both means
    return -nll.detach().double().unsqueeze(1), d_log_back, d_log_fore, -th * theta


@pytest.mark.parametrize("path", ["torch", pytest.param("native", marks=needs_native)])
def test_value_and_gradients_match_float64_up_to_theta_1e6(path):
    fn = torch_protein_terms if path == "torch" else protein_terms
    y, log_back, fore_scale, logits, theta = _large_theta_grid()
    want = _float64_reference(y, log_back, fore_scale, logits, theta)
    got = _path_values(fn, y, log_back, fore_scale, logits, theta)
    mu_fore = log_back.exp() * fore_scale
    # float32 rounding of the terms that make up each quantity (of the size of y log mu and of y + mu), plus a
    # relative part; the textbook form in float32 was off by up to 1e4 times these at theta = 1e6 (and by 140x
    # in d/d log theta at 1e4).
    value_tol = 2e-6 * (1.0 + y * (1.0 + mu_fore.log().abs()) + mu_fore)
    grad_tol = 1e-6 * (1.0 + y + mu_fore)
    for name, g, w in zip(("ll", "d/dlog mu_back", "d/dlog mu_fore", "d/dlog theta"), got, want):
        tol = (value_tol if name == "ll" else grad_tol) + 1e-4 * w.abs()
        bad = (g - w).abs() > tol
        assert not bad.any(), (path, name, [(float(theta[i]), float(y[i]), float(w[i]), float(g[i]))
                                            for i in bad.nonzero()[:, 0][:5]])
    # the grid reaches the cases that matter: theta 1e6, and each component carrying the weight
    assert theta.max() == 1e6 and (logits > 0).any() and (logits < 0).any()


@needs_native
def test_kernel_and_torch_path_agree_at_large_theta():
    y, log_back, fore_scale, logits, theta = _large_theta_grid()
    kernel = _path_values(protein_terms, y, log_back, fore_scale, logits, theta)
    torch32 = _path_values(torch_protein_terms, y, log_back, fore_scale, logits, theta)
    mu_fore = log_back.exp() * fore_scale
    for name, k, t in zip(("ll", "d/dlog mu_back", "d/dlog mu_fore", "d/dlog theta"), kernel, torch32):
        scale = 1.0 + y * (1.0 + mu_fore.log().abs()) + mu_fore if name == "ll" else 1.0 + y + mu_fore
        assert ((k - t).abs() <= 4e-6 * scale + 1e-4 * k.abs()).all(), name


# ----------------------------------------------------------------------------- anything at unmeasured entries

def _poisoned(params, mask):
    """``params`` with NaN, +inf and -inf in turn at every unmeasured entry of every [B, T] input."""
    out = []
    for i, p in enumerate(params):
        p = p.clone()
        if p.shape == mask.shape:
            bad = torch.tensor([float("nan"), float("inf"), -float("inf")])[(torch.arange(p.numel()) + i) % 3]
            p[~mask] = bad.view(p.shape)[~mask]
        out.append(p)
    return out


@pytest.mark.parametrize("path", ["torch", pytest.param("native", marks=needs_native)])
@pytest.mark.parametrize("theta_per_cell", [False, True])
def test_non_finite_values_at_unmeasured_entries_change_nothing(path, theta_per_cell):
    fn = torch_protein_terms if path == "torch" else protein_terms
    y, mask, params = _inputs(seed=5, theta_per_cell=theta_per_cell)
    y[~mask] = torch.tensor([float("nan"), float("inf")]).repeat(int((~mask).sum()))[: int((~mask).sum())]
    weights = _weights(y.shape[0])
    clean_y = torch.where(mask, y, 0.0)
    clean = _with_grads(fn, clean_y, mask, params, weights)
    poisoned = _with_grads(fn, y, mask, _poisoned(params, mask), weights)
    for name, got, want in zip(("nll", "kl"), poisoned[:2], clean[:2]):
        assert torch.isfinite(got).all(), (path, name)
        torch.testing.assert_close(got, want, rtol=0, atol=0)  # selected out, not multiplied by 0
    for name, got, want in zip(NAMES, poisoned[2], clean[2]):
        assert torch.isfinite(got).all(), (path, name)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        if got.shape == mask.shape:
            assert (got[~mask] == 0).all(), (path, name)


@needs_native
@pytest.mark.parametrize("theta_per_cell", [False, True])
def test_kernel_gives_the_torch_paths_gradients_with_non_finite_unmeasured_entries(theta_per_cell):
    y, mask, params = _inputs(seed=6, theta_per_cell=theta_per_cell)
    poisoned = _poisoned(params, mask)
    weights = _weights(y.shape[0])
    nll, kl, grads = _with_grads(protein_terms, y, mask, poisoned, weights)
    nll64, kl64, grads64 = _with_grads(torch_protein_terms, y, mask, poisoned, weights, torch.float64)
    # the tolerances of test_kernel_matches_a_float64_reference_in_values_and_every_gradient
    torch.testing.assert_close(nll.double(), nll64, rtol=2e-6, atol=1e-4)
    torch.testing.assert_close(kl.double(), kl64, rtol=2e-6, atol=1e-5)
    for name, got, want in zip(NAMES, grads, grads64):
        assert torch.isfinite(got).all(), name
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")
