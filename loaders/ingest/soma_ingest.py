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

from loaders.ingest.ingest_options import IngestOptions
from loaders.ingest.ingest_report import IngestReport, build_report
from loaders.ingest.ingest_store import checked_input, open_input, validated_blocks
from loaders.ingest.soma_writer import SomaExperimentWriter
from loaders.soma_layout import (
    DEFAULT_PROTEIN_MEASUREMENT,
    DEFAULT_RNA_MEASUREMENT,
    DEFAULT_X_LAYER,
    STUDY_OBS_COLUMN,
    SomaLayoutConfig,
)
from loaders.store_layout import PANEL_OBS_COLUMN
from loaders.study_source import study_name_from_path


def ingest_soma(
    input_path: str | os.PathLike,
    out_uri: str | os.PathLike,
    options: IngestOptions | None = None,
    *,
    append: bool = False,
    study_name: str | None = None,
    drop_new_obs_columns: bool = False,
    layout: SomaLayoutConfig = SomaLayoutConfig(),
    context: dict | tiledbsoma.SOMATileDBContext | None = None,
    rna_measurement: str = DEFAULT_RNA_MEASUREMENT,
    protein_measurement: str = DEFAULT_PROTEIN_MEASUREMENT,
    x_layer: str = DEFAULT_X_LAYER,
    **option_overrides,
) -> IngestReport:
    """Writes one input file into a TileDB-SOMA Experiment as one study.

    Args:
        input_path: h5ad, h5mu or 10x feature-barcode ``.h5`` file.
        out_uri: Experiment to create (local path, conventionally ``*.soma``), or to append to.
        options: how the input is read, checked and written (``IngestOptions``, as for ``ingest``); its
            ``batch_key`` is the obs column by which protein panels are detected, its ``overwrite`` replaces an
            existing Experiment (new Experiments only).
        append: add the study to the existing Experiment: its cells get soma_joinids after the existing
            ones; its genes/proteins are matched by name and new ones registered (the var is the union);
            panels are extended so that existing cells stay masked for proteins they did not measure.
            Refused: Experiments not written by this ingest, other measurement/layer names, a study name
            already present, obs columns the Experiment lacks (unless ``drop_new_obs_columns``) or of
            types that do not convert. obs columns the new study lacks are written as missing.
        study_name: value of obs ``_study`` for these cells (default: the input file name without
            extension). A Source per study: ``SomaSource(uri, value_filter="_study == 'name'")``.
        drop_new_obs_columns: on append, leave out obs columns the Experiment lacks instead of refusing.
        layout: tiling and compression of the X arrays (new Experiments).
        context: TileDB config dict or ``SOMATileDBContext``.
        rna_measurement, protein_measurement, x_layer: names of the measurements and the X layer.
        **option_overrides: any ``IngestOptions`` field by name, replacing that field of ``options``.

    Returns:
        An ``IngestReport`` (print it); ``notes`` say what an append registered.

    Raises:
        StoreFormatError: unreadable input, missing protein matrix or batch column, duplicate names,
            empty input, or an append the Experiment cannot take (see ``append``).
        InvalidCountsError: NaN, infinite, negative or (unless allowed) non-integer counts.
        StoreExistsError: ``out_uri`` exists, without ``append`` or ``overwrite``.
        TypeError: an override that is no ``IngestOptions`` field.
        ValueError: ``block_cells`` below 1, or ``append`` with ``overwrite``.
    """
    options = IngestOptions.resolve(options, option_overrides, caller="ingest_soma")
    batch_key = options.batch_key
    if append and options.overwrite:
        raise ValueError(
            "append and overwrite exclude each other: append adds a study, overwrite replaces the Experiment"
        )
    t0 = time.perf_counter()
    input_path, out_uri = os.fspath(input_path), os.fspath(out_uri)
    reader = open_input(input_path, options)
    try:
        path = reader.path
        genes, proteins, obs, notes = checked_input(reader, batch_key=batch_key,
                                                    make_names_unique=options.make_names_unique,
                                                    addressed_by="soma_joinid")
        study = study_name or study_name_from_path(path)
        writer = SomaExperimentWriter(
            out_uri, genes, proteins, obs, study_name=study, append=append, overwrite=options.overwrite,
            panel_key=batch_key, source_file=path, drop_new_obs_columns=drop_new_obs_columns, layout=layout,
            context=context, rna_measurement=rna_measurement, protein_measurement=protein_measurement,
            x_layer=x_layer,
        )
        with writer:  # aborts on any error (an interrupted append is repaired by the next, see soma_writer)
            for _, _, rna, protein in validated_blocks(reader, options, study=study, genes=genes, proteins=proteins,
                                                       cell_names=obs.index.to_numpy()):
                writer.append(rna, protein)
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
