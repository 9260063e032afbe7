"""Appending a study to an existing TileDB-SOMA Experiment: the checks, name registration and resizing
that ``SomaExperimentWriter`` does before it writes the new cells (see its module for the write order).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import tiledbsoma

from loaders.errors import StoreFormatError
from loaders.soma_layout import METADATA_KEY, STUDY_OBS_COLUMN, VAR_ID_COLUMN, SomaMetadata
from loaders.soma_obs import arrow_column_values, obs_to_arrow
from loaders.soma_source import JOINID
from loaders.store_layout import PANEL_OBS_COLUMN


@dataclass
class AppendTarget:
    """What an append needs to know about the Experiment it writes into.

    Attributes:
        n_old: cells obs lists (the new cells' soma_joinids start here).
        meta: the metadata document, without study entries of interrupted appends.
        obs_schema: the Experiment's obs schema (the new study's obs is cast to it).
        obs_arrow: the new study's obs columns, cast to the schema.
        gene_joinids, protein_joinids: var soma_joinid of each of the study's genes / proteins.
        new_genes, new_proteins: names the study adds to the var.
        n_genes_total, n_proteins_total: var sizes after the append.
    """

    n_old: int
    meta: SomaMetadata
    obs_schema: pa.Schema
    obs_arrow: dict[str, pa.Array]
    gene_joinids: np.ndarray
    protein_joinids: np.ndarray
    new_genes: list[str]
    new_proteins: list[str]
    n_genes_total: int
    n_proteins_total: int
    x_shapes: dict[str, tuple[int, int]]
    x_last_rows: dict[str, int]


def inspect_append_target(
    uri: str, *, context, names: tuple[str, str, str], study: str, obs: pd.DataFrame, gene_names, protein_names,
    drop_new_obs_columns: bool, where: str,
) -> AppendTarget:
    """Checks that the study can be appended and works out its joinids; writes nothing.

    Raises:
        StoreFormatError: no Experiment; not written by our ingest; other measurement/layer names; the
            study name is taken; obs columns unknown to the Experiment (unless dropped) or not convertible.
    """
    rna_name, prot_name, layer = names
    try:
        exp = tiledbsoma.Experiment.open(uri, context=context)
    except (tiledbsoma.DoesNotExistError, tiledbsoma.SOMAError) as err:
        raise StoreFormatError(
            f"{uri}: no TileDB-SOMA Experiment to append to ({err}); run without append to create one."
        ) from err
    with exp:
        text = exp.metadata.get(METADATA_KEY)
        if text is None:
            raise StoreFormatError(
                f"{uri}: append needs an Experiment written by streamtotal's SOMA ingest (metadata "
                f"{METADATA_KEY!r} is missing: panels and studies would be unknown). Ingest into a new Experiment."
            )
        meta = SomaMetadata.from_json(text, uri)
        if (meta.rna_measurement, meta.protein_measurement, meta.x_layer) != names:
            raise StoreFormatError(
                f"{uri}: the Experiment uses measurements {meta.rna_measurement!r}/{meta.protein_measurement!r} "
                f"and layer {meta.x_layer!r}; the append asked for {rna_name!r}/{prot_name!r} and {layer!r}."
            )
        n_old = int(exp.obs.count)
        meta.studies = [s for s in meta.studies if int(s["first_joinid"]) < n_old]  # drop interrupted appends
        if study in [s["name"] for s in meta.studies]:
            raise StoreFormatError(
                f"{uri}: a study named {study!r} is already in the Experiment (studies: "
                f"{[s['name'] for s in meta.studies]}); pass another study_name."
            )
        obs_schema = exp.obs.schema
        gene_var, prot_var = _var_names(exp.ms[rna_name].var), _var_names(exp.ms[prot_name].var)
        x = {n: exp.ms[n].X[layer] for n in (rna_name, prot_name)}
        x_shapes = {n: tuple(int(v) for v in a.shape) for n, a in x.items()}
        x_last_rows = {n: (int(a.non_empty_domain()[0][1]) if a.nnz else -1) for n, a in x.items()}
    gene_joinids, new_genes, n_genes = _register(gene_var, gene_names)
    protein_joinids, new_proteins, n_proteins = _register(prot_var, protein_names)
    return AppendTarget(
        n_old=n_old, meta=meta, obs_schema=obs_schema,
        obs_arrow=_conform_obs(obs, obs_schema, drop_new_obs_columns, where),
        gene_joinids=gene_joinids, protein_joinids=protein_joinids, new_genes=new_genes, new_proteins=new_proteins,
        n_genes_total=n_genes, n_proteins_total=n_proteins, x_shapes=x_shapes, x_last_rows=x_last_rows,
    )


def prepare_append(uri: str, target: AppendTarget, n_new: int, *, context, names: tuple[str, str, str]) -> None:
    """Deletes X rows an interrupted append left past obs, adds the new names to the var DataFrames and
    grows the X arrays to hold the new cells and features."""
    rna_name, prot_name, layer = names
    stale = [n for n in (rna_name, prot_name) if target.x_last_rows[n] >= target.n_old]
    if stale:
        with tiledbsoma.Experiment.open(uri, "d", context=context) as exp:
            for ms_name in stale:
                exp.ms[ms_name].X[layer].delete_cells((slice(target.n_old, None),))
    n_total = target.n_old + n_new
    with tiledbsoma.Experiment.open(uri, "w", context=context) as exp:
        for ms_name, new, n_var in (
            (rna_name, target.new_genes, target.n_genes_total),
            (prot_name, target.new_proteins, target.n_proteins_total),
        ):
            ms = exp.ms[ms_name]
            if new:
                ms.var.tiledbsoma_resize_soma_joinid_shape(n_var)
                ms.var.write(pa.table({JOINID: np.arange(n_var - len(new), n_var, dtype=np.int64), VAR_ID_COLUMN: new}))
            shape = target.x_shapes[ms_name]
            if n_total > shape[0] or n_var > shape[1]:
                ms.X[layer].resize([max(n_total, shape[0]), max(n_var, shape[1])])


def _var_names(var) -> dict[str, int]:
    table = var.read(column_names=[JOINID, VAR_ID_COLUMN]).concat()
    names = arrow_column_values(table.column(VAR_ID_COLUMN))
    return {str(n): int(j) for n, j in zip(names, table.column(JOINID).to_numpy())}


def _register(existing: dict[str, int], names) -> tuple[np.ndarray, list[str], int]:
    """Returns each name's var soma_joinid (new names numbered after the largest), the new names, and
    the var size afterwards."""
    next_id = max(existing.values(), default=-1) + 1
    joinids, new = np.empty(len(names), np.int64), []
    for i, n in enumerate(names):
        if n in existing:
            joinids[i] = existing[n]
        else:
            joinids[i] = next_id + len(new)
            new.append(str(n))
    return joinids, new, next_id + len(new)


def _conform_obs(obs: pd.DataFrame, schema: pa.Schema, drop_new: bool, where: str) -> dict[str, pa.Array]:
    arrays = obs_to_arrow(obs, where)
    known = set(schema.names)
    extra = [c for c in arrays if c not in known and c not in (STUDY_OBS_COLUMN, PANEL_OBS_COLUMN)]
    if extra and not drop_new:
        raise StoreFormatError(
            f"{where}: obs columns {extra} are not in the Experiment's obs (columns "
            f"{[c for c in schema.names if c != JOINID]}); the obs schema is fixed by the first study. Rename "
            "them to existing columns, drop them, or pass drop_new_obs_columns=True (CLI: --drop-new-obs-columns)."
        )
    out = {}
    for name in (c for c in arrays if c not in extra and c in known):
        field = schema.field(name)
        try:
            out[name] = arrays[name].cast(field.type)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as err:
            raise StoreFormatError(
                f"{where}: obs column {name!r} holds {arrays[name].type} values that do not convert to the "
                f"Experiment's {field.type} ({err})."
            ) from err
    return out
