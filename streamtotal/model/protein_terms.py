"""totalVI's per-cell protein terms: the NB-mixture negative log-likelihood and the background KL, summed over the
measured proteins.

On CPU (float32) the compiled kernel (native/protein_kernel.c, the custom operator
``torch.ops.streamtotal.protein_terms``, eager and under ``torch.compile``) computes both terms and their
derivatives in one pass; elsewhere (GPU, float64, no compiler) the same functions are computed with torch
operations (``torch_protein_terms``), which the kernel is tested against (tests/model/test_protein_terms.py).
"""

from __future__ import annotations

import torch

from streamtotal.model import native
from streamtotal.model.likelihoods import log_nb_mixture_from_log_means


def torch_protein_terms(y, mask, log_back, back_scale, back_mean, fore_scale, mix_logits, theta, prior_mean,
                        prior_log_scale) -> tuple[torch.Tensor, torch.Tensor]:
    """``protein_terms`` in torch operations (any device and float dtype, autograd)."""
    # Every [B, T] input is replaced at unmeasured entries by a harmless value before anything is computed from it.
    # Masking only the result would not do: a NaN or inf there (a count, a decoder output, a prior never fitted for
    # that protein) makes a NaN local derivative, and the masked-out branch's zero gradient times NaN is NaN, which
    # reaches every weight. torch.where gives the replaced entries an exact zero gradient, as the kernel does.
    y = torch.where(mask, y, 0.0)
    log_back, back_mean, mix_logits, prior_mean, prior_log_scale = (
        torch.where(mask, v, 0.0) for v in (log_back, back_mean, mix_logits, prior_mean, prior_log_scale))
    back_scale, fore_scale = (torch.where(mask, v, 1.0) for v in (back_scale, fore_scale))
    if theta.shape == mask.shape:  # one theta per protein ([T]) is a shared parameter, not an unmeasured entry
        theta = torch.where(mask, theta, 1.0)
    ll = log_nb_mixture_from_log_means(y, log_back, log_back + fore_scale.log(), theta.log(), mix_logits)
    nll = -torch.where(mask, ll, 0.0).sum(dim=1)
    prior_var = (2.0 * prior_log_scale).exp()
    kl = prior_log_scale - back_scale.log() + (back_scale.square() + (back_mean - prior_mean).square()) / (
        2.0 * prior_var) - 0.5
    return nll, torch.where(mask, kl, 0.0).sum(dim=1)


def protein_terms(
    y: torch.Tensor,
    mask: torch.Tensor,
    log_back: torch.Tensor,
    back_scale: torch.Tensor,
    back_mean: torch.Tensor,
    fore_scale: torch.Tensor,
    mix_logits: torch.Tensor,
    theta: torch.Tensor,
    prior_mean: torch.Tensor,
    prior_log_scale: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-cell ``(-sum_t log p(y_t | ...), sum_t KL(q(log beta_t) || p(log beta_t)))`` over measured proteins.

    ``log p(y_t)`` is ``log_nb_mixture_from_log_means(y, log_back, log_back + log fore_scale, log theta,
    mix_logits)``; the KL is between N(back_mean, back_scale^2) and N(prior_mean, exp(prior_log_scale)^2).
    Differentiable in everything but ``y`` and ``mask``. Unmeasured entries may hold anything, NaN and inf included:
    they add nothing to either term and get a zero gradient, on both paths.

    Args:
        y: ``[B, T]`` protein counts.
        mask: ``[B, T]`` bool, True where measured.
        log_back: ``[B, T]`` log background means (sampled in training).
        back_scale: ``[B, T]`` posterior scale of the log background, > 0.
        back_mean: ``[B, T]`` posterior mean of the log background.
        fore_scale: ``[B, T]`` foreground multiplier, >= 1.
        mix_logits: ``[B, T]`` logits of the background component.
        theta: ``[T]`` or ``[B, T]`` inverse dispersions, > 0.
        prior_mean: ``[B, T]`` background prior means (gathered by batch).
        prior_log_scale: ``[B, T]`` log background prior scales (gathered by batch).

    Returns:
        ``([B] protein negative log-likelihood, [B] background KL)``.
    """
    args = (y, mask, log_back, back_scale, back_mean, fore_scale, mix_logits, theta, prior_mean, prior_log_scale)
    if native.float32_cpu(y, log_back, back_scale, back_mean, fore_scale, mix_logits, theta, prior_mean,
                              prior_log_scale):
        return native.protein_terms(*args)
    return torch_protein_terms(*args)
