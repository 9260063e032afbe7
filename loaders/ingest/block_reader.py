"""What every ingest reader provides: names, obs, and the counts in blocks of consecutive cells."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

import numpy as np
import pandas as pd
import scipy.sparse as sp


class BlockReader(Protocol):
    """One input file opened for ingest.

    Attributes:
        path: the input file.
        format_name: ``"h5ad"``, ``"h5mu"`` or ``"10x_h5"``.
        n_obs: number of cells.
        gene_names: ``[G]`` str, in the column order of the RNA blocks.
        protein_names: ``[T]`` str, in the column order of the protein blocks.
        notes: things the user should know (e.g. feature types that were left out).
    """

    path: str
    format_name: str
    n_obs: int
    gene_names: np.ndarray
    protein_names: np.ndarray
    notes: list[str]

    def obs(self) -> pd.DataFrame:
        """Returns the per-cell annotations (index = cell names); small enough to hold in memory."""
        ...

    def blocks(self, block_cells: int) -> Iterator[tuple[int, sp.csr_matrix, np.ndarray]]:
        """Yields ``(first_row, rna [n, G] CSR, protein [n, T] dense)`` for consecutive blocks of cells."""
        ...

    def close(self) -> None:
        """Closes the file."""
        ...
