"""``ingest``: converts an h5ad, h5mu or 10x ``.h5`` file into a streamtotal store, block by block.

Every block is validated (NaN, infinite, negative and, unless allowed, non-integer counts are refused
with the file, cell and column named) before it is written; the store only appears at the target
once everything succeeded.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Iterator

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
from loaders.ingest.ingest_options import DEFAULT_BLOCK_CELLS, INPUT_FORMATS, IngestOptions
from loaders.ingest.ingest_report import IngestReport, build_report
from loaders.ingest.tenx_h5_reader import TenxH5Reader
from loaders.store_layout import PANEL_OBS_COLUMN, StoreLayoutConfig
from loaders.store_writer import ZarrStoreWriter

__all__ = ["DEFAULT_BLOCK_CELLS", "INPUT_FORMATS", "IngestOptions", "checked_input", "detect_format", "ingest",
           "open_input", "open_reader", "validated_blocks"]


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


def open_input(path: str | os.PathLike, options: IngestOptions) -> BlockReader:
    """Opens ``path`` with the reader of its format, as ``options`` say (``open_reader``)."""
    return open_reader(
        path, options.input_format, protein_key=options.protein_key, rna_layer=options.rna_layer,
        rna_modality=options.rna_modality, protein_modality=options.protein_modality,
        protein_names=options.protein_names, gene_name_field=options.gene_name_field,
    )


def ingest(
    input_path: str | os.PathLike,
    out_path: str | os.PathLike,
    options: IngestOptions | None = None,
    *,
    layout: StoreLayoutConfig | None = None,
    **option_overrides,
) -> IngestReport:
    """Converts one input file into a streamtotal zarr store (see ``store_layout``).

    Args:
        input_path: h5ad, h5mu or 10x feature-barcode ``.h5`` file.
        out_path: store directory to create (conventionally ``*.zarr``).
        options: how the input is read, checked and written (``IngestOptions``; default: its defaults).
        layout: chunking and codec of the store; None = ``StoreLayoutConfig.for_destination(out_path)`` (64 cells
            per chunk on local disk, 1,024 on object storage, where each chunk is one request).
        **option_overrides: any ``IngestOptions`` field by name (``batch_key="batch", block_cells=4096``),
            replacing that field of ``options``.

    Returns:
        An ``IngestReport`` (print it).

    Raises:
        StoreFormatError: unreadable input, missing protein matrix or batch column, duplicate names,
            empty input.
        InvalidCountsError: NaN, infinite, negative or (unless allowed) non-integer counts.
        StoreExistsError: ``out_path`` exists and ``overwrite`` is False.
        TypeError: an override that is no ``IngestOptions`` field.
        ValueError: ``block_cells`` below 1.
    """
    options = IngestOptions.resolve(options, option_overrides, caller="ingest")
    t0 = time.perf_counter()
    reader = open_input(os.fspath(input_path), options)
    try:
        if layout is None:
            layout = StoreLayoutConfig.for_destination(out_path)
        return _ingest_open(reader, os.fspath(out_path), t0, options, layout)
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


def validated_blocks(reader: BlockReader, options: IngestOptions, *, study: str, genes: np.ndarray,
                     proteins: np.ndarray, cell_names: np.ndarray) -> Iterator[tuple[int, int, object, object]]:
    """The input's blocks, each validated before it is yielded, with a progress bar (``options.progress``).

    Args:
        reader: the open input.
        options: ``block_cells``, ``allow_non_integer`` and ``progress`` are used.
        study: the study named in messages and on the progress bar.
        genes, proteins: the (checked) feature names, for messages.
        cell_names: ``[n_obs]`` cell names, for messages.

    Yields:
        ``(start, stop, rna, protein)``: cells ``[start, stop)``.

    Raises:
        InvalidCountsError: NaN, infinite, negative or (unless allowed) non-integer counts (names the file, cell
            and column).
    """
    with tqdm(total=reader.n_obs, unit="cells", desc=f"ingest {study}", disable=not options.progress) as bar:
        for start, rna, protein in reader.blocks(options.block_cells):
            stop = start + rna.shape[0]
            for block, modality, names in ((rna, "rna", genes), (protein, "protein", proteins)):
                validate_counts(
                    block, study=study, modality=modality, cell_names=cell_names[start:stop],
                    feature_names=names, row_offset=start, require_integer=not options.allow_non_integer,
                    source_path=reader.path,
                )
            yield start, stop, rna, protein
            bar.update(stop - start)


def _ingest_open(reader: BlockReader, out_path: str, t0: float, options: IngestOptions,
                 layout: StoreLayoutConfig) -> IngestReport:
    path = reader.path
    genes, proteins, obs, notes = checked_input(reader, batch_key=options.batch_key,
                                                make_names_unique=options.make_names_unique, addressed_by="index")
    writer = ZarrStoreWriter(
        out_path, genes, proteins, layout=layout, panel_key=options.batch_key, source_file=path,
        overwrite=options.overwrite,
        integer_counts=not options.allow_non_integer,  # validated block by block
    )
    with writer:  # aborts on any error: no half-written store
        blocks = validated_blocks(reader, options, study=Path(path).name, genes=genes, proteins=proteins,
                                  cell_names=obs.index.to_numpy())
        for start, stop, rna, protein in blocks:
            writer.append(rna, protein, obs.iloc[start:stop])
    return build_report(reader, output_path=out_path, genes=genes, proteins=proteins, obs=obs,
                        batch_key=options.batch_key, panels=writer.panels, skip_columns={PANEL_OBS_COLUMN},
                        started=t0, notes=notes)
