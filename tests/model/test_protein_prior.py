"""The streaming priors: planted background recovered, masks respected, memory bounded, fallbacks, library stats."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from streamtotal.errors import ModelInputError
from streamtotal.model.gaussian_mixture import fit_two_gaussians
from streamtotal.model.protein_prior import (
    FIXED_BACKGROUND_MEAN,
    FIXED_BACKGROUND_SCALE,
    LibraryPrior,
    ProteinBackgroundPrior,
)


def _two_component_counts(rng, n, back_means, back_sds, fore_shift=2.5, fore_fraction=0.35):
    """Protein counts whose log1p is a mixture: background N(back_mean, sd) and foreground shifted up."""
    t = len(back_means)
    log_level = rng.normal(back_means, back_sds, size=(n, t))
    fore = rng.random((n, t)) < fore_fraction
    log_level = np.where(fore, log_level + fore_shift, log_level)
    return np.round(np.expm1(log_level)).clip(min=0)


def test_background_prior_recovers_planted_background_per_batch_and_protein():
    rng = np.random.default_rng(0)
    means = {0: np.array([3.0, 4.0, 2.5, 5.0]), 1: np.array([3.5, 2.8, 4.2, 3.0])}
    sds = np.array([0.3, 0.4, 0.35, 0.3])
    prior = ProteinBackgroundPrior(4, 2, seed=0)
    for _ in range(6):  # streamed in minibatches, batches interleaved
        for b in (0, 1):
            y = _two_component_counts(rng, 500, means[b], sds)
            mask = torch.ones(500, 4, dtype=torch.bool)
            prior.update(torch.tensor(y, dtype=torch.float32), torch.full((500,), b), mask)
    c, d = prior.finalize()
    assert c.shape == d.shape == (4, 2) and c.dtype == torch.float32
    for b in (0, 1):
        np.testing.assert_allclose(c[:, b].numpy(), means[b], atol=0.08)
        np.testing.assert_allclose(d[:, b].numpy(), sds, atol=0.06)


def test_background_prior_ignores_masked_entries():
    rng = np.random.default_rng(1)
    y = _two_component_counts(rng, 2000, np.array([3.0, 3.0, 3.0]), np.array([0.3, 0.3, 0.3]))
    mask = rng.random(y.shape) > 0.3
    garbage = np.where(mask, y, 1e7)  # masked entries hold absurd values that must not be looked at
    clean = ProteinBackgroundPrior(3, 1, seed=0)
    clean.update(np.where(mask, y, 0.0), np.zeros(2000), mask)
    dirty = ProteinBackgroundPrior(3, 1, seed=0)
    dirty.update(garbage, np.zeros(2000), mask)
    for a, b in zip(clean.finalize(), dirty.finalize()):
        torch.testing.assert_close(a, b)
    np.testing.assert_allclose(dirty.finalize()[0].numpy(), 3.0, atol=0.08)


def test_background_prior_falls_back_for_unmeasured_batch_protein_pairs():
    rng = np.random.default_rng(2)
    prior = ProteinBackgroundPrior(3, 3, seed=0)
    means = {0: np.array([3.0, 4.0, 2.0]), 1: np.array([3.4, 4.6, 2.0])}
    for b in (0, 1):
        y = _two_component_counts(rng, 1500, means[b], np.array([0.3, 0.3, 0.3]))
        mask = np.ones_like(y, dtype=bool)
        mask[:, 2] = False  # protein 2 measured nowhere
        if b == 1:
            mask[:, 1] = False  # protein 1 not measured in batch 1
        prior.update(y, np.full(1500, b), mask)
    # batch 2 never seen
    c, d = prior.finalize()
    assert abs(c[1, 1] - c[1, 0]) < 1e-6  # only batch 0 measured protein 1
    assert abs(c[0, 2] - (c[0, 0] + c[0, 1]) / 2) < 1e-5  # unseen batch: average of the fitted batches
    assert c[2].tolist() == [FIXED_BACKGROUND_MEAN] * 3 and d[2].tolist() == [FIXED_BACKGROUND_SCALE] * 3
    assert torch.isfinite(c).all() and (d > 0).all()


def test_background_prior_reservoir_is_bounded_and_uniform():
    prior = ProteinBackgroundPrior(1, 1, max_cells_per_batch=500, seed=0)
    n = 20_000
    for start in range(0, n, 1000):  # the value is the cell's position in the stream
        ids = np.arange(start, start + 1000, dtype=np.float64)[:, None]
        prior.update(np.expm1(ids / n), np.zeros(1000), None)
    reservoir = prior._reservoirs[0]
    assert reservoir.filled == 500 and len(reservoir.values) == 500 and reservoir.seen == n
    positions = reservoir.values[:, 0].astype(np.float64) * n  # stored as log1p(y) = position / n
    # a uniform sample of 0..n-1 has mean n/2 with standard error n/sqrt(12*500) ~ 258
    assert abs(positions.mean() - n / 2) < 4 * n / np.sqrt(12 * 500)
    assert prior.cells_seen().tolist() == [n]


def test_two_gaussian_fit_agrees_with_sklearn():
    sklearn_mixture = pytest.importorskip("sklearn.mixture")
    rng = np.random.default_rng(3)
    values = np.concatenate([rng.normal(1.0, 0.4, 700), rng.normal(4.0, 0.7, 300)])[:, None]
    ours = fit_two_gaussians(values, np.ones_like(values, dtype=bool))
    ref = sklearn_mixture.GaussianMixture(2, random_state=0, tol=1e-8, max_iter=1000).fit(values)
    order = np.argsort(ref.means_.ravel())
    np.testing.assert_allclose(ours.means[0], ref.means_.ravel()[order], atol=1e-3)
    np.testing.assert_allclose(ours.stds[0], np.sqrt(ref.covariances_.ravel()[order]), atol=1e-3)
    np.testing.assert_allclose(ours.weights[0], ref.weights_[order], atol=1e-3)


def test_background_prior_rejects_bad_input():
    prior = ProteinBackgroundPrior(3, 2)
    with pytest.raises(ModelInputError):
        prior.finalize()  # nothing seen
    with pytest.raises(ModelInputError):
        prior.update(np.zeros((4, 2)), np.zeros(4))  # wrong protein count
    with pytest.raises(ModelInputError):
        prior.update(np.zeros((4, 3)), np.array([0, 1, 2, 0]))  # batch code out of range


def test_library_prior_streams_to_the_per_batch_log_library_statistics():
    rng = np.random.default_rng(4)
    n_batch = 4
    rna = rng.poisson(rng.gamma(2.0, 1.0, size=(3000, 50)) * rng.integers(1, 30, size=(3000, 1))).astype(np.float32)
    rna[:7] = 0  # cells without counts are skipped
    batch = rng.integers(0, 3, size=3000)  # batch 3 never occurs
    prior = LibraryPrior(n_batch)
    for start in range(0, 3000, 256):
        prior.update(torch.tensor(rna[start : start + 256]), torch.tensor(batch[start : start + 256]))
    mean, var = prior.finalize()
    library = rna.sum(1).astype(np.float64)
    keep = library > 0
    log_lib = np.log(np.where(keep, library, 1.0))
    for b in range(3):
        sel = keep & (batch == b)
        assert abs(mean[b] - log_lib[sel].mean()) < 1e-5
        assert abs(var[b] - log_lib[sel].var()) < 1e-5
    assert abs(mean[3] - log_lib[keep].mean()) < 1e-5 and abs(var[3] - log_lib[keep].var()) < 1e-5


def test_library_prior_rejects_empty_and_bad_input():
    prior = LibraryPrior(2)
    with pytest.raises(ModelInputError):
        prior.finalize()
    with pytest.raises(ModelInputError):
        prior.update(np.ones((3, 5)), np.array([0, 1, 2]))
