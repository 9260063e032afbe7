"""Reads rows of one HDF5 matrix (CSR group, dense dataset or dataframe) with h5py.

Shared by ``H5adSource`` (scattered ids) and the h5ad/h5mu ingest readers (contiguous blocks). h5py
reads one slice at a time (HDF5 holds a global lock), so the gain here is reading each cover range
with one slice per array and letting the chunk cache keep chunks shared by neighbouring ranges.

Nothing read is silently wrong: a CSR indptr is checked when the matrix is opened and the column indices of every
read before they are used (``csr_checks``); HDF5's errors on a corrupt chunk name the file and dataset.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from loaders.anndata_layout import MatrixElement
from loaders.csr_checks import check_index_parts, check_indptr
from loaders.errors import StoreFormatError
from loaders.row_runs import gather_csr_rows, gather_dense_rows

_CONTIGUOUS_GAP_BYTES = 1 << 16
"""Unchunked datasets: bridge gaps up to this many bytes (a seek costs about as much as reading them)."""


def _chunk_rows(dataset, row_bytes: float) -> int:
    if dataset.chunks is not None:
        return int(dataset.chunks[0])
    return max(1, int(_CONTIGUOUS_GAP_BYTES / max(row_bytes, 1.0)))


class H5MatrixReader:
    """Row reader of one matrix element of an HDF5 file."""

    def __init__(self, elem: MatrixElement, *, where: str) -> None:
        """Args:
            elem: the element, resolved by ``anndata_layout.resolve_layout`` on an h5py file.
            where: the file, for messages (``"pbmc.h5ad"`` or ``"study 'pbmc' (pbmc.h5ad)"``).

        Raises:
            StoreFormatError: a CSR matrix whose indptr is corrupt or unreadable (naming file and dataset).
        """
        self.kind = elem.kind
        self.shape = elem.shape
        self._where = where
        self._path = elem.path
        node = elem.node
        if elem.kind == "csr":
            self._data, self._indices = node["data"], node["indices"]
            self.indptr = np.asarray(self._read(node["indptr"], slice(None)), dtype=np.int64)
            if self._data.shape != self._indices.shape or len(self._data.shape) != 1:
                raise StoreFormatError(
                    f"{where}: {elem.path}/data has shape {self._data.shape} and {elem.path}/indices "
                    f"{self._indices.shape}; they must be equal and one-dimensional (the file is corrupt)."
                )
            check_indptr(self.indptr, n_rows=self.shape[0], nnz=int(self._data.shape[0]),
                         where=f"{where}: {elem.path}/indptr")
            mean_nnz = max(self.indptr[-1] / max(self.shape[0], 1), 1e-9)
            entries_per_chunk = _chunk_rows(self._data, self._data.dtype.itemsize)
            self.chunk_cells = max(1, int(entries_per_chunk / mean_nnz))
        elif elem.kind == "dense":
            self._array = node
            self.chunk_cells = _chunk_rows(node, node.dtype.itemsize * max(self.shape[1], 1))
        else:
            self._columns = [node[c] for c in elem.columns]
            first = self._columns[0] if self._columns else None
            self.chunk_cells = _chunk_rows(first, first.dtype.itemsize) if first is not None else 1

    def read_csr(self, ids: np.ndarray, starts: np.ndarray, stops: np.ndarray) -> sp.csr_matrix:
        """Returns the rows of sorted ``ids`` (covered by ranges ``starts[i]:stops[i]``) as float32 CSR."""
        if self.kind != "csr":
            return sp.csr_matrix(self.read_dense(ids, starts, stops))
        lo, hi = self.indptr[starts], self.indptr[stops]
        data = [self._read(self._data, slice(int(a), int(b))) for a, b in zip(lo, hi)]
        indices = [self._read(self._indices, slice(int(a), int(b))) for a, b in zip(lo, hi)]
        check_index_parts(indices, lo, self.indptr, n_cols=self.shape[1],
                          where=f"{self._where}: {self._indices.name.lstrip('/')}")
        return gather_csr_rows(data, indices, self.indptr, ids, starts, stops, self.shape[1])

    def read_dense(self, ids: np.ndarray, starts: np.ndarray, stops: np.ndarray) -> np.ndarray:
        """Returns the rows of sorted ``ids`` as a float32 ``[n, n_cols]`` array."""
        if self.kind == "csr":
            return self.read_csr(ids, starts, stops).toarray()
        if self.kind == "dense":
            parts = [self._read(self._array, slice(int(a), int(b))) for a, b in zip(starts, stops)]
        else:
            parts = [
                np.stack([self._read(col, slice(int(a), int(b))) for col in self._columns], axis=1)
                if self._columns else np.zeros((int(b - a), 0))
                for a, b in zip(starts, stops)
            ]
        return gather_dense_rows(parts, ids, starts, stops).astype(np.float32, copy=False)

    def read_block(self, start: int, stop: int, *, dense: bool):
        """Returns rows ``start:stop`` (CSR unless ``dense``)."""
        ids = np.arange(start, stop, dtype=np.int64)
        starts, stops = np.array([start], np.int64), np.array([stop], np.int64)
        return self.read_dense(ids, starts, stops) if dense else self.read_csr(ids, starts, stops)

    def _read(self, dataset, span: slice) -> np.ndarray:
        """``dataset[span]``; HDF5's error on a corrupt or truncated chunk named by file and dataset."""
        try:
            return dataset[span]
        except OSError as err:
            end = "its end" if span.stop is None else span.stop - 1
            raise StoreFormatError(
                f"{self._where}: {dataset.name.lstrip('/')} cannot be read at {span.start or 0}..{end} ({err}); the "
                "file is truncated or corrupt."
            ) from err
