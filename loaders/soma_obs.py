"""obs columns between pandas (ingest input), Arrow (what TileDB-SOMA stores) and numpy (what Sources return)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa

from loaders.errors import StoreFormatError
from loaders.soma_layout import OBS_ID_COLUMN


def obs_to_arrow(obs: pd.DataFrame, where: str) -> dict[str, pa.Array]:
    """Returns obs columns as Arrow arrays: strings/categoricals as large_string (missing as null), bools
    as bool, integers as int64, floats as float64; anything else as its string form.

    Raises:
        StoreFormatError: a column name SOMA reserves (``soma_*``) or ours (``obs_id``).
    """
    out: dict[str, pa.Array] = {}
    for col in obs.columns:
        name = str(col)
        if name.startswith("soma_") or name == OBS_ID_COLUMN:
            raise StoreFormatError(
                f"{where}: obs column {name!r} clashes with a TileDB-SOMA name (soma_* and {OBS_ID_COLUMN!r} "
                "are reserved); rename it before ingest."
            )
        s = obs[col]
        dtype = s.dtype
        if isinstance(dtype, pd.CategoricalDtype) or dtype == object or pd.api.types.is_string_dtype(dtype):
            values = [None if pd.isna(v) else str(v) for v in s.astype(object)]
            out[name] = pa.array(values, type=pa.large_string())
        elif pd.api.types.is_bool_dtype(dtype):
            out[name] = pa.array(s, type=pa.bool_(), from_pandas=True)
        elif pd.api.types.is_integer_dtype(dtype):
            out[name] = pa.array(s, type=pa.int64(), from_pandas=True)
        elif pd.api.types.is_float_dtype(dtype):
            out[name] = pa.array(s, type=pa.float64(), from_pandas=True)
        else:
            out[name] = pa.array([None if pd.isna(v) else str(v) for v in s], type=pa.large_string())
    return out


def arrow_column_values(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """Returns an obs column as numpy, as ``anndata_layout.obs_values`` does for zarr/h5ad: strings as an
    object array of str with missing as ``""``, numbers as numbers (missing integers as NaN floats)."""
    col = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if pa.types.is_dictionary(col.type):
        col = col.dictionary_decode()
    t = col.type
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_binary(t) or pa.types.is_large_binary(t):
        values = col.fill_null("").to_numpy(zero_copy_only=False)
        return np.asarray([v.decode() if isinstance(v, bytes) else v for v in values], dtype=object)
    if col.null_count:
        if pa.types.is_boolean(t):
            return np.asarray(col.to_pylist(), dtype=object)
        return col.cast(pa.float64()).fill_null(np.nan).to_numpy(zero_copy_only=False)
    return col.to_numpy(zero_copy_only=False)
