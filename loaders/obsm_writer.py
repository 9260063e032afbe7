"""Writing a per-cell result matrix back into a Zarr store's ``obsm``, chunk by chunk, atomically.

Results (latent means, predictions, ...) are computed in minibatches over millions of cells, so they are
written as they come, never gathered in memory. They go to a hidden temporary array (``obsm/.tmp-<key>``) and
are renamed over ``obsm/<key>`` only when every row has been written: a job killed half-way leaves the
store's previous ``obsm/<key>`` (if any) intact. The store's consolidated metadata is rebuilt afterwards so
``anndata.read_zarr`` sees the new entry.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import zarr

from loaders.errors import StoreFormatError
from loaders.store_layout import DENSE_ENCODING, ZARR_FORMAT, StoreLayoutConfig


class ObsmWriter:
    """Writes an ``[n_obs, n_columns]`` float32 matrix into ``<store>/obsm/<key>``.

    Args:
        store_path: a local Zarr store (AnnData layout).
        key: the obsm key, e.g. ``"X_streamtotal"``.
        n_obs: rows (cells) of the store.
        n_columns: columns of the result.
        dtype: stored dtype.

    Raises:
        StoreFormatError: the store is not a local AnnData Zarr store, or ``n_obs`` does not match it.
    """

    def __init__(self, store_path: str | Path, key: str, n_obs: int, n_columns: int, dtype: str = "float32") -> None:
        self.store_path = Path(store_path)
        if not (self.store_path / "obsm").is_dir():
            raise StoreFormatError(
                f"{store_path} is not a local AnnData Zarr store with an obsm group; results can be written back "
                "only into stores made by `streamtotal ingest` (or anndata.write_zarr) on a local disk"
            )
        if "/" in key or key.startswith("."):
            raise StoreFormatError(f"obsm key {key!r} must be a plain name (no '/', not starting with '.')")
        self.key, self.n_obs = key, n_obs
        root = zarr.open_group(str(self.store_path), mode="r", zarr_format=ZARR_FORMAT, use_consolidated=False)
        x_shape = root["X"].attrs.get("shape") if "X" in root else None
        if x_shape is not None and int(x_shape[0]) != n_obs:
            raise StoreFormatError(f"{store_path} has {x_shape[0]} cells but the result has {n_obs} rows")
        layout = StoreLayoutConfig()
        self._tmp_name = f".tmp-{key}"
        obsm = zarr.open_group(str(self.store_path / "obsm"), mode="r+", zarr_format=ZARR_FORMAT,
                               use_consolidated=False)
        self._array = obsm.create_array(
            self._tmp_name, shape=(n_obs, n_columns), chunks=(layout.row_chunk(n_columns), n_columns), dtype=dtype,
            compressors=layout.compressor(), overwrite=True, attributes=dict(DENSE_ENCODING),
        )
        self._written = np.zeros(n_obs, dtype=bool)

    def write_rows(self, ids: np.ndarray, values: np.ndarray) -> None:
        """Writes ``values[i]`` into row ``ids[i]``; contiguous runs of ids are written as slices."""
        ids = np.asarray(ids, dtype=np.int64)
        values = np.asarray(values, dtype=self._array.dtype)
        order = np.argsort(ids, kind="stable")
        ids, values = ids[order], values[order]
        breaks = np.flatnonzero(np.diff(ids) != 1) + 1
        for run_ids, run_values in zip(np.split(ids, breaks), np.split(values, breaks)):
            if len(run_ids):
                self._array[int(run_ids[0]) : int(run_ids[-1]) + 1] = run_values
        self._written[ids] = True

    def commit(self) -> None:
        """Renames the temporary array over ``obsm/<key>`` and reconsolidates the store's metadata.

        Raises:
            StoreFormatError: some rows were never written (the temporary array is kept for inspection).
        """
        missing = np.flatnonzero(~self._written)
        if len(missing):
            raise StoreFormatError(
                f"refusing to publish obsm/{self.key} in {self.store_path}: {len(missing)} of {self.n_obs} rows were "
                f"never written (first: cell {int(missing[0])})"
            )
        obsm_dir = self.store_path / "obsm"
        final, tmp = obsm_dir / self.key, obsm_dir / self._tmp_name
        old = obsm_dir / f".old-{self.key}"
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        if old.exists():
            shutil.rmtree(old)
        zarr.consolidate_metadata(str(self.store_path), zarr_format=ZARR_FORMAT)
