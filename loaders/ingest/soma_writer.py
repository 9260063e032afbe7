"""``SomaExperimentWriter``: writes one study into a new or an existing TileDB-SOMA Experiment, block by block.

``tiledbsoma.io.from_anndata`` needs the whole AnnData in memory and writes one measurement per call,
so the arrays are written here with SOMA's own APIs: every block of cells becomes one fragment of each
measurement's X; obs is written once, last.

A new Experiment is built at a temporary path beside the target and renamed into place when complete
(local paths only). Appending cannot be atomic: SOMA has no transaction across arrays. The order of
writes makes an interrupted append harmless and repairable:

1. new genes/proteins are added to the var DataFrames (their names are looked up, not duplicated, when
   the append is run again; until then they read as all-zero columns of the existing cells);
2. X arrays are resized and the new cells' rows are written at soma_joinids after the existing obs;
3. the metadata document gets the new panels and the study entry;
4. obs rows are written, in one fragment, last.

obs is the ledger: a Source only sees cells that obs lists, so X rows of an interrupted append are
invisible, and the next append deletes them (and drops study entries past obs) before writing.
"""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import scipy.sparse as sp
import tiledbsoma

from loaders.atomic_files import replace_directory, temporary_sibling
from loaders.errors import StoreExistsError, StoreFormatError
from loaders.ingest.soma_append import inspect_append_target, prepare_append
from loaders.protein_panels import PanelAssignment, ProteinPanelDetector
from loaders.soma_layout import (
    DEFAULT_PROTEIN_MEASUREMENT,
    DEFAULT_RNA_MEASUREMENT,
    DEFAULT_X_LAYER,
    METADATA_KEY,
    OBS_ID_COLUMN,
    STUDY_OBS_COLUMN,
    VAR_ID_COLUMN,
    SomaLayoutConfig,
    SomaMetadata,
)
from loaders.soma_obs import obs_to_arrow
from loaders.soma_source import JOINID, soma_context
from loaders.stale_temporaries import hold_writer_lock
from loaders.store_layout import PANEL_OBS_COLUMN
from loaders.store_writer import check_unique_names
from loaders.writer_lifecycle import StagedWriter

_WRITE_IN_ORDER = {"tiledb": {"write": {"sort_coords": False}}}
"""Blocks are written in TileDB's global order (row-major by cell), so TileDB need not sort them."""


def is_local_uri(uri: str) -> bool:
    """True for a plain path or ``file://`` URI."""
    return "://" not in uri or uri.startswith("file://")


