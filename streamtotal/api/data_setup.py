"""scvi-tools' data registration (``setup_anndata`` / ``setup_mudata``) for streamtotal's Python API.

A setup is a small JSON-able record (``DataSetup``) kept in the data object's ``uns`` under ``SETUP_UNS_KEY``,
as scvi-tools keeps its registry there. It says where the RNA counts, the protein counts, the batch and the
labels are; ``sources_for`` turns the data object and its setup into the Sources a ``Collection`` aligns. An
AnnData or MuData in memory becomes an ``ArraySource`` (no file is written); a backed AnnData streams from its
h5ad file. Bad input is refused here, at the boundary, with the key or cell at fault named.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np

from loaders.array_source import ArraySource
from loaders.count_validation import validate_counts
from loaders.errors import StoreFormatError
from loaders.protein_panels import ProteinPanelDetector
from streamtotal.errors import ConfigError

SETUP_UNS_KEY = "_streamtotal_setup"
"""``uns`` key of the setup record (a plain dict), as scvi-tools' ``_scvi_*`` keys."""

IN_MEMORY_STUDY = "adata"
"""Study name of an in-memory AnnData or MuData (its batch when no ``batch_key`` is set)."""


@dataclass(frozen=True)
class DataSetup:
    """Where a data object keeps what totalVI reads (scvi-tools' setup arguments)."""

    method: str
    """"setup_anndata" or "setup_mudata"."""
    protein_expression_obsm_key: str | None = None
    """AnnData: ``obsm`` key of the protein counts (array or DataFrame)."""
    protein_names_uns_key: str | None = None
    """AnnData: ``uns`` key of the protein names when ``obsm`` holds an array; None = the DataFrame's columns
    (or ``uns["protein_names"]``)."""
    layer: str | None = None
    """AnnData: layer of the RNA counts; None = ``X``."""
    rna_modality: str | None = None
    """MuData: modality of the RNA counts."""
    protein_modality: str | None = None
    """MuData: modality of the protein counts."""
    rna_layer: str | None = None
    """MuData: layer of the RNA modality holding counts; None = its ``X``."""
    protein_layer: str | None = None
    """MuData: layer of the protein modality holding counts; None = its ``X``."""
    batch_key: str | None = None
    """obs column of the batch covariate; None = one batch."""
    labels_key: str | None = None
    """obs column of cell-type labels; None = unlabelled."""
    unlabeled_category: str = "unlabeled"
    """Label value meaning "no label"."""
    override_missing_proteins: bool = False
    """True: a protein with all-zero counts in a batch is a true zero there; False (scvi-tools' default): it was
    not measured in that batch and is masked out of the likelihood."""

    def to_dict(self) -> dict[str, Any]:
        """The setup as a plain dict (what goes into ``uns``)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "DataSetup":
        """Reads a setup written by ``to_dict``.

        Raises:
            ConfigError: a key is not a setup field.
        """
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"uns[{SETUP_UNS_KEY!r}] holds unknown setup keys {unknown}; rerun setup_anndata")
        return cls(**{k: (None if isinstance(v, str) and v == "" and k != "unlabeled_category" else v)
                      for k, v in values.items()})


def is_mudata(data: Any) -> bool:
    """True for a MuData object (checked by class name, so that mudata stays an optional dependency)."""
    return any(cls.__name__ == "MuData" for cls in type(data).__mro__)


def is_anndata(data: Any) -> bool:
    """True for an AnnData object (in memory or backed)."""
    return any(cls.__name__ == "AnnData" for cls in type(data).__mro__) and not is_mudata(data)


def is_store_list(data: Any) -> bool:
    """True for a store path (str or path-like) or a non-empty list of them."""
    if isinstance(data, (str, os.PathLike)):
        return True
    return isinstance(data, (list, tuple)) and bool(data) and all(isinstance(d, (str, os.PathLike)) for d in data)


def record_setup(data: Any, setup: DataSetup) -> None:
    """Stores ``setup`` in ``data.uns`` as plain strings and booleans (None as "", which h5ad / Zarr can write)."""
    data.uns[SETUP_UNS_KEY] = {k: ("" if v is None else v) for k, v in setup.to_dict().items()}


def read_setup(data: Any) -> DataSetup:
    """The setup recorded on ``data`` by ``setup_anndata`` / ``setup_mudata``.

    Raises:
        ConfigError: the data was never set up.
    """
    record = getattr(data, "uns", {}).get(SETUP_UNS_KEY) if hasattr(data, "uns") else None
    if record is None:
        kind = "MuData" if is_mudata(data) else "AnnData"
        call = ("setup_mudata(mdata, ...)" if is_mudata(data)
                else "setup_anndata(adata, protein_expression_obsm_key=...)")
        raise ConfigError(f"this {kind} was not set up for streamtotal: call TOTALVI.{call} first")
    return DataSetup.from_dict(dict(record))


def _obs_column(obs, key: str | None, what: str, where: str) -> None:
    if key is not None and key not in obs.columns:
        raise ConfigError(f"{what} {key!r} is not a column of {where}.obs; its columns are {list(obs.columns)}")


def check_anndata(adata: Any, setup: DataSetup) -> None:
    """Refuses an AnnData the setup cannot read: a missing obsm / uns / layer key, an obs column that is not
    there, and counts that are not counts (NaN, negative or non-integer, e.g. normalised or log values).

    Raises:
        ConfigError: a key names nothing in ``adata``.
        InvalidCountsError: a value is not a count (the message names the cell and the gene or protein).
    """
    key = setup.protein_expression_obsm_key
    if key not in adata.obsm:
        raise ConfigError(f"protein_expression_obsm_key {key!r} is not in adata.obsm; its keys are "
                          f"{list(adata.obsm.keys())}")
    names_key = setup.protein_names_uns_key
    if names_key is not None and names_key not in adata.uns:
        raise ConfigError(f"protein_names_uns_key {names_key!r} is not in adata.uns; its keys are "
                          f"{sorted(k for k in adata.uns.keys() if k != SETUP_UNS_KEY)}")
    if setup.layer is not None and setup.layer not in adata.layers:
        raise ConfigError(f"layer {setup.layer!r} is not in adata.layers; its layers are {list(adata.layers.keys())}")
    _obs_column(adata.obs, setup.batch_key, "batch_key", "adata")
    _obs_column(adata.obs, setup.labels_key, "labels_key", "adata")
    if adata.isbacked:
        return  # a backed file's counts are checked on every read, as any store's
    rna = adata.X if setup.layer is None else adata.layers[setup.layer]
    protein = adata.obsm[key]
    protein = protein.to_numpy() if hasattr(protein, "to_numpy") else np.asarray(protein)
    protein_names = (list(adata.obsm[key].columns) if hasattr(adata.obsm[key], "columns")
                     else _uns_protein_names(adata, setup, protein.shape[1]))
    cells = np.asarray(adata.obs_names).astype(str)
    validate_counts(rna, study=IN_MEMORY_STUDY, modality="rna", cell_names=cells,
                    feature_names=np.asarray(adata.var_names).astype(str), source_path="adata.X"
                    if setup.layer is None else f"adata.layers[{setup.layer!r}]")
    validate_counts(protein, study=IN_MEMORY_STUDY, modality="protein", cell_names=cells,
                    feature_names=protein_names, source_path=f"adata.obsm[{key!r}]")


def _uns_protein_names(adata: Any, setup: DataSetup, n: int) -> list[str]:
    key = setup.protein_names_uns_key or "protein_names"
    if key not in adata.uns:
        raise ConfigError(f"adata.obsm[{setup.protein_expression_obsm_key!r}] is an array without column names: "
                          f"pass protein_names_uns_key naming the adata.uns entry with the {n} protein names, or "
                          "store the proteins as a DataFrame")
    names = [str(v) for v in np.asarray(adata.uns[key]).ravel()]
    if len(names) != n:
        raise ConfigError(f"adata.uns[{key!r}] holds {len(names)} protein names for {n} protein columns")
    return names


def mudata_modalities(mdata: Any, modalities: dict[str, str] | None) -> tuple[str, str]:
    """``(rna modality, protein modality)`` from scvi-tools' ``modalities`` dict (``rna_layer`` /
    ``protein_layer`` keys), or guessed from the usual names (``rna``; ``protein`` / ``prot`` / ``adt``).

    Raises:
        ConfigError: a named modality is not in ``mdata.mod``, or none can be guessed.
    """
    mods = list(mdata.mod.keys())
    modalities = dict(modalities or {})
    rna = modalities.get("rna_layer") or next((m for m in ("rna", "RNA", "gex") if m in mods), None)
    protein = modalities.get("protein_layer") or next((m for m in ("protein", "prot", "adt", "ADT") if m in mods),
                                                      None)
    for what, name in (("RNA", rna), ("protein", protein)):
        if name is None or name not in mods:
            raise ConfigError(f"the {what} modality {name!r} is not in mdata.mod (modalities {mods}); pass "
                              "modalities={'rna_layer': RNA_MODALITY, 'protein_layer': PROTEIN_MODALITY}")
    return rna, protein


def _mudata_obs(mdata: Any, rna_mod: str):
    """The obs columns a MuData offers: the global ``mdata.obs`` and those of the RNA modality (unprefixed)."""
    import pandas as pd

    merged = pd.DataFrame(index=mdata.mod[rna_mod].obs_names)
    for column in mdata.mod[rna_mod].obs.columns:
        merged[column] = mdata.mod[rna_mod].obs[column].to_numpy()
    if list(mdata.obs_names) == list(mdata.mod[rna_mod].obs_names):
        for column in mdata.obs.columns:
            merged[column] = mdata.obs[column].to_numpy()
    return merged


def check_mudata(mdata: Any, setup: DataSetup) -> None:
    """As ``check_anndata`` for a MuData: modalities, layers, obs columns, cells in the same order, counts.

    Raises:
        ConfigError: a modality, layer or column is missing, or the modalities list different cells.
        InvalidCountsError: a value is not a count.
    """
    rna_mod, prot_mod = mdata.mod[setup.rna_modality], mdata.mod[setup.protein_modality]
    if list(rna_mod.obs_names) != list(prot_mod.obs_names):
        raise ConfigError(f"mdata.mod[{setup.rna_modality!r}] and mdata.mod[{setup.protein_modality!r}] list "
                          "different cells (or another order); subset both to the same cells first "
                          "(e.g. mudata.pp.intersect_obs(mdata))")
    for what, mod, layer in (("rna_layer", rna_mod, setup.rna_layer), ("protein_layer", prot_mod,
                                                                        setup.protein_layer)):
        if layer is not None and layer not in mod.layers:
            raise ConfigError(f"{what} {layer!r} is not a layer of its modality; its layers are "
                              f"{list(mod.layers.keys())}")
    obs = _mudata_obs(mdata, setup.rna_modality)
    _obs_column(obs, setup.batch_key, "batch_key", "mdata")
    _obs_column(obs, setup.labels_key, "labels_key", "mdata")
    cells = np.asarray(rna_mod.obs_names).astype(str)
    validate_counts(_layer(rna_mod, setup.rna_layer), study=IN_MEMORY_STUDY, modality="rna", cell_names=cells,
                    feature_names=np.asarray(rna_mod.var_names).astype(str),
                    source_path=f"mdata.mod[{setup.rna_modality!r}]")
    validate_counts(_layer(prot_mod, setup.protein_layer), study=IN_MEMORY_STUDY, modality="protein",
                    cell_names=cells, feature_names=np.asarray(prot_mod.var_names).astype(str),
                    source_path=f"mdata.mod[{setup.protein_modality!r}]")


def _layer(adata: Any, layer: str | None):
    return adata.X if layer is None else adata.layers[layer]


def _panels(protein: np.ndarray, obs, setup: DataSetup) -> tuple[np.ndarray | None, np.ndarray | None]:
    """scvi-tools' missing-protein rule: a protein whose counts are all zero in a batch was not measured there.

    Returns:
        ``(panels, codes)`` for ``ArraySource``, or ``(None, None)`` for one full panel.
    """
    if setup.override_missing_proteins:
        return None, None
    groups = obs[setup.batch_key].to_numpy() if setup.batch_key else np.zeros(protein.shape[0], dtype=np.int64)
    detector = ProteinPanelDetector(protein.shape[1])
    detector.update(groups, protein)
    found = detector.result()
    if found.panels.shape[0] == 1 and found.panels.all():
        return None, None
    return found.panels, found.codes_for(groups).astype(np.int64)


def sources_for(data: Any, setup: DataSetup) -> list:
    """The Sources of a set-up AnnData or MuData: one in-memory study, or the backed AnnData's h5ad file.

    Raises:
        ConfigError: a backed AnnData with a ``layer`` (stream it as a store instead), or bad keys.
        StoreFormatError, InvalidCountsError: from the Source.
    """
    if is_mudata(data):
        rna_mod, prot_mod = data.mod[setup.rna_modality], data.mod[setup.protein_modality]
        obs = _mudata_obs(data, setup.rna_modality)
        protein = np.asarray(_dense(_layer(prot_mod, setup.protein_layer)), dtype=np.float32)
        panels, codes = _panels(protein, obs, setup)
        return [ArraySource(IN_MEMORY_STUDY, _layer(rna_mod, setup.rna_layer), protein,
                            np.asarray(rna_mod.var_names), np.asarray(prot_mod.var_names),
                            obs={str(c): obs[c].to_numpy() for c in obs.columns},
                            protein_panels=panels, protein_panel_codes=codes)]
    if data.isbacked:
        from loaders.h5ad_source import H5adSource

        if setup.layer is not None:
            raise ConfigError("a backed AnnData streams its X; layer= is not supported there (write the layer "
                              "as X, or load the AnnData into memory)")
        # A backed AnnData keeps obsm in memory (only X streams): detect its panels as for an in-memory one, so
        # both read the same data.
        panels, codes = _panels(np.asarray(_dense(data.obsm[setup.protein_expression_obsm_key]), dtype=np.float32),
                                data.obs, setup)
        return [H5adSource(str(data.filename), name=IN_MEMORY_STUDY, protein_key=setup.protein_expression_obsm_key,
                           protein_panels=panels, protein_panel_codes=codes)]
    protein = data.obsm[setup.protein_expression_obsm_key]
    names_key = setup.protein_names_uns_key or "protein_names"
    panels, codes = _panels(np.asarray(_dense(protein), dtype=np.float32), data.obs, setup)
    try:
        return [ArraySource.from_anndata(data, name=IN_MEMORY_STUDY, protein_key=setup.protein_expression_obsm_key,
                                         layer=setup.layer, protein_names_key=names_key, protein_panels=panels,
                                         protein_panel_codes=codes)]
    except StoreFormatError as err:
        raise ConfigError(str(err)) from err


def _dense(values: Any) -> np.ndarray:
    if hasattr(values, "toarray"):
        return values.toarray()
    return values.to_numpy() if hasattr(values, "to_numpy") else np.asarray(values)


def cell_names(data: Any, setup: DataSetup) -> np.ndarray:
    """The names of the cells of a set-up AnnData or MuData, in Source order."""
    if is_mudata(data):
        return np.asarray(data.mod[setup.rna_modality].obs_names).astype(str)
    return np.asarray(data.obs_names).astype(str)
