"""``H5adSource``: one study in a backed ``.h5ad`` (or ``.h5mu``) file, read with h5py directly.

For data that has not been ingested: nothing is loaded but indptr and the obs columns asked for. HDF5
reads are serial and h5ad files are usually gzip-compressed, so this is slower than a ``ZarrSource``
on an ingested store; use it to start quickly, ingest for long training runs.
"""

from __future__ import annotations

import os

import h5py
import numpy as np

from loaders.anndata_layout import (
    dataframe_index,
    find_obs_column,
    obs_column_names,
    obs_values,
    resolve_layout,
)
from loaders.count_validation import validate_rows
from loaders.errors import StoreFormatError
from loaders.h5_matrix_reader import H5MatrixReader
from loaders.ids import check_ids
from loaders.row_runs import coalesce_runs
from loaders.protein_panels import checked_panel_codes
from loaders.reopen_lock import reopen_lock
from loaders.source import PicklesByInitArgs, SourceRows
from loaders.store_layout import PROTEIN_OBSM_KEY
from loaders.zarr_source import study_name_from_path

CHUNK_CACHE_BYTES = 64 << 20
"""Per-dataset HDF5 chunk cache: neighbouring cover ranges often share a compressed chunk."""


class H5adSource(PicklesByInitArgs):
    """A Source over an h5ad file (CSR or dense X, proteins in ``obsm``) or an h5mu file."""

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        name: str | None = None,
        protein_key: str = PROTEIN_OBSM_KEY,
        rna_layer: str | None = None,
        rna_modality: str = "rna",
        protein_modality: str = "prot",
        protein_names=None,
        validate: bool = True,
    ) -> None:
        """Args:
            path: ``.h5ad`` or ``.h5mu`` file.
            name: study name (default: the file name without extension).
            protein_key: h5ad: key of the protein matrix under ``obsm``.
            rna_layer: read RNA counts from ``layers/<rna_layer>`` instead of ``X``.
            rna_modality, protein_modality: h5mu: modality names.
            protein_names: names of the protein columns where the file does not record them.
            validate: check every read for NaN, infinite and negative counts.

        Raises:
            StoreFormatError: the file is missing or not HDF5, or lacks a protein matrix (the message
                lists what exists); its RNA CSR indptr is corrupt.
        """
        self._init_args = dict(
            path=os.fspath(path), name=name, protein_key=protein_key, rna_layer=rna_layer,
            rna_modality=rna_modality, protein_modality=protein_modality, protein_names=protein_names,
            validate=validate,
        )
        self.path = os.fspath(path)
        self.name = name or study_name_from_path(self.path)
        self._where = f"study {self.name!r} ({self.path})"
        self._validate = validate
        self._pid = -1
        self._open()
        layout = self._layout
        self.n_obs = layout.n_obs
        self.gene_names = layout.gene_names
        self.protein_names = layout.protein_names
        self.obs_columns = obs_column_names(layout)
        self.protein_panels = layout.protein_panels
        self._obs_cache: dict[str, np.ndarray] = {}
        self._obs_names: np.ndarray | None = None
        self._panel_codes: np.ndarray | None = None

    def _open(self) -> None:
        # HDF5 handles must not cross a fork: a worker process re-opens the file on first use.
        try:
            self._file = h5py.File(self.path, "r", rdcc_nbytes=CHUNK_CACHE_BYTES, rdcc_nslots=10007)
        except (FileNotFoundError, OSError) as err:
            raise StoreFormatError(f"{self._where}: cannot open as HDF5 ({err}).") from err
        a = self._init_args
        try:
            self._layout = resolve_layout(
                self._file, where=self._where, protein_key=a["protein_key"], rna_layer=a["rna_layer"],
                rna_modality=a["rna_modality"], protein_modality=a["protein_modality"],
                protein_names=a["protein_names"],
            )
            self._rna = H5MatrixReader(self._layout.rna, where=self._where)
            self._protein = H5MatrixReader(self._layout.protein, where=self._where)
        except BaseException:
            self._file.close()
            raise
        self._max_gap = max(0, min(self._rna.chunk_cells, self._protein.chunk_cells) // 2)
        self._pid = os.getpid()

    def _ensure_open(self) -> None:
        if self._pid == os.getpid():
            return
        with reopen_lock():  # reader threads of a worker may all find the handle stale at once
            if self._pid != os.getpid():
                self._open()

    @property
    def location(self) -> str:
        """The path (or URL) the study was opened from (``Source.location``)."""
        return self.path

    def __repr__(self) -> str:
        return (
            f"H5adSource({self.path!r}, name={self.name!r}, n_obs={self.n_obs}, "
            f"genes={len(self.gene_names)}, proteins={len(self.protein_names)})"
        )

    def close(self) -> None:
        """Closes the file handle (reads re-open it)."""
        if self._pid == os.getpid():
            self._file.close()
        self._pid = -1

    def obs_column(self, key: str) -> np.ndarray:
        """Returns obs column ``key`` for every cell (strings as object arrays, missing as ``""``).

        Raises:
            StoreFormatError: no such column (the message lists the columns).
        """
        if key not in self._obs_cache:
            self._ensure_open()
            self._obs_cache[key] = obs_values(find_obs_column(self._layout, key, self._where))
        return self._obs_cache[key]

    def obs_names(self) -> np.ndarray:
        """Returns the ``[n_obs]`` cell names."""
        if self._obs_names is None:
            self._ensure_open()
            self._obs_names = dataframe_index(self._layout.obs_groups[0])
        return self._obs_names

    def protein_panel_codes(self) -> np.ndarray:
        """Returns ``[n_obs] int`` panel index of each cell.

        Raises:
            StoreFormatError: stored codes fall outside the stored panels.
        """
        if self._panel_codes is None:
            self._ensure_open()
            node = self._layout.panel_code_node
            codes = (np.zeros(self.n_obs, np.int64) if node is None
                     else checked_panel_codes(node[...], len(self.protein_panels), self._where))
            self._panel_codes = codes
        return self._panel_codes

    def read(self, ids: np.ndarray) -> SourceRows:
        """Reads RNA and protein rows of sorted unique ``ids``.

        Raises:
            InvalidIdsError: ids not sorted, unique and in range.
            InvalidCountsError: NaN, infinite or negative counts (names study, cell, column).
            StoreFormatError: a corrupt chunk, or a column index read outside the genes (naming file, dataset, row).
        """
        ids = check_ids(ids, self.n_obs, f"study {self.name!r}")
        if ids.size == 0:
            return SourceRows.empty(len(self.gene_names), len(self.protein_names))
        self._ensure_open()
        starts, stops = coalesce_runs(ids, self._max_gap)
        rna = self._rna.read_csr(ids, starts, stops)
        protein = self._protein.read_dense(ids, starts, stops)
        rows = SourceRows(rna=rna, protein=protein)
        if self._validate:
            validate_rows(rows, study=self.name, gene_names=self.gene_names, protein_names=self.protein_names,
                          row_ids=ids, cell_names=self._cell_name, source_path=self.path)
        return rows

    def _cell_name(self, index: int) -> str:
        group = self._layout.obs_groups[0]
        key = group.attrs.get("_index", "_index")
        key = key.decode() if isinstance(key, bytes) else key
        value = group[key][index]
        return value.decode() if isinstance(value, bytes) else str(value)
