"""The per-cell RNA log-likelihood sum_g log NB(x_g; l * softmax(h)_g, theta_g), fused for speed.

On CPU this term dominates a totalVI step ([256, 2000] tensors): autograd through softmax -> multiply by the
library -> ``log_nb`` makes about thirty passes over the [B, G] tensors and calls ``digamma`` (slow: ~10 ns per
element in torch) on all of them. Here forward and backward are written by hand:

* ``log mu = h - logsumexp(h) + log l`` is exact in log space, so no ``eps``; ``sum_g x log mu`` is taken
  from the centred logits, so ``log mu`` is never materialised, and one ``exp`` gives both the softmax
  normaliser and ``mu``;
* ``log(theta + mu)`` is split as ``log theta + log1p(mu / theta)``, computed once and reused by the backward,
  and both derivatives are written without cancellation, so the dispersion gradient stays accurate where NB
  approaches Poisson (large theta);
* for integer counts and one theta per gene (the training case on CPU), ``lgamma(x + theta) - lgamma(theta) -
  lgamma(x + 1)`` and ``digamma(x + theta) - digamma(theta)`` come from per-gene tables of small counts
  (count_terms.py): one gather per element instead of lgamma and a digamma series;
* otherwise ``lgamma(x + 1)`` of integer counts is a table lookup (``sum_lgamma_counts``) and
  ``digamma(x + theta)`` uses an asymptotic series after a shift of 3 (about 4x faster than ``torch.digamma``,
  absolute error < 1e-7; see ``fast_digamma``);
* per-cell sums use ``vecdot`` and the per-gene theta gradient a single matrix-vector product.

Where the compiled kernels are installed (native/, built by setup.py) they compute the training case (CPU,
float32, one theta per gene) instead, in five passes over the row-major tensors (~3x faster), as the custom
operator ``torch.ops.streamtotal.nb_log_likelihood`` (native/ops.py), eager and under ``torch.compile``.

The result is a true log-probability (lgamma(x + 1) included) and is tested against ``log_nb``, scipy and
scvi-tools, and by ``gradcheck``.
"""

from __future__ import annotations

import torch

from streamtotal.model import native
from streamtotal.model.count_terms import CountTerms, integer_counts


def fast_digamma(z: torch.Tensor) -> torch.Tensor:
    """digamma(z) for z > 0 by recurrence to z + 3 and the asymptotic (Bernoulli) series there.

    psi(z) = psi(z + 3) - 1/z - 1/(z + 1) - 1/(z + 2), and for w >= 3
    psi(w) = log w - 1/(2w) - 1/(12 w^2) + 1/(120 w^4) - 1/(252 w^6) + 1/(240 w^8) - 1/(132 w^10) + O(w^-12),
    whose truncation error at w = 3 is below 5e-8; float32 rounding dominates.

    Args:
        z: positive tensor (any float dtype).

    Returns:
        digamma(z), same shape and dtype.
    """
    shift = z.reciprocal()
    shift += (z + 1.0).reciprocal_()
    shift += (z + 2.0).reciprocal_()
    w = z + 3.0
    inv = w.reciprocal()
    u = inv * inv
    series = u * (1.0 / 132.0)
    series = (1.0 / 240.0) - series
    series = series.mul_(u).sub_(1.0 / 252.0).neg_()  # 1/252 - u*(1/240 - u/132)
    series = series.mul_(u).sub_(1.0 / 120.0).neg_()
    series = series.mul_(u).sub_(1.0 / 12.0).mul_(u)  # u*(1/12 - ...) with the sign flipped
    # psi(w) = log w - inv/2 + series  (series already carries the minus of u/12 - ...)
    out = torch.log(w)
    out.sub_(inv, alpha=0.5).add_(series).sub_(shift)
    return out


_LGAMMA_TABLE_MAX = 1 << 20
"""Counts up to this use a lookup table for lgamma(x + 1) (4 MB at most); larger ones call lgamma."""
_lgamma_tables: dict[torch.dtype, torch.Tensor] = {}


def _lgamma_table(top: int, dtype: torch.dtype) -> torch.Tensor:
    table = _lgamma_tables.get(dtype)
    if table is None or len(table) <= top:
        size = max(1024, 1 << top.bit_length())  # grow by powers of two so it is rebuilt O(log max) times
        table = torch.lgamma(torch.arange(size, dtype=torch.float64) + 1.0).to(dtype)
        _lgamma_tables[dtype] = table
    return table


