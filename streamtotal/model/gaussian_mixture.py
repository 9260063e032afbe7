"""A two-component 1-D Gaussian mixture fitted by EM, column by column, with missing entries.

Used for the empirical protein background prior: one fit per (batch, protein) on log(y + 1). All proteins of
a batch are fitted at once (vectorised over columns), which is why this is ours and not a loop over
``sklearn.mixture.GaussianMixture`` (a test checks that both agree).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class TwoGaussians:
    """Per-column fit, components sorted by mean (index 0 = lower). Columns that could not be fitted are NaN.

    Attributes:
        means: ``[T, 2]`` component means.
        stds: ``[T, 2]`` component standard deviations.
        weights: ``[T, 2]`` mixing weights (rows sum to 1).
    """

    means: np.ndarray
    stds: np.ndarray
    weights: np.ndarray


def _masked_quantile(values: np.ndarray, mask: np.ndarray, q: float) -> np.ndarray:
    ordered = np.sort(np.where(mask, values, np.inf), axis=0)
    count = mask.sum(axis=0)
    idx = np.clip(np.floor(q * (count - 1)).astype(np.int64), 0, values.shape[0] - 1)
    return np.take_along_axis(ordered, idx[None, :], axis=0)[0]


def fit_two_gaussians(
    values: np.ndarray,
    mask: np.ndarray,
    *,
    min_count: int = 20,
    min_var: float = 1e-4,
    max_iter: int = 300,
    tol: float = 1e-7,
) -> TwoGaussians:
    """Fits a two-component Gaussian mixture to each column of ``values`` using the entries where ``mask``.

    Initialised by a few rounds of 1-D k-means started at the 10th and 90th percentiles (sklearn's default
    init is k-means too), then EM until the mean log-likelihood improves by less than ``tol``.

    Args:
        values: ``[n, T]`` observations.
        mask: ``[n, T]`` bool, True where an observation exists.
        min_count: columns with fewer observations are not fitted (NaN).
        min_var: floor of a component's variance; stops a component collapsing onto one repeated value
            (e.g. the zeros of a sparse protein).
        max_iter: EM iteration cap.
        tol: convergence threshold on the mean log-likelihood per observation.

    Returns:
        The per-column fit.
    """
    values = np.asarray(values, dtype=np.float64)
    mask = np.asarray(mask, dtype=bool)
    w = mask.astype(np.float64)
    v = np.where(mask, values, 0.0)
    count = w.sum(axis=0)
    fit = count >= max(min_count, 2)
    n_cols = values.shape[1]
    means = np.full((n_cols, 2), np.nan)
    stds = np.full((n_cols, 2), np.nan)
    weights = np.full((n_cols, 2), np.nan)
    if not fit.any():
        return TwoGaussians(means, stds, weights)
    v, w, count = v[:, fit], w[:, fit], count[fit]
    m = mask[:, fit]

    lo, hi = _masked_quantile(v, m, 0.1), _masked_quantile(v, m, 0.9)
    hi = np.where(hi > lo, hi, lo + 1e-3)
    for _ in range(10):  # k-means in 1-D: split at the midpoint, recompute the two means
        upper = (v > 0.5 * (lo + hi)) * w
        lower = w - upper
        n_up, n_lo = upper.sum(0), lower.sum(0)
        hi = np.where(n_up > 0, (upper * v).sum(0) / np.maximum(n_up, 1e-12), hi)
        lo = np.where(n_lo > 0, (lower * v).sum(0) / np.maximum(n_lo, 1e-12), lo)
    mu = np.stack([lo, hi])  # [2, T']
    total_var = np.maximum(((v - (v * w).sum(0) / count) ** 2 * w).sum(0) / count, min_var)
    var = np.stack([total_var, total_var])
    pi = np.full_like(mu, 0.5)

    previous = -np.inf
    for _ in range(max_iter):
        log_dens = (
            np.log(pi)[:, None, :]
            - 0.5 * np.log(2.0 * np.pi * var)[:, None, :]
            - (v[None] - mu[:, None, :]) ** 2 / (2.0 * var[:, None, :])
        )  # [2, n, T']
        log_norm = np.logaddexp(log_dens[0], log_dens[1])
        resp = np.exp(log_dens - log_norm[None]) * w[None]
        n_k = np.maximum(resp.sum(axis=1), 1e-10)
        pi = n_k / count
        mu = (resp * v[None]).sum(axis=1) / n_k
        var = np.maximum((resp * (v[None] - mu[:, None, :]) ** 2).sum(axis=1) / n_k, min_var)
        loglik = float((log_norm * w).sum() / count.sum())
        if loglik - previous < tol:
            break
        previous = loglik

    order = np.argsort(mu, axis=0)  # lower component first
    means[fit] = np.take_along_axis(mu, order, axis=0).T
    stds[fit] = np.sqrt(np.take_along_axis(var, order, axis=0)).T
    weights[fit] = np.take_along_axis(pi, order, axis=0).T
    return TwoGaussians(means, stds, weights)
