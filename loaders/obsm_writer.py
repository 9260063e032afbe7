"""Writing a per-cell result matrix back into a Zarr store's ``obsm``, chunk by chunk, atomically.

Results (latent means, predictions, ...) are computed in minibatches over millions of cells, so they are
written as they come, never gathered in memory. They go to a hidden temporary array (``obsm/.tmp-<key>``) and
are renamed over ``obsm/<key>`` only when every row has been written: a job killed half-way leaves the
store's previous ``obsm/<key>`` (if any) intact. The rename goes through ``loaders.publish_journal`` (alone, or
together with the other results of one command), which also rebuilds the consolidated metadata so
``anndata.read_zarr`` sees the new entry.

``resume=True`` reopens a temporary array left by an interrupted job instead of recreating it (its shape,
dtype and row chunks must match); which rows it already holds is the caller's bookkeeping (``mark_written``):
``streamtotal.inference.write_back`` keeps that ledger and skips what was done.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import zarr

from loaders.errors import StoreFormatError
from loaders.publish_journal import Rename, recover
from loaders.result_writer import ResultWriter
from loaders.store_layout import DENSE_ENCODING, ZARR_FORMAT, StoreLayoutConfig


class ObsmWriter(ResultWriter):
    """Writes an ``[n_obs, n_columns]`` float32 matrix into ``<store>/obsm/<key>``.

    Args:
        store_path: a local Zarr store (AnnData layout).
        key: the obsm key, e.g. ``"X_streamtotal"``.
        n_obs: rows (cells) of the store.
        n_columns: columns of the result.
        dtype: stored dtype.
        chunk_rows: rows per chunk (default: the store layout's choice for ``n_columns``). Resumable writers
            pass a divisor of their write unit so every chunk is written by exactly one unit.
        resume: reopen an existing temporary array of the same shape, dtype and chunks instead of replacing it
            (and keep it when a ``with`` block raises, for the next run to resume).

    Raises:
        StoreFormatError: the store is not a local AnnData Zarr store, or ``n_obs`` does not match it.
    """

    def __init__(self, store_path: str | Path, key: str, n_obs: int, n_columns: int, dtype: str = "float32",
                 *, chunk_rows: int | None = None, resume: bool = False) -> None:
        if not (Path(store_path) / "obsm").is_dir():
            raise StoreFormatError(
                f"{store_path} is not a local AnnData Zarr store with an obsm group; results can be written back "
                "only into stores made by `streamtotal ingest` (or anndata.write_zarr) on a local disk"
            )
        if "/" in key or key.startswith("."):
            raise StoreFormatError(f"obsm key {key!r} must be a plain name (no '/', not starting with '.')")
        super().__init__(store_path, n_obs, resumable=resume)
        self.key = key
        recover(self.store_path)  # a half-done earlier publication is completed before anything is staged
        root = zarr.open_group(str(self.store_path), mode="r", zarr_format=ZARR_FORMAT, use_consolidated=False)
        x_shape = root["X"].attrs.get("shape") if "X" in root else None
        if x_shape is not None and int(x_shape[0]) != n_obs:
            raise StoreFormatError(f"{store_path} has {x_shape[0]} cells but the result has {n_obs} rows")
        layout = StoreLayoutConfig()
        self._tmp_name = f".tmp-{key}"
        chunks = (int(chunk_rows) if chunk_rows else layout.row_chunk(n_columns), n_columns)
        obsm = zarr.open_group(str(self.store_path / "obsm"), mode="r+", zarr_format=ZARR_FORMAT,
                               use_consolidated=False)
        existing = obsm.get(self._tmp_name) if resume else None
        if (isinstance(existing, zarr.Array) and existing.shape == (n_obs, n_columns)
                and existing.chunks == chunks and existing.dtype == np.dtype(dtype)):
            self._array = existing
            self.resumed = True
        else:
            self._array = obsm.create_array(
                self._tmp_name, shape=(n_obs, n_columns), chunks=chunks, dtype=dtype,
                compressors=layout.compressor(), overwrite=True, attributes=dict(DENSE_ENCODING),
            )
            self.resumed = False

    @property
    def description(self) -> str:
        """``obsm/<key>``."""
        return f"obsm/{self.key}"

    @property
    def tmp_path(self) -> Path:
        """Directory of the temporary array (``obsm/.tmp-<key>``)."""
        return self.store_path / "obsm" / self._tmp_name

    def tmp_paths(self) -> list[Path]:
        """The temporary array's directory, as a list (``ResultWriter``)."""
        return [self.tmp_path]

    def write_rows(self, ids: np.ndarray, values: np.ndarray) -> None:
        """Writes ``values[i]`` into row ``ids[i]``; contiguous runs of ids are written as slices."""
        ids = np.asarray(ids, dtype=np.int64)
        values = np.asarray(values, dtype=self._array.dtype)
        order = np.argsort(ids, kind="stable")
        self._write_runs(self._array, ids[order], values[order])

    @property
    def rename(self) -> Rename:
        """How the temporary array is published (for ``publish_journal.publish_group``)."""
        return Rename("obsm", self._tmp_name, self.key)

    @property
    def renames(self) -> list[Rename]:
        """``[rename]`` (``ResultWriter``): ``commit`` publishes the array as ``obsm/<key>`` and reconsolidates."""
        return [self.rename]
