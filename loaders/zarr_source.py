"""``ZarrSource``: one study in an AnnData or MuData zarr store (local path or fsspec URL).

Reads are built for training: ids become a few contiguous cover ranges, the RNA data/indices and
protein slices of every range are fetched in one gather on zarr's event loop, and rows are cut out in
memory. indptr and obs columns (once asked for) are held in memory. On object storage every chunk object a read
needs is requested at once (``remote_chunk_reader``: up to ``FETCH_CONCURRENCY`` in flight over one reused
connection pool) and decoded while the rest arrive.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import numpy as np
import scipy.sparse as sp
import zarr
from zarr.core.sync import sync

from loaders.anndata_layout import resolve_layout
from loaders.errors import StoreFormatError
from loaders.object_store import translated_errors
from loaders.row_runs import coalesce_runs
from loaders.publish_journal import recover
from loaders.remote_chunk_reader import FETCH_CONCURRENCY
from loaders.source import SourceRows
from loaders.split_reads import run_split
from loaders.store_layout import PROTEIN_OBSM_KEY
from loaders.study_source import AnnDataLayoutSource
from loaders.zarr_matrix_reader import ZarrMatrixReader


async def _gather(coros: list) -> list:
    return await asyncio.gather(*coros)


READ_BUDGET_BYTES = 128 << 20
"""Decoded bytes one read holds at a time (its runs plus the whole chunks they touch): the memory bound of a read,
whatever the pattern of ids. A read from object storage also holds the stored (compressed, so no larger) bytes of
those chunks until they are decoded, at most as much again: 2 x 128 MiB per read in flight."""


def _with_connection_pool(path: str, storage_options: dict[str, Any] | None) -> dict[str, Any] | None:
    """``storage_options`` for an ``s3://`` store with a connection pool as large as the requests a read keeps in
    flight (botocore's default of 10 connections would queue the rest); a pool the caller configured is kept."""
    options = dict(storage_options or {})
    if not path.startswith(("s3://", "s3a://")) or "max_pool_connections" in options.get("config_kwargs", {}):
        return storage_options
    options["config_kwargs"] = {**options.get("config_kwargs", {}), "max_pool_connections": FETCH_CONCURRENCY}
    return options


class ZarrSource(AnnDataLayoutSource):
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
            direct_local_reads: decode chunks of zarr v2 arrays directly, local files or objects fetched
                concurrently from object storage (several times faster than zarr's reads; see
                ``zarr_chunk_reader`` and ``remote_chunk_reader``); False forces zarr's reads.

        Raises:
            StoreFormatError: the store is missing, not AnnData/MuData, or lacks a protein matrix
                (the message lists what exists); its RNA CSR indptr is corrupt or has a missing chunk.
        """
        self._init_args = dict(
            path=os.fspath(path), name=name, protein_key=protein_key, rna_layer=rna_layer,
            rna_modality=rna_modality, protein_modality=protein_modality, protein_names=protein_names,
            storage_options=storage_options, validate=validate, direct_local_reads=direct_local_reads,
        )
        self._identify(path, name, validate)
        where = self._where
        recover(self.path)  # results a killed write-back was publishing: all of them, before anything is read
        try:
            options = _with_connection_pool(self.path, storage_options)
            kwargs = {"storage_options": options} if options else {}
            with translated_errors(self.path, storage_options, doing="read"):  # no s3fs, unreachable endpoint
                root = zarr.open_group(self.path, mode="r", **kwargs)
        except (FileNotFoundError, zarr.errors.GroupNotFoundError, ValueError) as err:
            raise StoreFormatError(f"{where}: cannot open a zarr group there ({err}).") from err
        layout = resolve_layout(
            root, where=where, protein_key=protein_key, rna_layer=rna_layer,
            rna_modality=rna_modality, protein_modality=protein_modality, protein_names=protein_names,
        )
        self._adopt_layout(layout)
        self._rna = ZarrMatrixReader(layout.rna, where=where, direct=direct_local_reads)
        self._protein = ZarrMatrixReader(layout.protein, where=where, direct=direct_local_reads)
        # zarr's reads: bridging a gap shorter than a chunk costs at most one extra chunk decode, against one more
        # request and decoding the shared chunk twice. Direct reads (local files, or concurrently fetched objects)
        # fetch and decode each chunk once whatever the ranges, so a gap is not bridged: bridged cells would only be
        # read to be cut out again (~0.4 ms a batch).
        self._local_reads = self._rna.direct and self._protein.direct
        self._max_gap = (0 if self._local_reads or (self._rna.remote and self._protein.remote)
                         else max(0, min(self._rna.chunk_cells, self._protein.chunk_cells) // 2))

    @property
    def read_unit_cells(self) -> int | None:
        """On object storage, the cells of one stored RNA chunk (each chunk is one request, so shuffled reads take
        runs this long: ``read_unit``); None on local disk, where any run length reads fast."""
        return self._rna.chunk_cells if self._rna.remote else None

    def _read_rows(self, ids: np.ndarray) -> SourceRows:
        """RNA and protein rows of checked ``ids`` (``StudySource.read``): concurrent zarr reads, in rounds of
        bounded memory."""
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
        return SourceRows(rna=rna, protein=protein)

    def _read_runs(self, ids: np.ndarray, starts: np.ndarray, stops: np.ndarray):
        """RNA (CSR) and protein rows of ``ids`` covered by the runs: local chunk files decoded in this thread and a
        helper (split_reads.py), other stores in one concurrent round on zarr's event loop (on object storage every
        chunk object of every array at once, ``remote_chunk_reader``)."""
        if self._local_reads:
            # RNA data first: the largest array goes to the helper, indices and protein stay here.
            results = run_split(self._rna.direct_reads(starts, stops) + self._protein.direct_reads(starts, stops))
        else:
            limit = asyncio.Semaphore(FETCH_CONCURRENCY)  # one bound for every array's chunk requests of this read
            rna_requests = self._rna.requests(starts, stops, limit)
            results = sync(_gather(rna_requests + self._protein.requests(starts, stops, limit)))
        k = self._rna.n_arrays
        return (self._rna.assemble_csr(results[:k], ids, starts, stops),
                self._protein.assemble_dense(results[k:], ids, starts, stops))
