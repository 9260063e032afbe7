"""What every file-backed Source does the same way (``H5adSource``, ``ZarrSource``, ``SomaSource``).

``StudySource``: the read preamble and epilogue (ids checked, an empty read answered without I/O, counts validated)
around the backend's own ``_read_rows``, and the per-cell protein panel codes, checked once and cached.
``AnnDataLayoutSource`` adds what the AnnData/MuData layouts (h5ad, h5mu, zarr) share through
``anndata_layout``: the Source's attributes from the resolved layout, and obs columns and cell names read on first
use and cached.
"""

from __future__ import annotations

import os
from pathlib import PurePosixPath

import numpy as np

from loaders.anndata_layout import dataframe_index, find_obs_column, obs_column_names, obs_values
from loaders.count_validation import validate_rows
from loaders.ids import check_ids
from loaders.protein_panels import checked_panel_codes
from loaders.source import PicklesByInitArgs, SourceRows


def study_name_from_path(path: str) -> str:
    """Returns the file or directory name of ``path`` without its extension (``a/pbmc.zarr`` -> ``pbmc``)."""
    name = PurePosixPath(str(path).rstrip("/")).name
    for suffix in (".zarr", ".h5ad", ".h5mu", ".h5"):
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name


class StudySource(PicklesByInitArgs):
    """Base of the Sources of one study in a store.

    Subclasses set ``name``, ``n_obs``, ``gene_names``, ``protein_names``, ``protein_panels``, ``_where``
    (the study and store, for messages), ``_validate`` and ``location``, and implement ``_read_rows`` (ids checked,
    non-empty), ``_stored_panel_codes`` and ``_cell_name``.
    """

    _panel_codes: np.ndarray | None = None

    def read(self, ids: np.ndarray) -> SourceRows:
        """Reads RNA and protein rows of sorted unique ``ids``.

        Raises:
            InvalidIdsError: ids not sorted, unique and in range.
            InvalidCountsError: NaN, infinite or negative counts (names study, cell, column).
            StoreFormatError: a missing, truncated or corrupt chunk, or an entry outside the genes or proteins
                (naming the store, array and chunk or row).
        """
        ids = check_ids(ids, self.n_obs, f"study {self.name!r}")
        if ids.size == 0:
            return SourceRows.empty(len(self.gene_names), len(self.protein_names))
        rows = self._read_rows(ids)
        if self._validate:
            validate_rows(rows, study=self.name, gene_names=self.gene_names, protein_names=self.protein_names,
                          row_ids=ids, cell_names=self._cell_name, source_path=self.location)
        return rows

    def _read_rows(self, ids: np.ndarray) -> SourceRows:
        """The backend's read of checked, non-empty ``ids``."""
        raise NotImplementedError

    def protein_panel_codes(self) -> np.ndarray:
        """Returns ``[n_obs] int`` panel index of each cell.

        Raises:
            StoreFormatError: stored codes fall outside the stored panels.
        """
        if self._panel_codes is None:
            stored = self._stored_panel_codes()
            self._panel_codes = (np.zeros(self.n_obs, dtype=np.int64) if stored is None
                                 else checked_panel_codes(stored, len(self.protein_panels), self._where))
        return self._panel_codes

    def _stored_panel_codes(self) -> np.ndarray | None:
        """The stored ``[n_obs]`` panel codes, or None where the store records none (every cell: panel 0)."""
        raise NotImplementedError

    def _cell_name(self, index: int) -> str:
        """The name of cell ``index``, for error messages."""
        raise NotImplementedError


class AnnDataLayoutSource(StudySource):
    """Base of the Sources over an AnnData/MuData layout (``anndata_layout.resolve_layout``): h5ad, h5mu, zarr.

    Subclasses call ``_identify`` first and ``_adopt_layout`` once the layout is resolved, and override
    ``_ensure_open`` where a handle must be re-opened (after a fork) before a read.
    """

    def _identify(self, path: str | os.PathLike, name: str | None, validate: bool) -> None:
        """Sets ``path``, ``name`` (default: the file name without extension) and what messages and reads use."""
        self.path = os.fspath(path)
        self.name = name or study_name_from_path(self.path)
        self._where = f"study {self.name!r} ({self.path})"
        self._validate = validate

    @property
    def location(self) -> str:
        """The path (or URL) the study was opened from (``Source.location``)."""
        return self.path

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.path!r}, name={self.name!r}, n_obs={self.n_obs}, "
            f"genes={len(self.gene_names)}, proteins={len(self.protein_names)})"
        )

    def _adopt_layout(self, layout) -> None:
        """Takes the Source's attributes from ``layout`` and starts with empty caches."""
        self._layout = layout
        self.n_obs = layout.n_obs
        self.gene_names = layout.gene_names
        self.protein_names = layout.protein_names
        self.obs_columns = obs_column_names(layout)
        self.protein_panels = layout.protein_panels
        self._obs_cache: dict[str, np.ndarray] = {}
        self._obs_names: np.ndarray | None = None
        self._panel_codes = None

    def _ensure_open(self) -> None:
        """Re-opens what a read needs if it cannot be used in this process; nothing by default."""

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

    def _stored_panel_codes(self) -> np.ndarray | None:
        self._ensure_open()
        node = self._layout.panel_code_node
        return None if node is None else node[...]

    def _cell_name(self, index: int) -> str:
        # Only called to word an error, so one element is read rather than the whole index.
        group = self._layout.obs_groups[0]
        key = group.attrs.get("_index", "_index")
        key = key.decode() if isinstance(key, bytes) else key
        value = group[key][index]
        return value.decode() if isinstance(value, bytes) else str(value)