class SomaExperimentWriter(StagedWriter):
    """Writes one study (cells in blocks) into a new Experiment or appends it to an existing one.

    Use as a context manager (an exception inside the ``with`` aborts) or call ``close``/``abort``
    (``writer_lifecycle.StagedWriter``).
    """

    def __init__(
        self,
        uri: str | os.PathLike,
        gene_names,
        protein_names,
        obs: pd.DataFrame,
        *,
        study_name: str,
        append: bool = False,
        overwrite: bool = False,
        panel_key: str | None = None,
        source_file: str | None = None,
        drop_new_obs_columns: bool = False,
        layout: SomaLayoutConfig = SomaLayoutConfig(),
        context: dict | tiledbsoma.SOMATileDBContext | None = None,
        rna_measurement: str = DEFAULT_RNA_MEASUREMENT,
        protein_measurement: str = DEFAULT_PROTEIN_MEASUREMENT,
        x_layer: str = DEFAULT_X_LAYER,
    ) -> None:
        """Args:
            uri: Experiment to create (local path) or, with ``append``, an existing Experiment.
            gene_names, protein_names: unique names, the column order of every block.
            obs: the study's obs (index = cell names), one row per cell to be appended, in order.
            study_name: written to obs ``_study`` for every cell; must be new to the Experiment.
            append: add the study to the existing Experiment at ``uri``.
            overwrite: replace an existing Experiment (not with ``append``).
            panel_key: obs column by which protein panels are detected (None: all cells, all proteins).
            source_file: recorded in the metadata's study entry.
            drop_new_obs_columns: on append, leave out obs columns the Experiment lacks instead of refusing.
            layout: tiling and compression of the X arrays of a new Experiment.
            context: TileDB config dict or ``SOMATileDBContext``.
            rna_measurement, protein_measurement, x_layer: names in the Experiment.

        Raises:
            StoreExistsError: ``uri`` exists, without ``append`` or ``overwrite``.
            StoreFormatError: duplicate names; a remote URI for a new Experiment; on append, an
                Experiment not written by streamtotal, other measurement names, a study name already
                there, obs columns of the wrong type or unknown to the Experiment.
        """
        self.uri = os.fspath(uri)
        self._where = source_file or self.uri
        self.gene_names = check_unique_names(gene_names, what="gene", where=self._where)
        self.protein_names = check_unique_names(protein_names, what="protein", where=self._where)
        self._names = (rna_measurement, protein_measurement, x_layer)
        self._study, self._panel_key, self._source_file = str(study_name), panel_key, source_file or ""
        self._layout, self._context = layout, soma_context(context)
        self._obs = obs
        self._n_new = len(obs)
        if panel_key is not None and panel_key not in obs.columns:
            raise StoreFormatError(
                f"{self._where}: panel key {panel_key!r} is not an obs column; columns are {list(obs.columns)}."
            )
        self._detector = ProteinPanelDetector(len(self.protein_names)) if panel_key is not None else None
        self.panels: PanelAssignment | None = None
        self._append = append
        self._written = 0
        if append:
            self._tmp = None
            self._target = self.uri
            self._open_existing(drop_new_obs_columns)
        else:
            self._create_fresh(overwrite)

    @property
    def first_joinid(self) -> int:
        """soma_joinid of this study's first cell."""
        return self._n_old

    @property
    def new_genes(self) -> list[str]:
        """Genes this study added to the Experiment's RNA var (all of them for a new Experiment: none)."""
        return list(self._new_genes)

    @property
    def new_proteins(self) -> list[str]:
        """Proteins this study added to the protein var."""
        return list(self._new_proteins)

    # ---------------------------------------------------------------- setup

    def _create_fresh(self, overwrite: bool) -> None:
        if not is_local_uri(self.uri):
            raise StoreFormatError(
                f"{self.uri}: new Experiments are written to local paths (built beside the target and renamed "
                "into place when complete); write locally, then upload (e.g. aws s3 sync)."
            )
        path = Path(self.uri.removeprefix("file://"))
        if path.exists() and not overwrite:
            raise StoreExistsError(
                f"{path} already exists; pass append=True (CLI: --append) to add a study to it, overwrite=True "
                "(--overwrite) to replace it, or choose another output path."
            )
        self._path, self._overwrite = path, overwrite
        path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = temporary_sibling(path)
        self._target = str(self._tmp)
        self._n_old = 0
        self._old_meta = SomaMetadata(*self._names, protein_panels=np.ones((0, len(self.protein_names)), bool))
        self._gene_joinids = np.arange(len(self.gene_names), dtype=np.int64)
        self._protein_joinids = np.arange(len(self.protein_names), dtype=np.int64)
        self._n_genes_total, self._n_proteins_total = len(self.gene_names), len(self.protein_names)
        self._new_genes, self._new_proteins = [], []
        self._obs_arrow = obs_to_arrow(self._obs, self._where)
        self._obs_schema = None
        self._x: dict[str, tiledbsoma.SparseNDArray] = {}
        # Created and locked before TileDB writes into it: a live writer's temporary is never taken for stale.
        self._tmp.mkdir()
        self._lock = hold_writer_lock(self._tmp)
        try:
            self._create_experiment()
        except BaseException:
            self.abort()  # no writer reaches the caller to abort
            raise

    def _create_experiment(self) -> None:
        with tiledbsoma.Experiment.create(self._target, context=self._context) as exp:
            ms = exp.add_new_collection("ms")
            rna_name, prot_name, _ = self._names
            for ms_name, names in ((rna_name, self.gene_names), (prot_name, self.protein_names)):
                m = ms.add_new_collection(ms_name, tiledbsoma.Measurement)
                schema = pa.schema([(JOINID, pa.int64()), (VAR_ID_COLUMN, pa.large_string())])
                var = m.add_new_dataframe("var", schema=schema, domain=[(0, max(len(names), 1) - 1)])
                if len(names):
                    var.write(pa.table({JOINID: np.arange(len(names), dtype=np.int64), VAR_ID_COLUMN: list(names)}))
                m.add_new_collection("X")

    def _open_existing(self, drop_new_obs_columns: bool) -> None:
        t = inspect_append_target(
            self.uri, context=self._context, names=self._names, study=self._study, obs=self._obs,
            gene_names=self.gene_names, protein_names=self.protein_names,
            drop_new_obs_columns=drop_new_obs_columns, where=self._where,
        )
        self._n_old, self._old_meta, self._obs_schema, self._obs_arrow = t.n_old, t.meta, t.obs_schema, t.obs_arrow
        self._gene_joinids, self._protein_joinids = t.gene_joinids, t.protein_joinids
        self._new_genes, self._new_proteins = t.new_genes, t.new_proteins
        self._n_genes_total, self._n_proteins_total = t.n_genes_total, t.n_proteins_total
        prepare_append(self.uri, t, self._n_new, context=self._context, names=self._names)
        layer = self._names[2]
        self._exp = tiledbsoma.Experiment.open(self.uri, "w", context=self._context)
        self._x = {n: self._exp.ms[n].X[layer] for n in self._names[:2]}

    def _create_x(self, mean_nnz: float, mean_prot_nnz: float) -> None:
        rna_name, prot_name, layer = self._names
        self._exp = tiledbsoma.Experiment.open(self._target, "w", context=self._context)
        sizes = ((rna_name, self._n_genes_total, mean_nnz), (prot_name, self._n_proteins_total, mean_prot_nnz))
        for ms_name, n_var, nnz in sizes:
            self._x[ms_name] = self._exp.ms[ms_name].X.add_new_sparse_ndarray(
                layer, type=pa.float32(), shape=(max(self._n_new, 1), max(n_var, 1)),
                platform_config=self._layout.platform_config(nnz),
            )

    # ---------------------------------------------------------------- writing

    def append(self, rna_csr, protein) -> None:
        """Writes the next block of cells (rows ``n_written .. n_written + n`` of ``obs``).

        Args:
            rna_csr: ``[n, G]`` raw RNA counts (CSR preferred).
            protein: ``[n, T]`` raw protein counts (dense or sparse).

        Raises:
            StoreFormatError: shapes disagree with the names, or more cells than obs has rows.
        """
        self._check_open()
        rna = rna_csr if sp.issparse(rna_csr) and rna_csr.format == "csr" else sp.csr_matrix(rna_csr)
        prot = sp.csr_matrix(protein) if not sp.issparse(protein) else protein.tocsr()
        n = rna.shape[0]
        where = f"{self._where}, cells {self._written}..{self._written + n - 1}"
        if rna.shape[1] != len(self.gene_names) or prot.shape != (n, len(self.protein_names)):
            raise StoreFormatError(
                f"{where}: blocks of shape {rna.shape} and {prot.shape}; expected (n, {len(self.gene_names)}) "
                f"and ({n}, {len(self.protein_names)})."
            )
        if self._written + n > self._n_new:
            raise StoreFormatError(f"{where}: more cells than the {self._n_new} rows of obs.")
        if self._detector is not None:
            values = self._obs[self._panel_key].to_numpy()[self._written : self._written + n]
            self._detector.update(values, prot)
        if not self._x:
            self._create_x(rna.nnz / max(n, 1), prot.nnz / max(n, 1))
        rna_name, prot_name, _ = self._names
        first = self._n_old + self._written
        for ms_name, block, joinids in ((rna_name, rna, self._gene_joinids), (prot_name, prot, self._protein_joinids)):
            self._write_block(self._x[ms_name], block, joinids, first)
        self._written += n

    def _write_block(self, array, block: sp.csr_matrix, var_joinids: np.ndarray, first: int) -> None:
        block = block.copy()
        block.eliminate_zeros()
        cols = var_joinids[block.indices]
        rows = np.repeat(np.arange(block.shape[0], dtype=np.int64) + first, np.diff(block.indptr))
        order = np.lexsort((cols, rows))  # global order: by cell, then by var soma_joinid
        table = pa.Table.from_pydict({
            "soma_dim_0": rows[order], "soma_dim_1": cols[order],
            "soma_data": np.asarray(block.data, dtype=np.float32)[order],
        })
        if table.num_rows:
            array.write(table, platform_config=_WRITE_IN_ORDER)

    def close(self) -> str:
        """Writes panels, metadata and obs (last), and renames a new Experiment into place.

        Returns:
            The Experiment URI.

        Raises:
            StoreFormatError: fewer cells were written than obs has rows, or no cells at all.
            StoreExistsError: the target of a new Experiment appeared meanwhile.
        """
        self._close()
        return self.uri

    @property
    def description(self) -> str:
        """``SomaExperimentWriter for <uri>`` (``StagedWriter``)."""
        return f"SomaExperimentWriter for {self.uri}"

    def _finish(self) -> Path | None:
        if self._written != self._n_new or self._n_new == 0:
            raise StoreFormatError(f"{self._where}: {self._written} cells written for {self._n_new} rows of obs.")
        codes, meta = self._panels_and_metadata()
        self._exp.metadata[METADATA_KEY] = meta.to_json()
        self._write_obs(codes)
        self._exp.close()
        if self._tmp is None:
            return None  # appended in place
        self._move_into_place()
        return self._path

    def _panels_and_metadata(self) -> tuple[np.ndarray, SomaMetadata]:
        """Returns the new cells' panel codes and the metadata with panels over the union of proteins."""
        old = self._old_meta.protein_panels
        panels = np.zeros((old.shape[0], self._n_proteins_total), dtype=bool)
        panels[:, : old.shape[1]] = old
        if self._detector is not None:
            self.panels = self._detector.result()
            study_panels = self.panels.panels
            local_codes = self.panels.codes_for(self._obs[self._panel_key].to_numpy())
        else:
            study_panels = np.ones((1, len(self.protein_names)), dtype=bool)
            local_codes = np.zeros(self._n_new, dtype=np.int64)
        code_map = np.empty(len(study_panels), dtype=np.int64)
        rows = [row for row in panels]
        for p, local in enumerate(study_panels):
            full = np.zeros(self._n_proteins_total, dtype=bool)
            full[self._protein_joinids[local]] = True
            match = [i for i, row in enumerate(rows) if np.array_equal(row, full)]
            code_map[p] = match[0] if match else len(rows)
            if not match:
                rows.append(full)
        meta = self._old_meta
        meta.protein_panels = np.stack(rows)
        meta.studies = meta.studies + [{
            "name": self._study, "source_file": self._source_file, "first_joinid": int(self._n_old),
            "n_cells": int(self._n_new), "panel_key": self._panel_key or "",
            "n_genes": len(self.gene_names), "n_proteins": len(self.protein_names),
            # Which genes (RNA var soma_joinids) this study measured: a cell reads zero at the others, which must
            # not pass for a measured zero. "1"/"0" per joinid; later appends' new genes fall past the end.
            "genes_measured": _mask_string(self._gene_joinids, self._n_genes_total),
        }]
        return code_map[np.asarray(local_codes, dtype=np.int64)].astype(np.int16), meta

    def _write_obs(self, codes: np.ndarray) -> None:
        n_old, n = self._n_old, self._n_new
        columns = {JOINID: pa.array(np.arange(n_old, n_old + n, dtype=np.int64)),
                   OBS_ID_COLUMN: pa.array([str(i) for i in self._obs.index], type=pa.large_string())}
        if STUDY_OBS_COLUMN in self._obs_arrow or PANEL_OBS_COLUMN in self._obs_arrow:
            warnings.warn(
                f"obs columns {STUDY_OBS_COLUMN!r}/{PANEL_OBS_COLUMN!r} of the input are replaced by streamtotal's",
                stacklevel=2,
            )
        columns.update({k: v for k, v in self._obs_arrow.items() if k not in (STUDY_OBS_COLUMN, PANEL_OBS_COLUMN)})
        columns[STUDY_OBS_COLUMN] = pa.array([self._study] * n, type=pa.large_string())
        columns[PANEL_OBS_COLUMN] = pa.array(codes, type=pa.int16())
        if self._obs_schema is None:
            table = pa.table(columns)
            obs = self._exp.add_new_dataframe("obs", schema=table.schema, domain=[(0, n - 1)])
        else:
            schema = self._obs_schema
            for field in schema:
                if field.name not in columns:
                    columns[field.name] = pa.nulls(n, type=field.type)
            table = pa.table({f.name: columns[f.name].cast(f.type) for f in schema}, schema=pa.schema(list(schema)))
            obs = self._exp.obs
            obs.tiledbsoma_resize_soma_joinid_shape(n_old + n)
        obs.write(table)

    def _discard(self) -> None:
        """Deletes a new Experiment's temporary directory (``abort``). An aborted append leaves rows that obs does
        not list (invisible to Sources; removed by the next append)."""
        exp = getattr(self, "_exp", None)
        if exp is not None and not exp.closed:
            try:
                exp.close()
            except Exception:  # noqa: BLE001 - already failing; the temp dir is removed below
                pass
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)

    def _move_into_place(self) -> None:
        if self._path.exists() and not self._overwrite:
            raise StoreExistsError(f"{self._path} appeared while writing; pass overwrite=True to replace it.")
        replace_directory(self._tmp, self._path)


def _mask_string(joinids: np.ndarray, n_total: int) -> str:
    """``"1"`` at the given joinids, ``"0"`` elsewhere, over ``n_total`` var rows."""
    mask = np.zeros(n_total, dtype=bool)
    mask[np.asarray(joinids, dtype=np.int64)] = True
    return "".join("1" if v else "0" for v in mask)
