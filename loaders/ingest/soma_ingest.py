"""``ingest_soma``: converts an h5ad, h5mu or 10x ``.h5`` file into a TileDB-SOMA Experiment (RNA and
protein measurements, obs, var), or appends it as a further study to one, block by block.

Every block is validated (NaN, infinite, negative and, unless allowed, non-integer counts are refused
with the file, cell and column named) before it is written. See ``soma_writer`` for what a new
Experiment's atomicity and an interrupted append look like, and ``soma_layout`` for the layout.
"""

from __future__ import annotations

import os
import time

import tiledbsoma
from tqdm.auto import tqdm

from loaders.count_validation import validate_counts
from loaders.ingest.ingest_report import IngestReport, build_report
from loaders.ingest.ingest_store import DEFAULT_BLOCK_CELLS, checked_input, open_reader
from loaders.ingest.soma_writer import SomaExperimentWriter
from loaders.soma_layout import (
    DEFAULT_PROTEIN_MEASUREMENT,
    DEFAULT_RNA_MEASUREMENT,
    DEFAULT_X_LAYER,
    STUDY_OBS_COLUMN,
    SomaLayoutConfig,
)
from loaders.store_layout import PANEL_OBS_COLUMN
from loaders.zarr_source import study_name_from_path


def ingest_soma(
    input_path: str | os.PathLike,
    out_uri: str | os.PathLike,
    *,
    append: bool = False,
    study_name: str | None = None,
    batch_key: str | None = None,
    input_format: str = "auto",
    protein_key: str = "protein_expression",
    rna_layer: str | None = None,
    rna_modality: str = "rna",
    protein_modality: str = "prot",
    protein_names=None,
    gene_name_field: str = "name",
    block_cells: int = DEFAULT_BLOCK_CELLS,
    allow_non_integer: bool = False,
    make_names_unique: bool = False,
    overwrite: bool = False,
    drop_new_obs_columns: bool = False,
    layout: SomaLayoutConfig = SomaLayoutConfig(),
    context: dict | tiledbsoma.SOMATileDBContext | None = None,
    rna_measurement: str = DEFAULT_RNA_MEASUREMENT,
    protein_measurement: str = DEFAULT_PROTEIN_MEASUREMENT,
    x_layer: str = DEFAULT_X_LAYER,
    progress: bool = True,
) -> IngestReport:
    """Writes one input file into a TileDB-SOMA Experiment as one study.

    Args:
        input_path: h5ad, h5mu or 10x feature-barcode ``.h5`` file.
        out_uri: Experiment to create (local path, conventionally ``*.soma``), or to append to.
        append: add the study to the existing Experiment: its cells get soma_joinids after the existing
            ones; its genes/proteins are matched by name and new ones registered (the var is the union);
            panels are extended so that existing cells stay masked for proteins they did not measure.
            Refused: Experiments not written by this ingest, other measurement/layer names, a study name
            already present, obs columns the Experiment lacks (unless ``drop_new_obs_columns``) or of
            types that do not convert. obs columns the new study lacks are written as missing.
        study_name: value of obs ``_study`` for these cells (default: the input file name without
            extension). A Source per study: ``SomaSource(uri, value_filter="_study == 'name'")``.
        batch_key: obs column by which protein panels are detected (proteins all-zero in a batch were
            not measured there).
        input_format, protein_key, rna_layer, rna_modality, protein_modality, protein_names,
            gene_name_field, block_cells, allow_non_integer, make_names_unique: as ``ingest``.
        overwrite: replace an existing Experiment (new Experiments only).
        drop_new_obs_columns: on append, leave out obs columns the Experiment lacks instead of refusing.
        layout: tiling and compression of the X arrays (new Experiments).
        context: TileDB config dict or ``SOMATileDBContext``.
        rna_measurement, protein_measurement, x_layer: names of the measurements and the X layer.
        progress: show a progress bar.

    Returns:
        An ``IngestReport`` (print it); ``notes`` say what an append registered.

    Raises:
        StoreFormatError: unreadable input, missing protein matrix or batch column, duplicate names,
            empty input, or an append the Experiment cannot take (see ``append``).
        InvalidCountsError: NaN, infinite, negative or (unless allowed) non-integer counts.
        StoreExistsError: ``out_uri`` exists, without ``append`` or ``overwrite``.
    """
    if block_cells < 1:
        raise ValueError(f"block_cells must be >= 1, got {block_cells}")
    if append and overwrite:
        raise ValueError(
            "append and overwrite exclude each other: append adds a study, overwrite replaces the Experiment"
        )
    t0 = time.perf_counter()
    input_path, out_uri = os.fspath(input_path), os.fspath(out_uri)
    reader = open_reader(
        input_path, input_format, protein_key=protein_key, rna_layer=rna_layer, rna_modality=rna_modality,
        protein_modality=protein_modality, protein_names=protein_names, gene_name_field=gene_name_field,
    )
    try:
        path = reader.path
        genes, proteins, obs, notes = checked_input(reader, batch_key=batch_key,
                                                    make_names_unique=make_names_unique, addressed_by="soma_joinid")
        study = study_name or study_name_from_path(path)
        writer = SomaExperimentWriter(
            out_uri, genes, proteins, obs, study_name=study, append=append, overwrite=overwrite,
            panel_key=batch_key, source_file=path, drop_new_obs_columns=drop_new_obs_columns, layout=layout,
            context=context, rna_measurement=rna_measurement, protein_measurement=protein_measurement,
            x_layer=x_layer,
        )
        cell_names = obs.index.to_numpy()
        try:
            with tqdm(total=reader.n_obs, unit="cells", desc=f"ingest {study}", disable=not progress) as bar:
                for start, rna, protein in reader.blocks(block_cells):
                    stop = start + rna.shape[0]
                    for block, modality, names in ((rna, "rna", genes), (protein, "protein", proteins)):
                        validate_counts(
                            block, study=study, modality=modality, cell_names=cell_names[start:stop],
                            feature_names=names, row_offset=start, require_integer=not allow_non_integer,
                            source_path=path,
                        )
                    writer.append(rna, protein)
                    bar.update(stop - start)
            writer.close()
        except BaseException:
            writer.abort()
            raise
        if append:
            notes.append(
                f"appended study {study!r} at soma_joinids {writer.first_joinid}.."
                f"{writer.first_joinid + reader.n_obs - 1}; "
                f"registered {len(writer.new_genes)} new genes and {len(writer.new_proteins)} new proteins"
            )
    finally:
        reader.close()
    return build_report(reader, output_path=out_uri, genes=genes, proteins=proteins, obs=obs, batch_key=batch_key,
                        panels=writer.panels, skip_columns={PANEL_OBS_COLUMN, STUDY_OBS_COLUMN}, started=t0, notes=notes)
