"""``ingest``: converts an h5ad, h5mu or 10x ``.h5`` file into a streamtotal store, block by block.

Every block is validated (NaN, infinite, negative and, unless allowed, non-integer counts are refused
with the file, cell and column named) before it is written; the store only appears at the target
once everything succeeded.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
from anndata.utils import make_index_unique
from tqdm.auto import tqdm

from loaders.count_validation import validate_counts
from loaders.errors import StoreFormatError
from loaders.ingest.block_reader import BlockReader
from loaders.ingest.h5ad_reader import H5adReader
from loaders.ingest.h5mu_reader import H5muReader
from loaders.ingest.ingest_report import IngestReport, build_report
from loaders.ingest.tenx_h5_reader import TenxH5Reader
from loaders.store_layout import PANEL_OBS_COLUMN, StoreLayoutConfig
from loaders.store_writer import ZarrStoreWriter

INPUT_FORMATS = ("h5ad", "h5mu", "10x_h5")
"""Input formats ``ingest`` reads; ``"auto"`` picks one from the file."""

DEFAULT_BLOCK_CELLS = 8192
"""Cells read, validated and written per block: bounds ingest memory to a few blocks of counts."""


def detect_format(path: str | os.PathLike) -> str:
    """Returns the input format of ``path`` from its contents (extension as a tie-breaker).

    Raises:
        StoreFormatError: missing file, not HDF5, or a layout none of the readers knows.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise StoreFormatError(f"{path}: input file not found.")
    if os.path.isdir(path):
        raise StoreFormatError(
            f"{path}: is a directory; ingest reads h5ad, h5mu and 10x .h5 files. A zarr store can be "
            "read directly with ZarrSource."
        )
    try:
        with h5py.File(path, "r") as f:
            keys = set(f.keys())
            encoding = f.attrs.get("encoding-type", b"")
            encoding = encoding.decode() if isinstance(encoding, bytes) else str(encoding)
    except OSError as err:
        raise StoreFormatError(f"{path}: not an HDF5 file ({err}); ingest reads h5ad, h5mu and 10x .h5.") from err
    if "matrix" in keys and "obs" not in keys:
        return "10x_h5"
    if encoding == "MuData" or "mod" in keys or path.endswith(".h5mu"):
        return "h5mu"
    if "obs" in keys:
        return "h5ad"
    raise StoreFormatError(
        f"{path}: unknown layout (top-level keys {sorted(keys)}); expected AnnData (obs, X), MuData (mod) "
        "or a 10x matrix (matrix)."
    )


def open_reader(
    path: str | os.PathLike,
    input_format: str = "auto",
    *,
    protein_key: str = "protein_expression",
    rna_layer: str | None = None,
    rna_modality: str = "rna",
    protein_modality: str = "prot",
    protein_names=None,
    gene_name_field: str = "name",
) -> BlockReader:
    """Opens ``path`` with the reader of its format (see ``ingest`` for the arguments).

    Raises:
        StoreFormatError: unknown format, or what the reader raises.
    """
    fmt = detect_format(path) if input_format == "auto" else input_format
    if fmt == "h5ad":
        return H5adReader(path, protein_key=protein_key, rna_layer=rna_layer, protein_names=protein_names)
    if fmt == "h5mu":
        return H5muReader(path, rna_layer=rna_layer, rna_modality=rna_modality, protein_modality=protein_modality)
    if fmt == "10x_h5":
        return TenxH5Reader(path, gene_name_field=gene_name_field)
    raise StoreFormatError(f"{path}: unknown input_format {fmt!r}; choose one of {('auto', *INPUT_FORMATS)}.")


