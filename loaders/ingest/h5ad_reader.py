"""Ingest reader for ``.h5ad`` files: X (or a layer) read in blocks of cells, proteins from ``obsm``."""

from __future__ import annotations

import os
from collections.abc import Iterator

import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata.io import read_elem

from loaders.anndata_layout import ResolvedLayout, resolve_layout
from loaders.errors import StoreFormatError
from loaders.h5_matrix_reader import H5MatrixReader


class H5adReader:
    """Block reader of an h5ad file; never loads a whole count matrix."""

    format_name = "h5ad"

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        protein_key: str = "protein_expression",
        rna_layer: str | None = None,
        protein_names=None,
        rna_modality: str = "rna",
        protein_modality: str = "prot",
    ) -> None:
        """Args:
            path: the h5ad file.
            protein_key: key of the protein matrix under ``obsm`` (array or DataFrame).
            rna_layer: take RNA counts from ``layers/<rna_layer>`` instead of ``X``.
            protein_names: protein names when neither a DataFrame nor ``uns['protein_names']`` has them.
            rna_modality, protein_modality: used by the h5mu subclass.

        Raises:
            StoreFormatError: not HDF5, CSC X, missing protein matrix (naming the keys that exist), a corrupt CSR
                indptr (blocks refuse column indices out of range, naming file, dataset and row).
        """
        self.path = os.fspath(path)
        self.notes: list[str] = []
        try:
            self._file = h5py.File(self.path, "r")
        except OSError as err:
            raise StoreFormatError(f"{self.path}: cannot open as HDF5 ({err}).") from err
        try:
            self._layout: ResolvedLayout = resolve_layout(
                self._file, where=self.path, protein_key=protein_key, rna_layer=rna_layer,
                rna_modality=rna_modality, protein_modality=protein_modality, protein_names=protein_names,
            )
            self._rna = H5MatrixReader(self._layout.rna, where=self.path)
            self._protein = H5MatrixReader(self._layout.protein, where=self.path)
        except BaseException:
            self._file.close()
            raise
        self.n_obs = self._layout.n_obs
        self.gene_names = self._layout.gene_names
        self.protein_names = self._layout.protein_names

    def obs(self) -> pd.DataFrame:
        """Returns obs (index = cell names)."""
        return read_elem(self._file["obs"])

    def blocks(self, block_cells: int) -> Iterator[tuple[int, sp.csr_matrix, np.ndarray]]:
        """Yields ``(first_row, rna CSR, protein dense)`` for consecutive blocks of ``block_cells`` cells."""
        for start in range(0, self.n_obs, block_cells):
            stop = min(start + block_cells, self.n_obs)
            yield (
                start,
                self._rna.read_block(start, stop, dense=False),
                self._protein.read_block(start, stop, dense=True),
            )

    def close(self) -> None:
        """Closes the file."""
        self._file.close()
