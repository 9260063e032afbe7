"""``ZarrSource``: one study in an AnnData or MuData zarr store (local path or fsspec URL).

Reads are built for training: ids become a few contiguous cover ranges, the RNA data/indices and
protein slices of every range are fetched in one gather on zarr's event loop, and rows are cut out in
memory. indptr and obs columns (once asked for) are held in memory.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import PurePosixPath
from typing import Any

import numpy as np
import scipy.sparse as sp
import zarr
from zarr.core.sync import sync

from loaders.anndata_layout import (
    dataframe_index,
    find_obs_column,
    obs_column_names,
    obs_values,
    resolve_layout,
)
from loaders.count_validation import validate_rows
from loaders.errors import StoreFormatError
from loaders.ids import check_ids
from loaders.row_runs import coalesce_runs
from loaders.protein_panels import checked_panel_codes
from loaders.source import PicklesByInitArgs, SourceRows
from loaders.split_reads import run_split
from loaders.store_layout import PROTEIN_OBSM_KEY
from loaders.zarr_matrix_reader import ZarrMatrixReader


def study_name_from_path(path: str) -> str:
    """Returns the file or directory name of ``path`` without its extension (``a/pbmc.zarr`` -> ``pbmc``)."""
    name = PurePosixPath(str(path).rstrip("/")).name
    for suffix in (".zarr", ".h5ad", ".h5mu", ".h5"):
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name


async def _gather(coros: list) -> list:
    return await asyncio.gather(*coros)


READ_BUDGET_BYTES = 128 << 20
"""Decoded bytes one read holds at a time (its runs plus the whole chunks they touch): the memory bound of a read,
whatever the pattern of ids."""


class ZarrSource(PicklesByInitArgs):
    """A Source over an AnnData zarr store (ours or any with CSR/dense X and proteins in obsm) or a
    MuData zarr store (RNA in ``mod/<rna_modality>``, proteins in ``mod/<protein_modality>``)."""

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
        storage_options: dict[str, Any] | None = None,
        validate: bool = True,
        direct_local_reads: bool = True,
    ) -> None:
        """Args:
            path: store directory or fsspec URL (e.g. ``s3://bucket/study.zarr``).
            name: study name (default: the store's file name without extension).
            protein_key: AnnData stores: key of the protein matrix under ``obsm``.
            rna_layer: read RNA counts from ``layers/<rna_layer>`` instead of ``X``.
            rna_modality, protein_modality: MuData stores: modality names.
            protein_names: names of the protein columns where the store does not record them.
            storage_options: fsspec options for URLs (credentials, endpoint); None for local paths.
            validate: check every read for NaN, infinite and negative counts.
            direct_local_reads: decode chunks of local zarr v2 arrays directly (several times faster
                than zarr's reads; see ``zarr_chunk_reader``); False forces zarr's reads.

        Raises:
            StoreFormatError: the store is missing, not AnnData/MuData, or lacks a protein matrix
                (the message lists what exists).
        """
        self._init_args = dict(
            path=os.fspath(path), name=name, protein_key=protein_key, rna_layer=rna_layer,
            rna_modality=rna_modality, protein_modality=protein_modality, protein_names=protein_names,
            storage_options=storage_options, validate=validate, direct_local_reads=direct_local_reads,
        )
        self.path = os.fspath(path)
        self.name = name or study_name_from_path(self.path)
        where = f"study {self.name!r} ({self.path})"
        self._where = where
        self._validate = validate
        try:
            kwargs = {"storage_options": storage_options} if storage_options else {}
            root = zarr.open_group(self.path, mode="r", **kwargs)
        except (FileNotFoundError, zarr.errors.GroupNotFoundError, ValueError) as err:
            raise StoreFormatError(f"{where}: cannot open a zarr group there ({err}).") from err
        layout = resolve_layout(
            root, where=where, protein_key=protein_key, rna_layer=rna_layer,
            rna_modality=rna_modality, protein_modality=protein_modality, protein_names=protein_names,
        )
        self._layout = layout
        self.n_obs = layout.n_obs
        self.gene_names = layout.gene_names
        self.protein_names = layout.protein_names
        self.obs_columns = obs_column_names(layout)
        self.protein_panels = layout.protein_panels
        self._rna = ZarrMatrixReader(layout.rna, direct=direct_local_reads)
        self._protein = ZarrMatrixReader(layout.protein, direct=direct_local_reads)
        # Remote reads: bridging a gap shorter than a chunk costs at most one extra chunk decode, against one more
        # request and decoding the shared chunk twice. Local direct reads decode each chunk once whatever the
        # ranges, so a gap is not bridged: bridged cells would only be read to be cut out again (~0.4 ms a batch).
        self._local_reads = self._rna.direct and self._protein.direct
        self._max_gap = (0 if self._local_reads
                         else max(0, min(self._rna.chunk_cells, self._protein.chunk_cells) // 2))
        self._obs_cache: dict[str, np.ndarray] = {}
        self._obs_names: np.ndarray | None = None
        self._panel_codes: np.ndarray | None = None

    def __repr__(self) -> str:
        return (
            f"ZarrSource({self.path!r}, name={self.name!r}, n_obs={self.n_obs}, "
            f"genes={len(self.gene_names)}, proteins={len(self.protein_names)})"
        )

    def obs_column(self, key: str) -> np.ndarray:
        """Returns obs column ``key`` for every cell (strings as object arrays, missing as ``""``).

        Raises:
            StoreFormatError: no such column (the message lists the columns).
        """
        if key not in self._obs_cache:
            self._obs_cache[key] = obs_values(find_obs_column(self._layout, key, self._where))
        return self._obs_cache[key]

    def obs_names(self) -> np.ndarray:
        """Returns the ``[n_obs]`` cell names."""
        if self._obs_names is None:
            self._obs_names = dataframe_index(self._layout.obs_groups[0])
        return self._obs_names

    def protein_panel_codes(self) -> np.ndarray:
        """Returns ``[n_obs] int`` panel index of each cell.

        Raises:
            StoreFormatError: stored codes fall outside the stored panels.
        """
        if self._panel_codes is None:
            node = self._layout.panel_code_node
            if node is None:
                codes = np.zeros(self.n_obs, dtype=np.int64)
            else:
                codes = checked_panel_codes(node[...], len(self.protein_panels), self._where)
            self._panel_codes = codes
        return self._panel_codes

    def read(self, ids: np.ndarray) -> SourceRows:
        """Reads RNA and protein rows of sorted unique ``ids``: concurrent zarr reads, in rounds of bounded memory.

        Raises:
            InvalidIdsError: ids not sorted, unique and in range.
            InvalidCountsError: NaN, infinite or negative counts (names study, cell, column).
        """
        ids = check_ids(ids, self.n_obs, f"study {self.name!r}")
        if ids.size == 0:
            return SourceRows.empty(len(self.gene_names), len(self.protein_names))
        starts, stops = coalesce_runs(ids, self._max_gap)
        # Chunks are decoded whole, and every chunk a call touches is held until its rows are cut out: for
        # scattered ids (a random sample, validation cells) that is far more than the rows asked for (4,096 random
        # cells of a 1M-cell store decoded ~500k cells' worth, 3 GB). Runs are therefore read in groups whose
        # decoded bytes (each run plus up to a chunk of every array at either end) stay within READ_BUDGET_BYTES.
        # Counted in bytes, not cells: a protein chunk holds a few hundred cells but weighs as a few RNA cells, and
        # counting it as cells split a 4,096-cell training read into three rounds (~30% slower).
        readers = (self._rna, self._protein)
        cost = ((stops - starts) * sum(r.bytes_per_cell for r in readers) + 2 * sum(r.chunk_bytes for r in readers))
        group = (np.cumsum(cost) // READ_BUDGET_BYTES).astype(np.int64)
        if group[-1] == 0:
            rna, protein = self._read_runs(ids, starts, stops)
        else:
            bounds = np.flatnonzero(np.diff(group)) + 1
            rna_parts, protein_parts = [], []
            for g_starts, g_stops in zip(np.split(starts, bounds), np.split(stops, bounds)):
                g_ids = ids[np.searchsorted(ids, g_starts[0]) : np.searchsorted(ids, g_stops[-1])]
                r, p = self._read_runs(g_ids, g_starts, g_stops)
                rna_parts.append(r)
                protein_parts.append(p)
            rna, protein = sp.vstack(rna_parts, format="csr"), np.concatenate(protein_parts)
        rows = SourceRows(rna=rna, protein=protein)
        if self._validate:
            validate_rows(rows, study=self.name, gene_names=self.gene_names, protein_names=self.protein_names,
                          row_ids=ids, cell_names=self._cell_name, source_path=self.path)
        return rows

    def _read_runs(self, ids: np.ndarray, starts: np.ndarray, stops: np.ndarray):
        """RNA (CSR) and protein rows of ``ids`` covered by the runs: local chunk files decoded in this thread and a
        helper (split_reads.py), other stores in one concurrent round of zarr reads."""
        if self._local_reads:
            # RNA data first: the largest array goes to the helper, indices and protein stay here.
            results = run_split(self._rna.direct_reads(starts, stops) + self._protein.direct_reads(starts, stops))
        else:
            rna_requests = self._rna.requests(starts, stops)
            results = sync(_gather(rna_requests + self._protein.requests(starts, stops)))
        k = self._rna.n_arrays
        return (self._rna.assemble_csr(results[:k], ids, starts, stops),
                self._protein.assemble_dense(results[k:], ids, starts, stops))

    def _cell_name(self, index: int) -> str:
        # Only called to word an error, so one element is read rather than the whole index.
        group = self._layout.obs_groups[0]
        key = group.attrs.get("_index", "_index")
        value = group[key][index]
        return value.decode() if isinstance(value, bytes) else str(value)
