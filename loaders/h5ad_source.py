"""``H5adSource``: one study in a backed ``.h5ad`` (or ``.h5mu``) file, read with h5py directly.

For data that has not been ingested: nothing is loaded but indptr and the obs columns asked for. HDF5
reads are serial and h5ad files are usually gzip-compressed, so this is slower than a ``ZarrSource``
on an ingested store; use it to start quickly, ingest for long training runs.
"""

from __future__ import annotations

import os

import h5py
import numpy as np

from loaders.anndata_layout import resolve_layout
from loaders.errors import StoreFormatError
from loaders.h5_matrix_reader import H5MatrixReader
from loaders.row_runs import coalesce_runs
from loaders.reopen_lock import reopen_lock
from loaders.source import SourceRows
from loaders.store_layout import PROTEIN_OBSM_KEY
from loaders.study_source import AnnDataLayoutSource

CHUNK_CACHE_BYTES = 64 << 20
"""Per-dataset HDF5 chunk cache: neighbouring cover ranges often share a compressed chunk."""


class H5adSource(AnnDataLayoutSource):
    """A Source over an h5ad file (CSR or dense X, proteins in ``obsm``) or an h5mu file."""

    _given_codes: np.ndarray | None = None  # the constructor's protein_panel_codes, checked

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
        protein_panels=None,
        protein_panel_codes=None,
    ) -> None:
        """Args:
            path: ``.h5ad`` or ``.h5mu`` file.
            name: study name (default: the file name without extension).
            protein_key: h5ad: key of the protein matrix under ``obsm``.
            rna_layer: read RNA counts from ``layers/<rna_layer>`` instead of ``X``.
            rna_modality, protein_modality: h5mu: modality names.
            protein_names: names of the protein columns where the file does not record them.
            validate: check every read for NaN, infinite and negative counts.
            protein_panels: ``[n_panels, n_proteins] bool`` measured proteins, instead of the panels the file
                records (as ``ArraySource``'s; e.g. detected by the caller from the whole protein matrix).
            protein_panel_codes: ``[n_obs]`` panel index per cell (with ``protein_panels``); may be omitted with
                a single panel.

        Raises:
            StoreFormatError: the file is missing or not HDF5, or lacks a protein matrix (the message
                lists what exists); its RNA CSR indptr is corrupt; ``protein_panels`` /
                ``protein_panel_codes`` do not fit the file's proteins and cells.
        """
        self._init_args = dict(
            path=os.fspath(path), name=name, protein_key=protein_key, rna_layer=rna_layer,
            rna_modality=rna_modality, protein_modality=protein_modality, protein_names=protein_names,
            validate=validate, protein_panels=protein_panels, protein_panel_codes=protein_panel_codes,
        )
        self._identify(path, name, validate)
        self._pid = -1
        self._open()
        self._adopt_layout(self._layout)
        if protein_panels is not None or protein_panel_codes is not None:
            self.protein_panels, self._given_codes = self._given_panels(protein_panels, protein_panel_codes)

    def _given_panels(self, panels, codes) -> tuple[np.ndarray, np.ndarray]:
        """Checks the constructor's ``protein_panels`` / ``protein_panel_codes`` against the file's shape.

        Returns:
            ``([n_panels, n_proteins] bool, [n_obs] int64)``.

        Raises:
            StoreFormatError: codes without panels, panels of the wrong shape, several panels without codes,
                or codes of the wrong shape, type or range.
        """
        n_prot = len(self.protein_names)
        if panels is None:
            raise StoreFormatError(f"{self._where}: protein_panel_codes given without protein_panels")
        panels = np.asarray(panels, dtype=bool)
        if panels.ndim != 2 or panels.shape[0] == 0 or panels.shape[1] != n_prot:
            raise StoreFormatError(f"{self._where}: protein_panels must be [n_panels >= 1, n_proteins={n_prot}] "
                                   f"bool; got shape {panels.shape}")
        if codes is None:
            if panels.shape[0] != 1:
                raise StoreFormatError(f"{self._where}: {panels.shape[0]} protein panels need protein_panel_codes "
                                       "(one per cell)")
            return panels, np.zeros(self.n_obs, dtype=np.int64)
        codes = np.asarray(codes)
        if codes.shape != (self.n_obs,) or not np.issubdtype(codes.dtype, np.integer):
            raise StoreFormatError(f"{self._where}: protein_panel_codes must be [n_obs={self.n_obs}] int; got "
                                   f"{codes.dtype} {codes.shape}")
        if codes.size and (codes.min() < 0 or codes.max() >= panels.shape[0]):
            raise StoreFormatError(f"{self._where}: protein_panel_codes must lie in [0, {panels.shape[0]}); got "
                                   f"{codes.min()}..{codes.max()}")
        return panels, codes.astype(np.int64)

    def _stored_panel_codes(self) -> np.ndarray | None:
        # Codes given to the constructor replace the file's (its panels were replaced with them).
        return self._given_codes if self._given_codes is not None else super()._stored_panel_codes()

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

    def close(self) -> None:
        """Closes the file handle (reads re-open it)."""
        if self._pid == os.getpid():
            self._file.close()
        self._pid = -1

    def _read_rows(self, ids: np.ndarray) -> SourceRows:
        """RNA and protein rows of checked ``ids`` (``StudySource.read``): serial HDF5 reads of covering runs."""
        self._ensure_open()
        starts, stops = coalesce_runs(ids, self._max_gap)
        return SourceRows(rna=self._rna.read_csr(ids, starts, stops),
                          protein=self._protein.read_dense(ids, starts, stops))
