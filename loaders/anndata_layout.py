"""Finds the RNA matrix, protein matrix, names, obs and panels in an AnnData or MuData hierarchy.

Works on an opened h5py file or zarr group alike (both expose ``group[key]``, ``key in group`` and
``.attrs``), so the h5ad/h5mu ingest readers, ``H5adSource`` and ``ZarrSource`` share one resolution
and give the same errors. Only names, shapes and small metadata are read here; never the counts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from anndata.io import read_elem

from loaders.errors import StoreFormatError
from loaders.store_layout import META_UNS_KEY, PANEL_OBS_COLUMN, PROTEIN_NAMES_UNS_KEY


@dataclass
class MatrixElement:
    """One ``[n_rows, n_cols]`` matrix in a hierarchy.

    Attributes:
        kind: ``"csr"``, ``"dense"`` or ``"dataframe"`` (one 1-D array per column).
        path: path inside the file, for messages.
        node: the group (csr, dataframe) or array (dense).
        shape: ``(n_rows, n_cols)``.
        columns: column keys of a dataframe element.
    """

    kind: str
    path: str
    node: Any
    shape: tuple[int, int]
    columns: list[str] = field(default_factory=list)


@dataclass
class ResolvedLayout:
    """What a Source or ingest reader needs from a file.

    Attributes:
        kind: ``"anndata"`` or ``"mudata"``.
        rna, protein: the two count matrices.
        gene_names, protein_names: object arrays of str.
        obs_groups: obs dataframe groups, searched in order for a column (MuData: global obs, then the
            RNA modality's obs).
        n_obs: number of cells.
        protein_panels: ``[P, T] bool`` from ``uns/streamtotal`` or one all-True panel.
        panel_code_node: obs column holding panel codes, or None (every cell panel 0).
    """

    kind: str
    rna: MatrixElement
    protein: MatrixElement
    gene_names: np.ndarray
    protein_names: np.ndarray
    obs_groups: list[Any]
    n_obs: int
    protein_panels: np.ndarray
    panel_code_node: Any = None


def attr_str(node, key: str, default: str = "") -> str:
    """Returns a string attribute (h5py may hand back bytes or numpy strings)."""
    value = node.attrs.get(key, default)
    return value.decode() if isinstance(value, bytes) else str(value)


def is_array(node) -> bool:
    """True for an h5py dataset or zarr array, False for a group."""
    return hasattr(node, "dtype") and hasattr(node, "shape")


def keys_of(node) -> list[str]:
    """Returns the child names of a group (empty for arrays)."""
    return [] if is_array(node) else sorted(node.keys())


def as_str_array(values) -> np.ndarray:
    """Returns values as an object array of python str (bytes decoded)."""
    return np.asarray(
        [v.decode() if isinstance(v, bytes) else str(v) for v in np.asarray(values, dtype=object)], dtype=object
    )


def dataframe_index(group) -> np.ndarray:
    """Returns the index of an AnnData dataframe group as str, reading only the index array."""
    key = attr_str(group, "_index", "_index")
    return as_str_array(np.asarray(group[key][...]))


def dataframe_columns(group) -> list[str]:
    """Returns the column names of an AnnData dataframe group, in order."""
    order = group.attrs.get("column-order", [])
    return [c.decode() if isinstance(c, bytes) else str(c) for c in np.atleast_1d(np.asarray(order, dtype=object))]


def matrix_element(node, path: str, where: str) -> MatrixElement:
    """Describes a count matrix node.

    Raises:
        StoreFormatError: CSC storage (rows cannot be read without reading everything) or an unknown
            encoding.
    """
    if is_array(node):
        if len(node.shape) != 2:
            raise StoreFormatError(
                f"{where}: {path} is a {len(node.shape)}-D array; a [cells, features] matrix is needed."
            )
        return MatrixElement("dense", path, node, (int(node.shape[0]), int(node.shape[1])))
    enc = attr_str(node, "encoding-type") or attr_str(node, "h5sparse_format")
    if enc in ("csr_matrix", "csr"):
        shape = tuple(int(s) for s in node.attrs.get("shape", node.attrs.get("h5sparse_shape")))
        return MatrixElement("csr", path, node, shape)
    if enc == "dataframe":
        cols = dataframe_columns(node)
        n = int(node[attr_str(node, "_index", "_index")].shape[0])
        return MatrixElement("dataframe", path, node, (n, len(cols)), cols)
    if enc in ("csc_matrix", "csc"):
        raise StoreFormatError(
            f"{where}: {path} is stored CSC (column-major), so cells cannot be read in blocks. Rewrite it "
            "as CSR first, e.g. adata.X = adata.X.tocsr(); adata.write_h5ad(...)."
        )
    raise StoreFormatError(f"{where}: {path} has unknown encoding {enc!r}; expected a dense array or CSR matrix.")


def _has(root, path: str) -> bool:
    node = root
    for part in path.split("/"):
        if is_array(node) or part not in node:
            return False
        node = node[part]
    return True


def _rna_element(root, rna_layer: str | None, where: str) -> MatrixElement:
    layers = keys_of(root["layers"]) if _has(root, "layers") else []
    if rna_layer is None:
        if not _has(root, "X"):
            raise StoreFormatError(
                f"{where}: no X matrix; layers are {layers}; pass rna_layer=<layer> to read counts from a layer."
            )
        return matrix_element(root["X"], "X", where)
    if rna_layer not in layers:
        raise StoreFormatError(f"{where}: rna_layer {rna_layer!r} not found under layers/; layers are {layers}.")
    return matrix_element(root["layers"][rna_layer], f"layers/{rna_layer}", where)


def is_mudata(root, rna_modality: str) -> bool:
    """True when the hierarchy is a MuData (``mod/<rna_modality>`` present or MuData encoding)."""
    return attr_str(root, "encoding-type") == "MuData" or _has(root, f"mod/{rna_modality}")


def resolve_layout(
    root,
    *,
    where: str,
    protein_key: str = "protein_expression",
    rna_layer: str | None = None,
    rna_modality: str = "rna",
    protein_modality: str = "prot",
    protein_names=None,
) -> ResolvedLayout:
    """Resolves the elements of an AnnData or MuData hierarchy.

    Args:
        root: opened h5py file/group or zarr group.
        where: file or study named in messages.
        protein_key: AnnData: key of the protein matrix under ``obsm``.
        rna_layer: read RNA counts from ``layers/<rna_layer>`` instead of ``X``.
        rna_modality, protein_modality: MuData modality names.
        protein_names: explicit protein names (AnnData with an array in obsm and no uns names).

    Returns:
        The resolved layout.

    Raises:
        StoreFormatError: missing protein matrix (listing what exists), CSC matrices, shapes that do not
            agree, modalities not aligned cell for cell, or protein names that cannot be found.
    """
    if is_mudata(root, rna_modality):
        layout = _resolve_mudata(root, where, rna_layer, rna_modality, protein_modality)
    else:
        layout = _resolve_anndata(root, where, protein_key, rna_layer, protein_names)
    _check_shapes(layout, where)
    _attach_panels(layout, root, where)
    return layout


def _resolve_anndata(root, where, protein_key, rna_layer, protein_names) -> ResolvedLayout:
    if not _has(root, "obs") or not _has(root, "var"):
        raise StoreFormatError(f"{where}: not an AnnData store (top-level keys: {keys_of(root)}).")
    rna = _rna_element(root, rna_layer, where)
    obsm_keys = keys_of(root["obsm"]) if _has(root, "obsm") else []
    if protein_key not in obsm_keys:
        raise StoreFormatError(
            f"{where}: no protein matrix at obsm/{protein_key}. obsm holds {obsm_keys}; uns holds "
            f"{keys_of(root['uns']) if _has(root, 'uns') else []}. Pass protein_key=<one of the obsm keys> "
            "(CLI: --protein-key), or for a MuData file check the modality names."
        )
    protein = matrix_element(root["obsm"][protein_key], f"obsm/{protein_key}", where)
    if protein_names is not None:
        names = as_str_array(protein_names)
    elif protein.kind == "dataframe":
        names = as_str_array(protein.columns)
    elif _has(root, f"uns/{PROTEIN_NAMES_UNS_KEY}"):
        names = as_str_array(np.asarray(root["uns"][PROTEIN_NAMES_UNS_KEY][...]))
    else:
        raise StoreFormatError(
            f"{where}: obsm/{protein_key} is a plain array and uns/{PROTEIN_NAMES_UNS_KEY} is missing, so the "
            "protein names are unknown. Store them in uns['protein_names'] or pass protein_names=[...]."
        )
    return ResolvedLayout(
        kind="anndata", rna=rna, protein=protein, gene_names=dataframe_index(root["var"]),
        protein_names=names, obs_groups=[root["obs"]], n_obs=len(dataframe_index(root["obs"])),
        protein_panels=np.ones((1, len(names)), dtype=bool),
    )


def _resolve_mudata(root, where, rna_layer, rna_modality, protein_modality) -> ResolvedLayout:
    mods = keys_of(root["mod"]) if _has(root, "mod") else []
    for mod in (rna_modality, protein_modality):
        if mod not in mods:
            raise StoreFormatError(
                f"{where}: MuData has no modality {mod!r}; modalities are {mods}. Pass "
                "rna_modality=... / protein_modality=... (CLI: --rna-modality / --protein-modality)."
            )
    rna_root, prot_root = root["mod"][rna_modality], root["mod"][protein_modality]
    rna = _rna_element(rna_root, rna_layer, f"{where} (mod/{rna_modality})")
    rna.path = f"mod/{rna_modality}/{rna.path}"
    protein = matrix_element(prot_root["X"], f"mod/{protein_modality}/X", where)
    n_obs = len(dataframe_index(root["obs"])) if _has(root, "obs") else rna.shape[0]
    for mod in (rna_modality, protein_modality):
        if _has(root, f"obsmap/{mod}"):
            obsmap = np.asarray(root["obsmap"][mod][...])
            # MuData's obsmap is 1-based with 0 = cell absent from the modality.
            if obsmap.shape[0] != n_obs or not np.array_equal(obsmap, np.arange(1, n_obs + 1)):
                raise StoreFormatError(
                    f"{where}: modality {mod!r} is not aligned cell for cell with the MuData obs (obsmap is "
                    "not the identity). Subset both modalities to the shared cells in the same order, e.g. "
                    "mu.pp.intersect_obs(mdata), and write the file again."
                )
    obs_groups = ([root["obs"]] if _has(root, "obs") else []) + [rna_root["obs"]]
    return ResolvedLayout(
        kind="mudata", rna=rna, protein=protein, gene_names=dataframe_index(rna_root["var"]),
        protein_names=dataframe_index(prot_root["var"]), obs_groups=obs_groups, n_obs=n_obs,
        protein_panels=np.ones((1, protein.shape[1]), dtype=bool),
    )


def _check_shapes(layout: ResolvedLayout, where: str) -> None:
    pairs = ((layout.rna, layout.gene_names, "gene"), (layout.protein, layout.protein_names, "protein"))
    for elem, names, what in pairs:
        if elem.shape[0] != layout.n_obs:
            raise StoreFormatError(f"{where}: {elem.path} has {elem.shape[0]} rows but obs has {layout.n_obs} cells.")
        if elem.shape[1] != len(names):
            raise StoreFormatError(
                f"{where}: {elem.path} has {elem.shape[1]} columns but there are {len(names)} {what} names."
            )


def _attach_panels(layout: ResolvedLayout, root, where: str) -> None:
    if not _has(root, f"uns/{META_UNS_KEY}"):
        return
    meta = read_elem(root["uns"][META_UNS_KEY])
    panels = np.asarray(meta.get("protein_panels", layout.protein_panels), dtype=bool)
    if panels.ndim != 2 or panels.shape[1] != len(layout.protein_names):
        raise StoreFormatError(
            f"{where}: uns/{META_UNS_KEY}/protein_panels has shape {panels.shape}; "
            f"expected [P, {len(layout.protein_names)}]."
        )
    layout.protein_panels = panels
    for group in layout.obs_groups:
        if PANEL_OBS_COLUMN in dataframe_columns(group):
            layout.panel_code_node = group[PANEL_OBS_COLUMN]
            return


def find_obs_column(layout: ResolvedLayout, key: str, where: str):
    """Returns the node of obs column ``key``.

    Raises:
        StoreFormatError: no such column (the message lists the columns that exist).
    """
    for group in layout.obs_groups:
        if key in dataframe_columns(group):
            return group[key]
    raise StoreFormatError(f"{where}: no obs column {key!r}; columns are {obs_column_names(layout)}.")


def obs_column_names(layout: ResolvedLayout) -> list[str]:
    """Returns all obs column names (first occurrence wins), without the internal panel column."""
    names: list[str] = []
    for group in layout.obs_groups:
        names += [c for c in dataframe_columns(group) if c not in names and c != PANEL_OBS_COLUMN]
    return names


def obs_values(node) -> np.ndarray:
    """Reads one obs column as a numpy array: strings/categoricals as object arrays of str with missing
    values as ``""`` (so ``np.unique`` works), numbers as numbers (missing integers become NaN floats)."""
    values = read_elem(node)
    if isinstance(getattr(values, "dtype", None), pd.CategoricalDtype):
        cat = pd.Categorical(values)
        out = np.asarray(cat.categories.astype(str), dtype=object).take(cat.codes)
        out[cat.codes < 0] = ""
        return out
    if isinstance(values, pd.api.extensions.ExtensionArray):
        if values.dtype.kind in "iuf":
            return values.to_numpy(dtype=np.float64, na_value=np.nan)
        if values.dtype.kind == "b":
            return values.to_numpy(dtype=object, na_value=None)
        return np.asarray(values.to_numpy(dtype=object, na_value=""), dtype=object)
    arr = np.asarray(values)
    if arr.dtype.kind in "OSUT":
        return as_str_array(arr)
    return arr
