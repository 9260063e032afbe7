"""The ``Source`` protocol: one study in one backend.

A Source knows its cells, genes, proteins and obs columns, and reads rows for sorted cell ids. It does no
shuffling and knows nothing of torch: ordering is the Plan's job, batching the Stream's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
import scipy.sparse as sp


@dataclass
class SourceRows:
    """Rows read from one Source, in the order of the ids asked for.

    Attributes:
        rna: ``[n, n_genes]`` CSR matrix of float32 counts, columns in the Source's own gene order.
        protein: ``[n, n_proteins]`` float32 counts, columns in the Source's own protein order.
    """

    rna: sp.csr_matrix
    protein: np.ndarray

    @classmethod
    def empty(cls, n_genes: int, n_proteins: int) -> "SourceRows":
        """Rows for an empty id list, with the right widths and dtypes."""
        return cls(rna=sp.csr_matrix((0, n_genes), dtype=np.float32),
                   protein=np.zeros((0, n_proteins), dtype=np.float32))


class PicklesByInitArgs:
    """Pickles a Source as its constructor arguments (``self._init_args``), so a DataLoader worker re-opens the
    store in its own process instead of inheriting file handles and thread pools that must not cross a fork."""

    _init_args: dict

    def __getstate__(self) -> dict:
        return self._init_args

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)


@runtime_checkable
class Source(Protocol):
    """One study stored in one backend.

    Attributes:
        name: study name, used as the study covariate and in every error message.
        n_obs: number of cells.
        gene_names: ``[n_genes]`` array of str, unique.
        protein_names: ``[n_proteins]`` array of str, unique.
        obs_columns: names of the per-cell annotation columns that ``obs_column`` can return.
        protein_panels: ``[n_panels, n_proteins] bool``: which proteins each panel measured. A source
            whose cells all measured every protein has one all-True panel.
        location: where the study is stored (the path or URI it was opened from, as given), or None for data
            held in memory. Results written back go into this store (``loaders.store_results`` reads them).
    """

    name: str
    n_obs: int
    gene_names: np.ndarray
    protein_names: np.ndarray
    obs_columns: list[str]
    protein_panels: np.ndarray
    location: str | None

    def obs_column(self, key: str) -> np.ndarray:
        """Returns one obs column for every cell, as an ``[n_obs]`` array of str (or numbers).

        Raises:
            StoreFormatError: the column does not exist (the message lists the columns that do).
        """
        ...

    def obs_names(self) -> np.ndarray:
        """Returns every cell's name (the AnnData obs index, SOMA's id column), ``[n_obs]`` str, in cell order.

        A source that stores no names returns the cell positions as str (``"0"``, ``"1"``, ...).
        """
        ...

    def protein_panel_codes(self) -> np.ndarray:
        """Returns ``[n_obs] int`` indexes into ``protein_panels``: which panel each cell was measured with."""
        ...

    def read(self, ids: np.ndarray) -> SourceRows:
        """Reads RNA and protein rows for ``ids`` (sorted, unique, int64, in ``[0, n_obs)``).

        Implementations read each modality once per call and should coalesce contiguous runs of ids.

        Raises:
            InvalidCountsError: a row holds NaN, infinite or negative counts (names study, cell, column).
        """
        ...
