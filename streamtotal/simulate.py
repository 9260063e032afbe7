"""A simulator of realistic CITE-seq atlases, for tests, the demo and million-cell benchmarks.

The generative story follows the totalVI user guide, so a model that recovers it is doing the right thing:
cells belong to cell types; each type has an RNA profile (a shared log-normal baseline with type-specific
marker genes); each batch shifts genes multiplicatively and has its own protein background; RNA counts are
negative binomial around library x profile; each protein is a marker of a few cell types, and its count is a
negative-binomial mixture of a background (every cell, per batch) and a foreground (background x alpha, on
cells of the marker's types). One batch may not have measured some proteins: those columns are zero there,
which is how measured-panel detection (and scvi-tools) recognises them.

Cells of one batch are contiguous, as when studies are concatenated into one store: that is exactly the case
a streaming loader must shuffle well.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pandas as pd
import scipy.sparse as sp


@dataclass(frozen=True)
class SimulationConfig:
    """What to simulate."""

    n_cells: int = 6000
    """Number of cells."""
    n_genes: int = 1000
    """Number of genes."""
    n_proteins: int = 20
    """Number of proteins (antibodies) in the full panel."""
    n_cell_types: int = 6
    """Number of cell types; each has its own marker genes and marker proteins."""
    n_batches: int = 3
    """Number of batches; cells of one batch are contiguous in the output."""
    n_missing_proteins: int = 3
    """How many proteins the last batch did not measure (zero there). 0 = full panel everywhere."""
    unlabeled_fraction: float = 0.1
    """Fraction of cells whose ``cell_type`` is reported as ``"unlabeled"``."""
    mean_library: float = 2500.0
    """Mean RNA library size (total counts per cell)."""
    batch_effect_scale: float = 0.3
    """Standard deviation of the per-batch, per-gene log fold change."""
    block_cells: int = 20000
    """Cells generated per block (memory bound of the generator: one block at a time)."""
    seed: int = 0
    """Seed of every random draw; the same config gives the same data."""

    def __post_init__(self) -> None:
        from streamtotal.errors import ConfigError

        for name in ("n_cells", "n_genes", "n_proteins", "n_cell_types", "n_batches", "block_cells"):
            if getattr(self, name) < 1:
                raise ConfigError(f"SimulationConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.n_missing_proteins < self.n_proteins:
            raise ConfigError(
                f"SimulationConfig.n_missing_proteins must be in [0, n_proteins={self.n_proteins}), "
                f"got {self.n_missing_proteins}"
            )
        if not 0.0 <= self.unlabeled_fraction < 1.0:
            raise ConfigError(f"SimulationConfig.unlabeled_fraction must be in [0, 1), got {self.unlabeled_fraction}")


@dataclass
class _Truth:
    """Global parameters shared by every block (drawn once from the seed)."""

    type_probs: np.ndarray  # [K]
    log_profile: np.ndarray  # [K, G] unnormalised log expression
    batch_shift: np.ndarray  # [B, G]
    gene_theta: np.ndarray  # [G]
    protein_markers: np.ndarray  # [K, T] bool
    log_background: np.ndarray  # [B, T]
    foreground_alpha: np.ndarray  # [T]
    protein_theta: np.ndarray  # [T]
    missing_proteins: np.ndarray  # [T] bool, for the last batch


class CiteSimulator:
    """Generates a simulated CITE-seq atlas block by block (bounded memory).

    Args:
        config: what to simulate.
    """

    def __init__(self, config: SimulationConfig = SimulationConfig()) -> None:
        self.config = config
        self.gene_names = np.array([f"GENE{i:05d}" for i in range(config.n_genes)])
        self.protein_names = np.array([f"PROT{i:03d}" for i in range(config.n_proteins)])
        self.cell_type_names = np.array([f"type_{k}" for k in range(config.n_cell_types)])
        self.batch_names = np.array([f"batch_{b}" for b in range(config.n_batches)])
        self.truth = self._draw_truth()

    def _draw_truth(self) -> _Truth:
        c = self.config
        rng = np.random.default_rng([c.seed, 0])
        K, G, T, B = c.n_cell_types, c.n_genes, c.n_proteins, c.n_batches
        type_probs = rng.dirichlet(np.full(K, 3.0))
        base = rng.normal(0.0, 1.2, size=G)
        log_profile = np.repeat(base[None, :], K, axis=0)
        n_markers = max(1, G // 25)
        for k in range(K):
            markers = rng.choice(G, size=n_markers, replace=False)
            log_profile[k, markers] += rng.normal(2.0, 0.5, size=n_markers)
        batch_shift = rng.normal(0.0, c.batch_effect_scale, size=(B, G))
        gene_theta = np.exp(rng.normal(np.log(3.0), 0.5, size=G))
        # Every protein marks 1-2 cell types, and every type carries at least one marker when T >= K.
        protein_markers = np.zeros((K, T), dtype=bool)
        for t in range(T):
            protein_markers[t % K, t] = True
            if rng.random() < 0.3:
                protein_markers[rng.integers(K), t] = True
        log_background = rng.normal(np.log(15.0), 0.5, size=T)[None, :] + rng.normal(0.0, 0.3, size=(B, T))
        foreground_alpha = np.exp(rng.normal(np.log(12.0), 0.6, size=T)) + 2.0
        protein_theta = np.exp(rng.normal(np.log(8.0), 0.3, size=T))
        missing = np.zeros(T, dtype=bool)
        if c.n_missing_proteins and B > 1:
            missing[rng.choice(T, size=c.n_missing_proteins, replace=False)] = True
        return _Truth(type_probs, log_profile, batch_shift, gene_theta, protein_markers, log_background,
                      foreground_alpha, protein_theta, missing)

    def batch_of_cells(self, start: int, stop: int) -> np.ndarray:
        """Returns the batch index of cells ``start..stop-1`` (batches are contiguous runs of cells)."""
        c = self.config
        return (np.arange(start, stop, dtype=np.int64) * c.n_batches) // c.n_cells

    def blocks(self) -> Iterator[tuple[sp.csr_matrix, np.ndarray, pd.DataFrame]]:
        """Yields ``(rna CSR float32, protein float32 [n, T], obs)`` blocks covering every cell in order.

        Each block is drawn from its own seeded stream, so the data do not depend on how they are consumed.
        """
        c = self.config
        for index, start in enumerate(range(0, c.n_cells, c.block_cells)):
            stop = min(start + c.block_cells, c.n_cells)
            yield self._block(index, start, stop)

    def _block(self, index: int, start: int, stop: int) -> tuple[sp.csr_matrix, np.ndarray, pd.DataFrame]:
        c, tr = self.config, self.truth
        rng = np.random.default_rng([c.seed, 1, index])
        n = stop - start
        batch = self.batch_of_cells(start, stop)
        cell_type = rng.choice(c.n_cell_types, size=n, p=tr.type_probs)

        logits = tr.log_profile[cell_type] + tr.batch_shift[batch]
        logits -= logits.max(axis=1, keepdims=True)
        rho = np.exp(logits)
        rho /= rho.sum(axis=1, keepdims=True)
        library = np.exp(rng.normal(np.log(c.mean_library), 0.35, size=n))
        rna = _sample_nb(rng, library[:, None] * rho, tr.gene_theta[None, :])

        background = np.exp(tr.log_background[batch] + rng.normal(0.0, 0.15, size=(n, c.n_proteins)))
        on = tr.protein_markers[cell_type]
        mean = np.where(on, background * tr.foreground_alpha[None, :], background)
        protein = _sample_nb(rng, mean, tr.protein_theta[None, :]).astype(np.float32)
        last_batch = batch == c.n_batches - 1
        if tr.missing_proteins.any():
            protein[np.ix_(last_batch, tr.missing_proteins)] = 0.0

        labels = self.cell_type_names[cell_type].astype(object)
        labels[rng.random(n) < c.unlabeled_fraction] = "unlabeled"
        obs = pd.DataFrame(
            {
                "batch": pd.Categorical(self.batch_names[batch], categories=self.batch_names),
                "cell_type": pd.Categorical(labels, categories=[*self.cell_type_names, "unlabeled"]),
                "true_cell_type": pd.Categorical(self.cell_type_names[cell_type], categories=self.cell_type_names),
            },
            index=[f"cell{i}" for i in range(start, stop)],
        )
        return sp.csr_matrix(rna.astype(np.float32)), protein, obs

    def to_anndata(self):
        """Returns the whole simulation as one in-memory AnnData (for small data: tests, scvi-tools peers).

        Proteins are in ``obsm["protein_expression"]`` (a DataFrame with the protein names as columns), the
        layout scvi-tools expects.
        """
        import anndata as ad

        blocks = list(self.blocks())
        obs = pd.concat([b[2] for b in blocks])
        protein = np.concatenate([b[1] for b in blocks])
        adata = ad.AnnData(
            X=sp.vstack([b[0] for b in blocks]).tocsr(),
            obs=obs,
            var=pd.DataFrame(index=self.gene_names),
        )
        adata.obsm["protein_expression"] = pd.DataFrame(protein, index=obs.index, columns=self.protein_names)
        adata.uns["protein_names"] = list(self.protein_names)
        return adata


def _sample_nb(rng: np.random.Generator, mean: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """Negative binomial draws with the given mean and inverse dispersion, as a gamma-Poisson mixture."""
    rate = rng.gamma(shape=np.broadcast_to(theta, mean.shape), scale=mean / theta)
    return rng.poisson(rate).astype(np.float32)
