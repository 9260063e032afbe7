"""Streaming, bounded-memory estimators of totalVI's data-dependent priors.

scvi-tools computes these from the whole AnnData in memory. Here the trainer feeds sampled cells minibatch
by minibatch and calls ``finalize()`` once; memory never depends on the number of cells in the collection.

* ``ProteinBackgroundPrior``: for every batch s and protein t, the mean c and standard deviation d of the
  log protein background, from the lower component of a two-component Gaussian mixture on log(y + 1) (the
  totalVI user guide's recipe). Memory: a uniform reservoir sample of at most ``max_cells_per_batch`` cells
  per batch, stored as float32 log1p values plus a bool mask: ``n_batch * max_cells_per_batch * T * 5`` bytes
  at most (10,000 cells x 200 proteins = 10 MB per batch).
* ``LibraryPrior``: per-batch mean and variance of the log RNA library size, by a mergeable running
  mean/variance (O(n_batch) memory).
"""

from __future__ import annotations

import numpy as np
import torch

from streamtotal.errors import ModelInputError
from streamtotal.model.gaussian_mixture import fit_two_gaussians

FIXED_BACKGROUND_MEAN = 3.0
"""Mean of the log background prior when it is not estimated (scvi-tools' initial value)."""
FIXED_BACKGROUND_SCALE = 1.0
"""Standard deviation of the log background prior when it is not estimated (scvi-tools' initial value)."""


def _numpy(a) -> np.ndarray:
    return a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)


