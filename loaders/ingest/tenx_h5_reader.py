"""Ingest reader for 10x Genomics feature-barcode matrices (Cell Ranger >= 3 ``.h5``).

Layout: ``matrix/{data,indices,indptr,shape,barcodes}`` with ``features/{id,name,feature_type}``. The
matrix is CSC with one column per barcode, i.e. each barcode's entries are contiguous, which is CSR by
cell: a block of cells is one slice of data/indices. Features of type "Gene Expression" become RNA,
"Antibody Capture" proteins; other types (CRISPR, Multiplexing Capture, ...) are left out.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

from loaders.anndata_layout import as_str_array
from loaders.csr_checks import check_index_parts, check_indptr
from loaders.errors import StoreFormatError

GENE_TYPE = "Gene Expression"
PROTEIN_TYPE = "Antibody Capture"


class TenxH5Reader:
    """Block reader of a 10x feature-barcode matrix file."""

    format_name = "10x_h5"

    def __init__(self, path: str | os.PathLike, *, gene_name_field: str = "name") -> None:
        """Args:
            path: the ``.h5`` file (e.g. ``filtered_feature_bc_matrix.h5``).
            gene_name_field: ``"name"`` (symbols, as 10x and scanpy show them) or ``"id"`` (Ensembl
                ids, unique; use when symbols repeat). Proteins are always named by ``name``.

        Raises:
            StoreFormatError: not a Cell Ranger >= 3 matrix, no Antibody Capture or no Gene Expression
                features (naming the feature types present).
        """
        self.path = os.fspath(path)
        self.notes: list[str] = []
        try:
            self._file = h5py.File(self.path, "r")
        except OSError as err:
            raise StoreFormatError(f"{self.path}: cannot open as HDF5 ({err}).") from err
        try:
            self._resolve(gene_name_field)
        except BaseException:
            self._file.close()
            raise

    def _resolve(self, gene_name_field: str) -> None:
        f = self._file
        if "matrix" not in f or "features" not in f["matrix"]:
            raise StoreFormatError(
                f"{self.path}: not a Cell Ranger >= 3 feature-barcode matrix (top-level groups: "
                f"{sorted(f.keys())}); a 'matrix' group with 'features' is needed. Cell Ranger 2 files "
                "hold no antibody counts."
            )
        m = f["matrix"]
        features = m["features"]
        if gene_name_field not in features:
            raise StoreFormatError(
                f"{self.path}: matrix/features has no {gene_name_field!r}; fields are {sorted(features.keys())}."
            )
        types = as_str_array(features["feature_type"][...])
        n_features, n_barcodes = (int(x) for x in m["shape"][...])
        self._gene_cols = np.flatnonzero(types == GENE_TYPE)
        self._protein_cols = np.flatnonzero(types == PROTEIN_TYPE)
        present = sorted(set(types.tolist()))
        if self._protein_cols.size == 0:
            raise StoreFormatError(
                f"{self.path}: no {PROTEIN_TYPE!r} features, so no protein counts (feature types present: "
                f"{present}). totalVI needs CITE-seq antibody counts; use the Cell Ranger output of a run "
                "with an antibody library."
            )
        if self._gene_cols.size == 0:
            raise StoreFormatError(f"{self.path}: no {GENE_TYPE!r} features (feature types present: {present}).")
        others = sorted(set(present) - {GENE_TYPE, PROTEIN_TYPE})
        if others:
            self.notes.append(f"feature types left out: {others}")
        self.gene_names = as_str_array(features[gene_name_field][...][self._gene_cols])
        self.protein_names = as_str_array(features["name"][...][self._protein_cols])
        self.n_obs = n_barcodes
        self._n_features = n_features
        self._indptr = np.asarray(m["indptr"][...], dtype=np.int64)
        # The feature indices pick columns by fancy indexing below, where a corrupt -1 would silently pick the last
        # feature: the structure is checked before any block is read.
        check_indptr(self._indptr, n_rows=n_barcodes, nnz=int(m["data"].shape[0]), where=f"{self.path}: matrix/indptr")
        if m["indices"].shape != m["data"].shape:
            raise StoreFormatError(
                f"{self.path}: matrix/indices has shape {m['indices'].shape} but matrix/data {m['data'].shape}; they "
                "must be equal (the file is corrupt)."
            )
        # Map every feature to its position among genes or proteins; -1 marks the other kind.
        self._gene_pos = np.full(n_features, -1, np.int64)
        self._gene_pos[self._gene_cols] = np.arange(self._gene_cols.size)
        self._protein_pos = np.full(n_features, -1, np.int64)
        self._protein_pos[self._protein_cols] = np.arange(self._protein_cols.size)

    def obs(self) -> pd.DataFrame:
        """Returns an obs with the barcodes as index and no columns."""
        return pd.DataFrame(index=pd.Index(as_str_array(self._file["matrix/barcodes"][...]), dtype=object))

    def blocks(self, block_cells: int) -> Iterator[tuple[int, sp.csr_matrix, np.ndarray]]:
        """Yields ``(first_row, rna CSR, protein dense)`` for consecutive blocks of ``block_cells`` barcodes."""
        m = self._file["matrix"]
        for start in range(0, self.n_obs, block_cells):
            stop = min(start + block_cells, self.n_obs)
            a, b = int(self._indptr[start]), int(self._indptr[stop])
            try:
                data = np.asarray(m["data"][a:b], dtype=np.float32)
                features = np.asarray(m["indices"][a:b], dtype=np.int64)
            except OSError as err:
                raise StoreFormatError(
                    f"{self.path}: matrix/data or matrix/indices cannot be read at entries {a}..{b - 1} ({err}); the "
                    "file is truncated or corrupt."
                ) from err
            check_index_parts([features], np.array([a]), self._indptr, n_cols=self._n_features,
                              where=f"{self.path}: matrix/indices")
            rows = np.repeat(np.arange(stop - start), np.diff(self._indptr[start : stop + 1]))
            yield start, self._rna_block(data, features, rows, stop - start), self._protein_block(
                data, features, rows, stop - start
            )

    def _rna_block(self, data, features, rows, n) -> sp.csr_matrix:
        pos = self._gene_pos[features]
        keep = pos >= 0
        # Entries stay in row order, so indptr is a count per row.
        indptr = np.zeros(n + 1, np.int64)
        np.cumsum(np.bincount(rows[keep], minlength=n), out=indptr[1:])
        rna = sp.csr_matrix((data[keep], pos[keep].astype(np.int32), indptr), shape=(n, self._gene_cols.size))
        rna.sort_indices()
        return rna

    def _protein_block(self, data, features, rows, n) -> np.ndarray:
        pos = self._protein_pos[features]
        keep = pos >= 0
        out = np.zeros((n, self._protein_cols.size), np.float32)
        np.add.at(out, (rows[keep], pos[keep]), data[keep])
        return out

    def close(self) -> None:
        """Closes the file."""
        self._file.close()
