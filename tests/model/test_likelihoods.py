"""The likelihoods against scipy, a direct float64 computation and scvi-tools, and the fused RNA term's gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from streamtotal.model.likelihoods import log_nb, log_nb_mixture, log_nb_mixture_from_log_means
from streamtotal.model.rna_likelihood import fast_digamma, nb_log_likelihood_from_logits, sum_lgamma_counts

scvi_distributions = pytest.importorskip("scvi.distributions")


def _counts(rng: np.random.Generator, shape, zero_fraction=0.5, high=5000) -> np.ndarray:
    x = rng.negative_binomial(2, 0.05, size=shape).astype(np.float64)
    x[rng.random(shape) < zero_fraction] = 0
    x.flat[:3] = [0, 1, high]  # always include a zero, a one and a large count
    return x


def _nb_params(rng, shape):
    mu = np.exp(rng.normal(1.0, 2.5, size=shape))
    theta = np.exp(rng.normal(0.0, 1.5, size=shape))
    return mu, theta


def test_log_nb_matches_scipy_nbinom():
    rng = np.random.default_rng(0)
    x = _counts(rng, (40, 30))
    mu, theta = _nb_params(rng, (40, 30))
    ours = log_nb(torch.tensor(x), torch.tensor(mu), torch.tensor(theta), eps=0.0).numpy()
    # scipy: n successes = theta, success probability p = theta / (theta + mu)
    expected = stats.nbinom.logpmf(x, theta, theta / (theta + mu))
    np.testing.assert_allclose(ours, expected, rtol=1e-9, atol=1e-8)


def test_log_nb_matches_scvi_negative_binomial():
    rng = np.random.default_rng(1)
    x = torch.tensor(_counts(rng, (32, 20)), dtype=torch.float32)
    mu, theta = (torch.tensor(a, dtype=torch.float32) for a in _nb_params(rng, (32, 20)))
    expected = scvi_distributions.NegativeBinomial(mu=mu, theta=theta, validate_args=False).log_prob(x)
    torch.testing.assert_close(log_nb(x, mu, theta), expected, rtol=1e-5, atol=1e-3)


def _direct_mixture(y, mu_back, mu_fore, theta, logits):
    """log(pi NB(back) + (1 - pi) NB(fore)) with pi = sigmoid(logits), straight from scipy in float64."""
    p_back = stats.nbinom.logpmf(y, theta, theta / (theta + mu_back))
    p_fore = stats.nbinom.logpmf(y, theta, theta / (theta + mu_fore))
    log_pi = -np.logaddexp(0.0, -logits)
    log_one_minus_pi = -np.logaddexp(0.0, logits)
    return np.logaddexp(log_pi + p_back, log_one_minus_pi + p_fore)


def test_log_nb_mixture_matches_direct_float64():
    rng = np.random.default_rng(2)
    y = _counts(rng, (50, 12), zero_fraction=0.1)
    mu_back = np.exp(rng.normal(3.0, 1.0, size=y.shape))
    mu_fore = mu_back * (1.0 + np.exp(rng.normal(1.0, 1.0, size=y.shape)))
    theta = np.exp(rng.normal(0.5, 1.0, size=y.shape[1]))
    logits = rng.normal(0.0, 4.0, size=y.shape)
    ours = log_nb_mixture(*(torch.tensor(a) for a in (y, mu_back, mu_fore, theta, logits)), eps=0.0).numpy()
    np.testing.assert_allclose(ours, _direct_mixture(y, mu_back, mu_fore, theta, logits), rtol=1e-9, atol=1e-8)


def test_log_nb_mixture_matches_scvi_negative_binomial_mixture():
    rng = np.random.default_rng(3)
    y = torch.tensor(_counts(rng, (64, 10), zero_fraction=0.1), dtype=torch.float32)
    mu_back = torch.tensor(np.exp(rng.normal(3.0, 1.0, size=(64, 10))), dtype=torch.float32)
    mu_fore = mu_back * torch.tensor(1.0 + np.exp(rng.normal(1.0, 1.0, size=(64, 10))), dtype=torch.float32)
    theta = torch.tensor(np.exp(rng.normal(0.5, 1.0, size=10)), dtype=torch.float32)
    logits = torch.tensor(rng.normal(0.0, 3.0, size=(64, 10)), dtype=torch.float32)
    expected = scvi_distributions.NegativeBinomialMixture(
        mu1=mu_back, mu2=mu_fore, theta1=theta, mixture_logits=logits, validate_args=False
    ).log_prob(y)
    torch.testing.assert_close(log_nb_mixture(y, mu_back, mu_fore, theta, logits), expected, rtol=1e-5, atol=1e-3)


def test_log_nb_mixture_stays_finite_at_extreme_logits_and_means():
    y = torch.tensor([[0.0, 3.0, 1e5, 7.0]])
    log_back = torch.tensor([[-30.0, 0.0, 50.0, 200.0]], requires_grad=True)  # exp(200) overflows float32
    logits = torch.tensor([[-80.0, 80.0, 0.0, 30.0]], requires_grad=True)
    ll = log_nb_mixture_from_log_means(y, log_back, log_back + 1.0, torch.zeros(4), logits)
    ll.sum().backward()
    assert torch.isfinite(ll).all()
    assert torch.isfinite(log_back.grad).all() and torch.isfinite(logits.grad).all()


def test_fast_digamma_is_accurate_over_the_range_of_counts_plus_dispersions():
    z = torch.logspace(-6, 8, 50_001, dtype=torch.float64)
    assert (fast_digamma(z) - torch.digamma(z)).abs().max() < 1e-7
    z32 = z.float()
    rel = (fast_digamma(z32).double() - torch.digamma(z)).abs() / torch.digamma(z).abs().clamp(min=1.0)
    assert rel.max() < 1e-6


def _fused_inputs(dtype, theta_per_cell=False, seed=0, zero_fraction=0.6, high=5000):
    rng = np.random.default_rng(seed)
    n, g = 9, 13
    x = torch.tensor(_counts(rng, (n, g), zero_fraction, high), dtype=dtype)
    logits = torch.tensor(rng.normal(0.0, 2.0, size=(n, g)), dtype=dtype, requires_grad=True)
    log_library = torch.tensor(rng.normal(7.0, 1.0, size=n), dtype=dtype, requires_grad=True)
    shape = (n, g) if theta_per_cell else (g,)
    log_theta = torch.tensor(rng.normal(0.0, 1.5, size=shape), dtype=dtype, requires_grad=True)
    return x, logits, log_library, log_theta


@pytest.mark.parametrize("theta_per_cell", [False, True])
def test_fused_rna_likelihood_equals_sum_of_log_nb(theta_per_cell):
    x, logits, log_library, log_theta = _fused_inputs(torch.float64, theta_per_cell)
    mu = log_library.exp().unsqueeze(1) * torch.softmax(logits, dim=1)
    expected = log_nb(x, mu, log_theta.exp(), eps=0.0).sum(1)
    torch.testing.assert_close(nb_log_likelihood_from_logits(x, logits, log_library, log_theta), expected,
                               rtol=1e-10, atol=1e-8)


@pytest.mark.parametrize("theta_per_cell", [False, True])
def test_fused_rna_likelihood_gradients_pass_gradcheck(theta_per_cell):
    x, logits, log_library, log_theta = _fused_inputs(torch.float64, theta_per_cell, high=300)
    fn = lambda h, ll, lt: nb_log_likelihood_from_logits(x, h, ll, lt)  # noqa: E731
    # fast_digamma is accurate to ~1e-8, which bounds how close the analytic theta gradient can be
    assert torch.autograd.gradcheck(fn, (logits, log_library, log_theta), eps=1e-6, atol=1e-5, rtol=1e-5)


def test_fused_rna_likelihood_matches_scvi_for_the_same_decoder_outputs():
    """Same decoder outputs (logits, library, dispersion) -> same per-cell RNA reconstruction term as scvi-tools."""
    x, logits, log_library, log_theta = _fused_inputs(torch.float32, seed=4)
    with torch.no_grad():
        # scvi-tools' decoder: px_scale = softmax(logits), px_rate = library * px_scale, px_r = exp(raw)
        rate = log_library.exp().unsqueeze(1) * torch.softmax(logits, dim=-1)
        scvi_reconst = -scvi_distributions.NegativeBinomial(mu=rate, theta=log_theta.exp()).log_prob(x).sum(-1)
        ours = -nb_log_likelihood_from_logits(x, logits, log_library, log_theta)
    torch.testing.assert_close(ours, scvi_reconst, rtol=1e-5, atol=2e-2)


@pytest.mark.parametrize("zero_fraction,high", [(0.97, 3), (0.0, 200_000)])
def test_fused_rna_likelihood_gradients_are_finite_on_sparse_and_large_counts(zero_fraction, high):
    x, logits, log_library, log_theta = _fused_inputs(torch.float32, zero_fraction=zero_fraction, high=high)
    if zero_fraction > 0.9:
        x[0] = 0.0  # a cell with no counts at all
    nb_log_likelihood_from_logits(x, logits * 10, log_library, log_theta * 3).sum().backward()
    for t in (logits, log_library, log_theta):
        assert torch.isfinite(t.grad).all()


def test_sum_lgamma_counts_table_and_fallback_agree_with_lgamma():
    rng = np.random.default_rng(5)
    counts = torch.tensor(_counts(rng, (20, 30), high=70_000), dtype=torch.float32)
    for x in (counts, counts + 0.5, counts * 1000.0):  # table, non-integer fallback, beyond-the-table fallback
        torch.testing.assert_close(sum_lgamma_counts(x), torch.lgamma(x.double() + 1).sum(1).float(),
                                   rtol=1e-6, atol=1e-2)


@pytest.mark.parametrize("theta_per_cell", [False, True])
def test_fused_rna_likelihood_accepts_column_major_counts(theta_per_cell):
    x, logits, log_library, log_theta = _fused_inputs(torch.float32, theta_per_cell, high=300)
    column_major = x.t().contiguous().t()
    torch.testing.assert_close(nb_log_likelihood_from_logits(column_major, logits, log_library, log_theta),
                               nb_log_likelihood_from_logits(x, logits, log_library, log_theta), rtol=1e-6, atol=0)
