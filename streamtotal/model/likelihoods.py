"""Elementwise log-likelihoods of the negative binomial and of totalVI's protein NB mixture.

Both use the mean / inverse-dispersion parameterisation of scvi-tools (NB(x; mu, theta) has mean mu and
variance mu + mu^2 / theta) and include the lgamma(x + 1) term, so they are true log-probabilities that can be
compared with scipy and scvi-tools. The per-cell RNA term used in training has a fused, faster sibling in
``rna_likelihood.py``; these are the reference versions and the protein path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

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

    Working from log means avoids exponentiating the sampled log background: ``log(theta + mu)`` is
    ``logaddexp(log theta, log mu)``, finite for any log mean, where ``log(theta + exp(.))`` overflows to
    inf - inf = NaN for a large sample. The terms shared by both components are computed once, and
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
    shared = theta * log_theta - torch.lgamma(theta) + torch.lgamma(y + theta) - torch.lgamma(y + 1.0)
    theta_y = theta + y
    back = y * log_mu_back - theta_y * torch.logaddexp(log_theta, log_mu_back) - F.softplus(-logit_mix)
    fore = y * log_mu_fore - theta_y * torch.logaddexp(log_theta, log_mu_fore) - F.softplus(logit_mix)
    return shared + torch.logaddexp(back, fore)