class _Reservoir:
    """Uniform sample (Vitter's algorithm R) of at most ``capacity`` rows of one batch."""

    def __init__(self, capacity: int, n_cols: int) -> None:
        self.capacity, self.seen, self.filled = capacity, 0, 0
        self.values = np.empty((min(capacity, 1024), n_cols), dtype=np.float32)
        self.mask = np.empty((min(capacity, 1024), n_cols), dtype=bool)

    def add(self, values: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> None:
        n_fill = min(self.capacity - self.filled, len(values))
        if n_fill:
            if self.filled + n_fill > len(self.values):  # grow geometrically up to the capacity
                size = min(self.capacity, max(2 * len(self.values), self.filled + n_fill))
                self.values = np.resize(self.values, (size, self.values.shape[1]))
                self.mask = np.resize(self.mask, (size, self.mask.shape[1]))
            self.values[self.filled : self.filled + n_fill] = values[:n_fill]
            self.mask[self.filled : self.filled + n_fill] = mask[:n_fill]
            self.filled += n_fill
        rest = len(values) - n_fill
        if rest:
            # Row with 0-based stream index k replaces a uniform slot j in [0, k] if j < capacity. Numpy keeps
            # the last of repeated indices, which is what doing it row by row would leave.
            k = self.seen + n_fill + np.arange(rest)
            slot = rng.integers(0, k + 1)
            keep = slot < self.capacity
            self.values[slot[keep]] = values[n_fill:][keep]
            self.mask[slot[keep]] = mask[n_fill:][keep]
        self.seen += len(values)


class ProteinBackgroundPrior:
    """Streaming estimate of the per-batch, per-protein prior N(c, d^2) on the log protein background.

    Args:
        n_proteins: T, proteins in the reference panel.
        n_batch: number of batch categories.
        max_cells_per_batch: reservoir size per batch (the memory bound; see the module docstring).
        min_cells: a (batch, protein) with fewer measured cells in the sample is not fitted and falls back
            (see ``finalize``).
        min_scale: floor of the prior's standard deviation d, and of a mixture component's during the fit.
        seed: seed of the reservoir sampling.

    Raises:
        ModelInputError: a size is not positive.
    """

    def __init__(
        self,
        n_proteins: int,
        n_batch: int,
        *,
        max_cells_per_batch: int = 10_000,
        min_cells: int = 20,
        min_scale: float = 0.05,
        seed: int = 0,
    ) -> None:
        if n_proteins < 1 or n_batch < 1 or max_cells_per_batch < 1 or min_scale <= 0:
            raise ModelInputError(
                f"ProteinBackgroundPrior needs n_proteins, n_batch, max_cells_per_batch >= 1 and min_scale > 0; "
                f"got {n_proteins}, {n_batch}, {max_cells_per_batch}, {min_scale}"
            )
        self.n_proteins, self.n_batch = n_proteins, n_batch
        self.max_cells_per_batch, self.min_cells, self.min_scale = max_cells_per_batch, min_cells, min_scale
        self._rng = np.random.default_rng(seed)
        self._reservoirs: dict[int, _Reservoir] = {}

    def update(self, protein, batch, mask=None) -> None:
        """Adds cells to the sample.

        Args:
            protein: ``[n, T]`` raw protein counts (torch or numpy).
            batch: ``[n]`` batch codes in ``[0, n_batch)``.
            mask: ``[n, T]`` bool, True where measured; None = all measured. Unmeasured entries are ignored.

        Raises:
            ModelInputError: wrong shapes or batch codes out of range.
        """
        protein = _numpy(protein)
        batch = _numpy(batch).reshape(-1).astype(np.int64)
        mask = np.ones(protein.shape, dtype=bool) if mask is None else _numpy(mask).astype(bool)
        if protein.ndim != 2 or protein.shape[1] != self.n_proteins or mask.shape != protein.shape:
            raise ModelInputError(
                f"ProteinBackgroundPrior.update: protein must be [n, {self.n_proteins}] with a mask of the same "
                f"shape; got protein {protein.shape}, mask {mask.shape}"
            )
        if len(batch) != len(protein):
            raise ModelInputError(f"ProteinBackgroundPrior.update: {len(batch)} batch codes for {len(protein)} cells")
        if len(batch) and (batch.min() < 0 or batch.max() >= self.n_batch):
            raise ModelInputError(
                f"ProteinBackgroundPrior.update: batch codes must be in [0, {self.n_batch}), "
                f"got [{batch.min()}, {batch.max()}]"
            )
        logged = np.log1p(np.where(mask, protein, 0.0).astype(np.float32))
        for b in np.unique(batch):
            rows = batch == b
            reservoir = self._reservoirs.get(int(b))
            if reservoir is None:
                reservoir = self._reservoirs[int(b)] = _Reservoir(self.max_cells_per_batch, self.n_proteins)
            reservoir.add(logged[rows], mask[rows], self._rng)

    def cells_seen(self) -> np.ndarray:
        """``[n_batch]`` number of cells passed to ``update`` per batch (not only those kept)."""
        seen = np.zeros(self.n_batch, dtype=np.int64)
        for b, reservoir in self._reservoirs.items():
            seen[b] = reservoir.seen
        return seen

    def finalize(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Fits the mixtures and returns the prior.

        A (batch, protein) with fewer than ``min_cells`` measured cells in the sample takes the average of the
        batches where that protein was fitted; a protein fitted nowhere (measured in no batch, so it never
        enters the likelihood) takes the fixed values (FIXED_BACKGROUND_MEAN, FIXED_BACKGROUND_SCALE).

        Returns:
            ``(c, d)``: ``[T, n_batch]`` float32 mean and standard deviation of log background.

        Raises:
            ModelInputError: ``update`` was never given a cell.
        """
        if not any(r.seen for r in self._reservoirs.values()):
            raise ModelInputError("ProteinBackgroundPrior.finalize: no cells were given to update()")
        mean = np.full((self.n_proteins, self.n_batch), np.nan)
        scale = np.full((self.n_proteins, self.n_batch), np.nan)
        for b, reservoir in self._reservoirs.items():
            fit = fit_two_gaussians(
                reservoir.values[: reservoir.filled],
                reservoir.mask[: reservoir.filled],
                min_count=self.min_cells,
                min_var=self.min_scale**2,
            )
            mean[:, b], scale[:, b] = fit.means[:, 0], fit.stds[:, 0]
        fitted = ~np.isnan(mean)
        n_fitted = fitted.sum(axis=1, keepdims=True)
        with np.errstate(invalid="ignore"):
            avg_mean = np.where(fitted, mean, 0.0).sum(1, keepdims=True) / n_fitted
            avg_scale = np.where(fitted, scale, 0.0).sum(1, keepdims=True) / n_fitted
        avg_mean = np.where(n_fitted > 0, avg_mean, FIXED_BACKGROUND_MEAN)
        avg_scale = np.where(n_fitted > 0, avg_scale, FIXED_BACKGROUND_SCALE)
        mean = np.where(fitted, mean, avg_mean)
        scale = np.maximum(np.where(fitted, scale, avg_scale), self.min_scale)
        return torch.from_numpy(mean.astype(np.float32)), torch.from_numpy(scale.astype(np.float32))


class LibraryPrior:
    """Streaming per-batch mean and variance of log RNA library size (prior of a latent library).

    Cells with no RNA counts are skipped (their log library is undefined), as scvi-tools does.

    Args:
        n_batch: number of batch categories.
        min_var: floor of the returned variances (a batch of one cell would otherwise give a zero-width prior).

    Raises:
        ModelInputError: a size is not positive.
    """

    def __init__(self, n_batch: int, *, min_var: float = 1e-3) -> None:
        if n_batch < 1 or min_var <= 0:
            raise ModelInputError(f"LibraryPrior needs n_batch >= 1 and min_var > 0; got {n_batch}, {min_var}")
        self.n_batch, self.min_var = n_batch, min_var
        self._n = np.zeros(n_batch)
        self._mean = np.zeros(n_batch)
        self._m2 = np.zeros(n_batch)  # sum of squared deviations from the mean

    def update(self, rna, batch) -> None:
        """Adds cells.

        Args:
            rna: ``[n, G]`` raw RNA counts (torch or numpy, dense).
            batch: ``[n]`` batch codes in ``[0, n_batch)``.

        Raises:
            ModelInputError: mismatched lengths or batch codes out of range.
        """
        if isinstance(rna, torch.Tensor):
            library = rna.detach().double().sum(dim=1).cpu().numpy()
        else:
            library = np.asarray(rna, dtype=np.float64).sum(axis=1)
        batch = _numpy(batch).reshape(-1).astype(np.int64)
        if len(batch) != len(library):
            raise ModelInputError(f"LibraryPrior.update: {len(batch)} batch codes for {len(library)} cells")
        if len(batch) and (batch.min() < 0 or batch.max() >= self.n_batch):
            raise ModelInputError(
                f"LibraryPrior.update: batch codes must be in [0, {self.n_batch}), got [{batch.min()}, {batch.max()}]"
            )
        keep = library > 0
        log_lib, batch = np.log(library[keep]), batch[keep]
        n = np.bincount(batch, minlength=self.n_batch).astype(np.float64)
        total = np.bincount(batch, weights=log_lib, minlength=self.n_batch)
        mean = np.divide(total, n, out=np.zeros_like(total), where=n > 0)
        m2 = np.bincount(batch, weights=(log_lib - mean[batch]) ** 2, minlength=self.n_batch)
        # Chan et al.'s pairwise merge of (count, mean, M2): exact and stable for any chunking.
        merged = self._n + n
        delta = mean - self._mean
        with np.errstate(invalid="ignore", divide="ignore"):
            self._mean = np.where(merged > 0, self._mean + delta * n / merged, 0.0)
            self._m2 = np.where(merged > 0, self._m2 + m2 + delta**2 * self._n * n / merged, 0.0)
        self._n = merged

    def finalize(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns the prior; a batch without cells gets the statistics pooled over all batches.

        Returns:
            ``(log_mean, log_var)``: ``[n_batch]`` float32 mean and (population) variance of log library size.

        Raises:
            ModelInputError: no cell with RNA counts was given to ``update``.
        """
        total = self._n.sum()
        if total == 0:
            raise ModelInputError("LibraryPrior.finalize: no cells with RNA counts were given to update()")
        pooled_mean = (self._n * self._mean).sum() / total
        pooled_var = (self._m2.sum() + (self._n * (self._mean - pooled_mean) ** 2).sum()) / total
        seen = self._n > 0
        var = np.divide(self._m2, self._n, out=np.zeros_like(self._m2), where=seen)
        mean = np.where(seen, self._mean, pooled_mean)
        var = np.maximum(np.where(seen, var, pooled_var), self.min_var)
        return torch.from_numpy(mean.astype(np.float32)), torch.from_numpy(var.astype(np.float32))