def sum_lgamma_counts(x: torch.Tensor) -> torch.Tensor:
    """Per-row sum of lgamma(x + 1), the NB's data-only term (no gradient).

    On CPU, integer counts (what raw counts are) are looked up in a table: a gather instead of an lgamma
    per element, about 2x cheaper. Anything else (non-integer or huge values, other devices) calls lgamma.

    Args:
        x: ``[B, G]`` counts.

    Returns:
        ``[B]`` sums.
    """
    found = integer_counts(x)
    if found is not None and found[1] < _LGAMMA_TABLE_MAX:
        as_int, top = found
        return _lgamma_table(top, x.dtype).index_select(0, as_int.reshape(-1)).view(x.shape).sum(1)
    return torch.lgamma(x + 1.0).sum(1)


class _NBLogitsLogLik(torch.autograd.Function):
    """Fused forward/backward of the per-cell NB log-likelihood; see the module docstring."""

    @staticmethod
    def forward(ctx, x, logits, log_library, log_theta):  # noqa: D102 - documented on the public wrapper
        # Mixed-precision autocast would run the dot products in bf16/fp16: the likelihood stays float32.
        dtype = torch.promote_types(x.dtype, torch.float32)  # float32, or float64 for float64 data
        with torch.autocast(x.device.type, enabled=False):
            x, logits, log_library, log_theta = (t.to(dtype) for t in (x, logits, log_library, log_theta))
            return _NBLogitsLogLik._forward(ctx, x, logits, log_library, log_theta)

    @staticmethod
    def _forward(ctx, x, logits, log_library, log_theta):
        x = x.contiguous()  # row sums then add in the same order whatever the counts' layout
        theta = log_theta.exp()
        # log mu = (h - max h) - log s + log l with s = sum exp(h - max h); sum_g x log mu is then taken from
        # the centred logits before they are exponentiated in place into mu, so log mu is never stored.
        centred = logits - logits.amax(dim=1, keepdim=True)
        x_log_mu = torch.linalg.vecdot(x, centred)
        mu = centred.exp_()
        norm = mu.sum(dim=1)
        x_log_mu -= x.sum(dim=1) * (norm.log() - log_library)
        mu *= (log_library.exp() / norm).unsqueeze(1)
        theta_mu = mu + theta
        # log(theta + mu) = log theta + log1p(mu / theta), and theta log theta - (x + theta) log(theta + mu) =
        # -x log theta - (x + theta) log1p(mu / theta): no two nearly equal logarithms are subtracted at large theta.
        log1p_mu_theta = torch.log1p(mu / theta)
        x_theta = x + theta
        x_log_theta = torch.mv(x, log_theta) if log_theta.dim() == 1 else torch.linalg.vecdot(x, log_theta)
        ll = x_log_mu - x_log_theta - torch.linalg.vecdot(x_theta, log1p_mu_theta)
        counts = CountTerms.build(x, theta, with_digamma=ctx.needs_input_grad[3])
        if counts is not None:  # integer counts, per-gene theta, CPU: C(x, theta) by table (count_terms.py)
            ll += counts.log_coefficient
        else:  # lgamma(theta) lives on theta's own shape ([G] or [B, G])
            ll -= torch.lgamma(theta).sum(-1)
            ll += torch.lgamma(x_theta).sum(1)
            ll -= sum_lgamma_counts(x)
        ctx.counts = counts
        ctx.save_for_backward(x, mu, theta_mu, log1p_mu_theta, theta, log_library)
        return ll

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        with torch.autocast(grad.device.type, enabled=False):
            return _NBLogitsLogLik._backward(ctx, grad.to(ctx.saved_tensors[0].dtype))

    @staticmethod
    def _backward(ctx, grad):
        x, mu, theta_mu, log1p_mu_theta, theta, log_library = ctx.saved_tensors
        need_logits, need_library, need_theta = ctx.needs_input_grad[1:4]
        grad_logits = grad_library = grad_log_theta = None
        # With r = 1 / (theta + mu), both derivatives are written without cancellation (as in native/nb_kernel.c):
        #   d ll / d log mu    = x - (x + theta) mu r = theta (x - mu) r
        #   d ll / d log theta = theta [psi(x + theta) - psi(theta) - log1p(mu / theta) - (x - mu) r]
        # The textbook form log theta + 1 - log(theta + mu) - (x + theta) r + ... subtracts terms near log theta + 1
        # and, multiplied by theta, lost all precision at large theta (relative error ~1 at theta = 8,000).
        diff_r = (x - mu).div_(theta_mu)
        if need_logits or need_library:
            dlogmu = diff_r * theta
            total = dlogmu.sum(1)
            if need_library:
                grad_library = grad * total
            if need_logits:
                # log mu = h - logsumexp(h) + log l, so d/dh = dlogmu - softmax(h) * sum(dlogmu), softmax = mu / l
                coef = (-total * torch.exp(-log_library)).unsqueeze(1)
                grad_logits = torch.addcmul(dlogmu, mu, coef).mul_(grad.unsqueeze(1))
        if need_theta:
            if ctx.counts is not None:  # psi(x + theta) - psi(theta) by table (count_terms.py)
                per_elem = ctx.counts.digamma_difference()
            else:
                per_elem = fast_digamma(x + theta).sub_(fast_digamma(theta))
            per_elem = per_elem.sub_(log1p_mu_theta).sub_(diff_r)
            if theta.dim() == 1:
                grad_theta = torch.mv(per_elem.t(), grad)
            else:
                grad_theta = per_elem.mul_(grad.unsqueeze(1))
            grad_log_theta = grad_theta * theta
        return None, grad_logits, grad_library, grad_log_theta