def ingest(
    input_path: str | os.PathLike,
    out_path: str | os.PathLike,
    *,
    input_format: str = "auto",
    protein_key: str = "protein_expression",
    rna_layer: str | None = None,
    rna_modality: str = "rna",
    protein_modality: str = "prot",
    protein_names=None,
    gene_name_field: str = "name",
    batch_key: str | None = None,
    block_cells: int = DEFAULT_BLOCK_CELLS,
    allow_non_integer: bool = False,
    make_names_unique: bool = False,
    overwrite: bool = False,
    layout: StoreLayoutConfig = StoreLayoutConfig(),
    progress: bool = True,
) -> IngestReport:
    """Converts one input file into a streamtotal zarr store (see ``store_layout``).

    Args:
        input_path: h5ad, h5mu or 10x feature-barcode ``.h5`` file.
        out_path: store directory to create (conventionally ``*.zarr``).
        input_format: ``"auto"`` (from the file's contents) or one of ``INPUT_FORMATS``.
        protein_key: h5ad: key of the protein matrix under ``obsm``.
        rna_layer: h5ad/h5mu: take RNA counts from ``layers/<rna_layer>`` (e.g. ``"counts"``).
        rna_modality, protein_modality: h5mu: modality names.
        protein_names: h5ad: protein names when the file does not record them.
        gene_name_field: 10x: ``"name"`` (symbols) or ``"id"`` (Ensembl ids).
        batch_key: obs column by which protein panels are detected (a protein all zero within a batch
            is marked not measured there) and batches are reported.
        block_cells: cells per read/validate/write block (memory bound).
        allow_non_integer: accept non-integer counts (e.g. ambient-corrected); NaN, infinite and
            negative values are refused regardless.
        make_names_unique: append ``-1``, ``-2``, ... to repeated gene/protein names instead of failing.
        overwrite: replace an existing store at ``out_path``.
        layout: chunking and codec of the store.
        progress: show a progress bar.

    Returns:
        An ``IngestReport`` (print it).

    Raises:
        StoreFormatError: unreadable input, missing protein matrix or batch column, duplicate names,
            empty input.
        InvalidCountsError: NaN, infinite, negative or (unless allowed) non-integer counts.
        StoreExistsError: ``out_path`` exists and ``overwrite`` is False.
    """
    if block_cells < 1:
        raise ValueError(f"block_cells must be >= 1, got {block_cells}")
    t0 = time.perf_counter()
    input_path, out_path = os.fspath(input_path), os.fspath(out_path)
    reader = open_reader(
        input_path, input_format, protein_key=protein_key, rna_layer=rna_layer, rna_modality=rna_modality,
        protein_modality=protein_modality, protein_names=protein_names, gene_name_field=gene_name_field,
    )
    try:
        return _ingest_open(
            reader, out_path, t0, batch_key=batch_key, block_cells=block_cells,
            allow_non_integer=allow_non_integer, make_names_unique=make_names_unique, overwrite=overwrite,
            layout=layout, progress=progress,
        )
    finally:
        reader.close()


def checked_input(reader: BlockReader, *, batch_key: str | None, make_names_unique: bool,
                  addressed_by: str) -> tuple[np.ndarray, np.ndarray, pd.DataFrame, list[str]]:
    """The checks every ingest runs before writing: cells present, obs matching the matrices, the batch key in
    obs; names made unique on request; duplicate cell names noted.

    Args:
        reader: the open input.
        batch_key: obs column used for protein panels, or None.
        make_names_unique: suffix repeated gene / protein names instead of refusing them later.
        addressed_by: how the output addresses cells (for the duplicate-names note).

    Returns:
        ``(gene_names, protein_names, obs, notes)``.

    Raises:
        StoreFormatError: no cells, obs of another length, or an unknown batch key (naming the file).
    """
    path = reader.path
    if reader.n_obs == 0:
        raise StoreFormatError(f"{path}: the input holds no cells.")
    genes, proteins = reader.gene_names, reader.protein_names
    if make_names_unique:
        genes = np.asarray(make_index_unique(pd.Index(genes, dtype=object)), dtype=object)
        proteins = np.asarray(make_index_unique(pd.Index(proteins, dtype=object)), dtype=object)
    obs = reader.obs()
    if len(obs) != reader.n_obs:
        raise StoreFormatError(f"{path}: obs has {len(obs)} rows but the matrices have {reader.n_obs} cells.")
    if batch_key is not None and batch_key not in obs.columns:
        raise StoreFormatError(
            f"{path}: batch_key {batch_key!r} is not an obs column; columns are {list(obs.columns)}."
        )
    notes = list(reader.notes)
    if not obs.index.is_unique:
        notes.append(f"{int(obs.index.duplicated().sum())} duplicate cell names (cells are addressed by "
                     f"{addressed_by})")
    return genes, proteins, obs, notes


def _ingest_open(reader: BlockReader, out_path: str, t0: float, *, batch_key, block_cells, allow_non_integer,
                 make_names_unique, overwrite, layout, progress) -> IngestReport:
    path = reader.path
    genes, proteins, obs, notes = checked_input(reader, batch_key=batch_key, make_names_unique=make_names_unique,
                                                addressed_by="index")
    cell_names = obs.index.to_numpy()
    study = Path(path).name
    writer = ZarrStoreWriter(
        out_path, genes, proteins, layout=layout, panel_key=batch_key, source_file=path, overwrite=overwrite,
        integer_counts=not allow_non_integer,  # validated below, block by block
    )
    try:
        bar = tqdm(total=reader.n_obs, unit="cells", desc=f"ingest {study}", disable=not progress)
        with bar:
            for start, rna, protein in reader.blocks(block_cells):
                stop = start + rna.shape[0]
                for block, modality, names in ((rna, "rna", genes), (protein, "protein", proteins)):
                    validate_counts(
                        block, study=study, modality=modality, cell_names=cell_names[start:stop],
                        feature_names=names, row_offset=start, require_integer=not allow_non_integer,
                        source_path=path,
                    )
                writer.append(rna, protein, obs.iloc[start:stop])
                bar.update(stop - start)
        writer.close()
    except BaseException:
        writer.abort()
        raise
    return build_report(reader, output_path=out_path, genes=genes, proteins=proteins, obs=obs, batch_key=batch_key,
                        panels=writer.panels, skip_columns={PANEL_OBS_COLUMN}, started=t0, notes=notes)
