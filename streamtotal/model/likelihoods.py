"""Elementwise log-likelihoods of the negative binomial and of totalVI's protein NB mixture.

Both use the mean / inverse-dispersion parameterisation of scvi-tools (NB(x; mu, theta) has mean mu and
variance mu + mu^2 / theta) and include the lgamma(x + 1) term, so they are true log-probabilities that can be
compared with scipy and scvi-tools. The per-cell RNA term used in training has a fused, faster sibling in
``rna_likelihood.py``; these are the reference versions and the protein path.
"""

from __future__ import annotations

import torch

EPS = 1e-8
"""Added inside logarithms of means and dispersions (as scvi-tools) so a zero mean gives a finite value."""


def log_nb(x: torch.Tensor, mu: torch.Tensor, theta: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """Elementwise log NB(x; mean=mu, inverse dispersion=theta).

    Written as ``theta*log(theta) + x*log(mu) - (theta + x)*log(theta + mu) + lgamma(x + theta) - lgamma(theta)
    - lgamma(x + 1)`` so ``log(theta + mu)`` is taken once, and ``theta*log(theta) - lgamma(theta)`` is computed
    on theta's own (usually per-gene, much smaller) shape before broadcasting.

    Args:
        x: observed counts (any float dtype), broadcastable with ``mu``.
        mu: NB means, > 0.
        theta: inverse dispersions, > 0; may be smaller than ``mu`` (e.g. ``[G]`` against ``[B, G]``).
        eps: added inside the logarithms for stability at ``mu == 0``.

    Returns:
        The broadcast-shaped tensor of log-probabilities.
    """
    theta_part = theta * torch.log(theta + eps) - torch.lgamma(theta)
    return (
        theta_part
        + x * torch.log(mu + eps)
        - (theta + x) * torch.log(theta + mu + eps)
        + torch.lgamma(x + theta)
        - torch.lgamma(x + 1.0)
    )


def log_nb_mixture(
    y: torch.Tensor,
    mu_back: torch.Tensor,
    mu_fore: torch.Tensor,
    theta: torch.Tensor,
    logit_mix: torch.Tensor,
    eps: float = EPS,
) -> torch.Tensor:
    """Elementwise log of totalVI's protein likelihood pi*NB(y; mu_back, theta) + (1-pi)*NB(y; mu_fore, theta).

    ``pi = sigmoid(logit_mix)`` is the weight of the BACKGROUND component, as in scvi-tools.

    Args:
        y: observed protein counts.
        mu_back: background NB means, >= 0.
        mu_fore: foreground NB means, >= 0.
        theta: inverse dispersion shared by both components, > 0.
        logit_mix: logits of the background probability.
        eps: added inside the logarithms (as scvi-tools) so zero means stay finite.

    Returns:
        The broadcast-shaped tensor of log-probabilities.
    """
    return log_nb_mixture_from_log_means(
        y, torch.log(mu_back + eps), torch.log(mu_fore + eps), torch.log(theta + eps), logit_mix
    )


def log_nb_mixture_from_log_means(
    y: torch.Tensor,
    log_mu_back: torch.Tensor,
    log_mu_fore: torch.Tensor,
    log_theta: torch.Tensor,
    logit_mix: torch.Tensor,
) -> torch.Tensor:
    """``log_nb_mixture`` with means and dispersion given as logarithms; what the model uses.

    Each component's log NB is written, as in the native kernel (native/protein_kernel.c), as

        log NB(y; mu, theta) = C(y, theta) + y log mu - (theta + y) softplus(log mu - log theta),
        C(y, theta) = lgamma(y + theta) - lgamma(theta) - lgamma(y + 1) - y log theta,

    that is with ``log(theta + mu) = log theta + softplus(log mu - log theta)``: the textbook ``theta log theta -
    (theta + y) log(theta + mu)`` and ``lgamma(y + theta) - lgamma(theta)`` subtract numbers of size theta log theta
    (1.4e7 at theta = 1e6), which in float32 gave the value wrong by ~1 and the dispersion gradient wrong in sign
    from theta ~ 1e5 on. Here no large terms cancel (``nb_coefficient`` takes C by Stirling's series at large
    theta), so values and gradients (autograd) keep float32 accuracy up to theta = 1e6 and beyond.

    Working from log means also avoids exponentiating the sampled log background (finite for any log mean), and
    ``log(pi) = -softplus(-logit)``, ``log(1 - pi) = -softplus(logit)`` stay finite for any logit.

    Args:
        y: observed protein counts.
        log_mu_back: log background NB means.
        log_mu_fore: log foreground NB means.
        log_theta: log inverse dispersion shared by both components.
        logit_mix: logits of the background probability.

    Returns:
        The broadcast-shaped tensor of log-probabilities.
    """
    theta = log_theta.exp()
    theta_y = theta + y
    back = y * log_mu_back - theta_y * _softplus(log_mu_back - log_theta) - _softplus(-logit_mix)
    fore = y * log_mu_fore - theta_y * _softplus(log_mu_fore - log_theta) - _softplus(logit_mix)
    return nb_coefficient(y, theta, log_theta) + torch.logaddexp(back, fore)


def _softplus(x: torch.Tensor) -> torch.Tensor:
    """log(1 + e^x), exact at every x (``torch.nn.functional.softplus`` returns x itself above 20: off by e^-20,
    which float64 shows)."""
    return torch.logaddexp(x, torch.zeros((), dtype=x.dtype, device=x.device))


STIRLING_FROM = 10.0
"""``nb_coefficient`` uses Stirling's series from this theta on (its truncation error there is below 1e-12)."""


def _stirling_series(z: torch.Tensor) -> torch.Tensor:
    """lgamma(z) - [(z - 1/2) log z - z + log(2 pi) / 2] for z >= 10: 1/(12 z) - 1/(360 z^3) + 1/(1260 z^5) - ..."""
    r = z.reciprocal()
    r2 = r * r
    return r * (1.0 / 12.0 - r2 * (1.0 / 360.0 - r2 * (1.0 / 1260.0 - r2 * (1.0 / 1680.0))))


def nb_coefficient(y: torch.Tensor, theta: torch.Tensor, log_theta: torch.Tensor) -> torch.Tensor:
    """``lgamma(y + theta) - lgamma(theta) - lgamma(y + 1) - y log theta``, the NB's terms that are not in mu.

    Below ``STIRLING_FROM`` the lgamma values are small and are taken directly. From there on, with Stirling's
    formula lgamma(z) = (z - 1/2) log z - z + log(2 pi)/2 + s(z),

        lgamma(y + theta) - lgamma(theta) - y log theta
            = (theta + y - 1/2) log1p(y / theta) - y + s(theta + y) - s(theta),

    whose terms are of the size of y (not of theta log theta), and whose autograd derivative in theta,
    ``log1p(y/theta) - (theta + y - 1/2) y / (theta (theta + y)) + s'(theta + y) - s'(theta)``, is
    ``psi(y + theta) - psi(theta) - y / theta`` without its cancellation.

    Args:
        y: counts, >= 0.
        theta: inverse dispersions, > 0 (broadcastable with ``y``).
        log_theta: ``log(theta)``, passed so that it is not recomputed.

    Returns:
        The broadcast-shaped coefficient.
    """
    direct = torch.lgamma(y + theta) - torch.lgamma(theta) - y * log_theta
    # The unselected branch must stay finite (torch.where multiplies its gradient by 0, and 0 * inf is NaN): small
    # thetas are raised to STIRLING_FROM before they reach the series.
    big = theta.clamp(min=STIRLING_FROM)
    stirling = (big + y - 0.5) * torch.log1p(y / big) - y + (_stirling_series(big + y) - _stirling_series(big))
    return torch.where(theta >= STIRLING_FROM, stirling, direct) - torch.lgamma(y + 1.0)