def _fused_log_likelihood(x: torch.Tensor, logits: torch.Tensor, log_library: torch.Tensor,
                          log_theta: torch.Tensor) -> torch.Tensor:
    """The compiled kernel's custom op where it applies (CPU, float32 after promotion, one theta per gene; eager
    and under torch.compile), ``_NBLogitsLogLik`` otherwise."""
    # Under mixed-precision autocast the logits may be bf16/fp16: the likelihood is computed in float32 either way.
    dtype = torch.promote_types(x.dtype, torch.float32)
    promoted = [t.to(dtype) for t in (x, logits, log_library, log_theta)]
    if native.applies(*promoted):
        return native.nb_log_likelihood(*promoted)
    return _NBLogitsLogLik.apply(x, logits, log_library, log_theta)


MASKED_LOGIT_GAP = 1.0e4
"""Absent genes' logits are set this far below the cell's largest logit: their softmax weight, mean and every
per-element term then underflow to exactly 0, in float32 and float64, in the torch and the native path."""


def nb_log_likelihood_from_logits(
    x: torch.Tensor, logits: torch.Tensor, log_library: torch.Tensor, log_theta: torch.Tensor,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-cell sum over genes of log NB(x; mean = exp(log_library) * softmax(logits), theta = exp(log_theta)).

    Differentiable in ``logits``, ``log_library`` and ``log_theta`` (not in ``x``).

    With ``mask``, only measured genes count: the sum runs over them and the softmax is renormalised over them
    (so ``exp(log_library)``, the cell's total over its measured genes, is the mean total of those genes). This
    is the NB likelihood of the measured genes alone, computed by the same fused (or native) code: absent genes'
    counts are set to 0 and their logits ``MASKED_LOGIT_GAP`` below the cell's largest, where every term and
    derivative is exactly 0, and the substitution itself passes no gradient to them. A cell with no measured
    gene gets 0.

    Args:
        x: ``[B, G]`` counts.
        logits: ``[B, G]`` unnormalised log expression proportions (the decoder output before softmax).
        log_library: ``[B]`` log library size.
        log_theta: ``[G]`` (one dispersion per gene) or ``[B, G]`` (e.g. per gene and batch) log inverse
            dispersion.

        mask: ``[B, G]`` bool, True where the gene was measured for the cell; None = every gene.

    Returns:
        ``[B]`` log-likelihoods.
    """
    if mask is None:
        return _fused_log_likelihood(x, logits, log_library, log_theta)
    x = torch.where(mask, x, 0.0)
    fill = logits.detach().amax(dim=1, keepdim=True) - MASKED_LOGIT_GAP
    logits = torch.where(mask, logits, fill)
    ll = _fused_log_likelihood(x, logits, log_library, log_theta)
    return torch.where(mask.any(dim=1), ll, 0.0)
