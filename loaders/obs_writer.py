"""Adding obs columns to a Zarr store, chunk by chunk, published atomically (``loaders.obsm_writer``'s sibling).

Predicted labels belong in ``obs`` (``adata.obs["streamtotal_label"]``), where scanpy looks for them, not in an
obsm matrix. Each new column is written as it is computed into a hidden element ``obs/.tmp-<name>`` in
AnnData's own zarr v2 encoding:

    numeric column      obs/<name>                 array, encoding-type "array"
    categorical column  obs/<name>/codes           int array (chunked, written chunk by chunk)
                        obs/<name>/categories      string-array (known up front: the model's labels)

``commit`` then publishes the columns as one group (``loaders.publish_journal``): every temporary element is
renamed over its final name, the new names are appended to the obs group's ``column-order``, and the store's
metadata is reconsolidated, so ``anndata.read_zarr`` sees the columns. A job killed before the journal is
written leaves the store's previous obs (and the columns it listed) untouched; one killed after it is completed
by the next open. ``write_back.WriteBack`` publishes the columns together with its obsm results instead.

``resume=True`` reopens temporary columns left by an interrupted job (same dtype or categories, same chunks)
instead of recreating them; ``streamtotal.inference.write_back`` keeps the ledger of which rows they hold. The
staging, ``commit`` / ``abort`` and ``with`` lifecycle is ``loaders.result_writer.ResultWriter``'s.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import zarr

from loaders.errors import StoreFormatError
from loaders.publish_journal import Rename, recover
from loaders.result_writer import ResultWriter
from loaders.store_layout import DENSE_ENCODING, ZARR_FORMAT, StoreLayoutConfig

CATEGORICAL_ENCODING = {"encoding-type": "categorical", "encoding-version": "0.2.0", "ordered": False}


class ObsColumnWriter(ResultWriter):
    """Writes new ``[n_obs]`` columns into ``<store>/obs``.

    Args:
        store_path: a local AnnData-layout Zarr store.
        n_obs: rows (cells) of the store.
        columns: ``{name: categories}`` for a categorical column (a sequence of str), or ``{name: dtype}``
            (e.g. ``"float32"``) for a numeric one.
        protected: names that must not be overwritten (e.g. the label column used for training).
        chunk_rows: rows per chunk (default: the store layout's choice for one column).
        resume: reopen matching temporary columns of an interrupted job instead of replacing them (and keep them
            when a ``with`` block raises, for the next run to resume).

    Raises:
        StoreFormatError: not a local AnnData Zarr store, a bad or protected column name.
    """

    def __init__(self, store_path: str | Path, n_obs: int, columns: dict[str, Sequence[str] | str],
                 protected: Sequence[str] = (), *, chunk_rows: int | None = None, resume: bool = False) -> None:
        from anndata.io import write_elem

        if not (Path(store_path) / "obs" / ".zattrs").is_file():
            raise StoreFormatError(
                f"{store_path} is not a local AnnData Zarr store with an obs group; results can be written back "
                "only into stores made by `streamtotal ingest` (or anndata.write_zarr) on a local disk"
            )
        super().__init__(store_path, n_obs, resumable=resume)
        self.obs_dir = self.store_path / "obs"
        recover(self.store_path)  # a half-done earlier publication is completed before anything is staged
        obs = zarr.open_group(str(self.obs_dir), mode="r+", zarr_format=ZARR_FORMAT, use_consolidated=False)
        index_key = obs.attrs.get("_index", "_index")
        for name in columns:
            if "/" in name or name.startswith(".") or name in (index_key, *protected):
                raise StoreFormatError(f"cannot write obs column {name!r} (a plain, unprotected name is needed)")
        self.names = list(columns)
        self.obs_columns = self.names
        self._arrays: dict[str, zarr.Array] = {}
        layout = StoreLayoutConfig()
        chunk = int(chunk_rows) if chunk_rows else layout.row_chunk(1)
        self.resumed = bool(columns)
        for name, spec in columns.items():
            tmp = f".tmp-{name}"
            reopened = _reopen(obs, tmp, spec, n_obs, chunk) if resume else None
            if reopened is not None:
                self._arrays[name] = reopened
                continue
            self.resumed = False
            if tmp in obs:
                del obs[tmp]
            if isinstance(spec, str):
                self._arrays[name] = obs.create_array(
                    tmp, shape=(n_obs,), chunks=(chunk,), dtype=spec, compressors=layout.compressor(),
                    attributes=dict(DENSE_ENCODING))
            else:
                categories = [str(c) for c in spec]
                group = obs.create_group(tmp)
                group.attrs.update(CATEGORICAL_ENCODING)
                write_elem(group, "categories", np.asarray(categories, dtype=object))
                self._arrays[name] = group.create_array(
                    "codes", shape=(n_obs,), chunks=(chunk,), dtype=_code_dtype(categories),
                    compressors=layout.compressor(), attributes=dict(DENSE_ENCODING))

    @property
    def description(self) -> str:
        """``obs columns [...]``."""
        return f"obs columns {self.names}"

    def write_rows(self, ids: np.ndarray, values: dict[str, np.ndarray]) -> None:
        """Writes ``values[name][i]`` into row ``ids[i]`` of every column (category codes for categoricals)."""
        ids = np.asarray(ids, dtype=np.int64)
        order = np.argsort(ids, kind="stable")
        for name, array in self._arrays.items():
            self._write_runs(array, ids[order], np.asarray(values[name])[order].astype(array.dtype))

    def tmp_paths(self) -> list[Path]:
        """Directories of the temporary columns (``obs/.tmp-<name>``)."""
        return [self.obs_dir / f".tmp-{name}" for name in self.names]

    @property
    def renames(self) -> list[Rename]:
        """How the temporary columns are published (for ``publish_journal.publish_group``)."""
        return [Rename("obs", f".tmp-{name}", name) for name in self.names]


def _code_dtype(categories: Sequence[str]) -> str:
    return "int8" if len(categories) < 128 else "int16" if len(categories) < 32768 else "int32"


def _reopen(obs: zarr.Group, tmp: str, spec, n_obs: int, chunk: int) -> zarr.Array | None:
    """The codes or values array of a temporary column that matches ``spec``, or None (then it is recreated)."""
    from anndata.io import read_elem

    element = obs.get(tmp)
    if isinstance(spec, str):
        array, dtype = element, np.dtype(spec)
    else:
        if not isinstance(element, zarr.Group) or "codes" not in element or "categories" not in element:
            return None
        if [str(c) for c in read_elem(element["categories"])] != [str(c) for c in spec]:
            return None
        array, dtype = element["codes"], np.dtype(_code_dtype(list(spec)))
    if isinstance(array, zarr.Array) and array.shape == (n_obs,) and array.chunks == (chunk,) and array.dtype == dtype:
        return array
    return None
