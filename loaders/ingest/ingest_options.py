"""``IngestOptions``: how an input file is read, checked and written, the same for ``ingest`` (to a zarr store) and
``ingest_soma`` (to a TileDB-SOMA Experiment)."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, Sequence

INPUT_FORMATS = ("h5ad", "h5mu", "10x_h5")
"""Input formats ``ingest`` reads; ``"auto"`` picks one from the file."""

DEFAULT_BLOCK_CELLS = 8192
"""Cells read, validated and written per block: bounds ingest memory to a few blocks of counts."""


@dataclass(frozen=True)
class IngestOptions:
    """The options ``ingest`` and ``ingest_soma`` share. Both also take each field as a keyword argument."""

    input_format: str = "auto"
    """``"auto"`` (from the file's contents) or one of ``INPUT_FORMATS``."""

    protein_key: str = "protein_expression"
    """h5ad: key of the protein matrix under ``obsm``."""

    rna_layer: str | None = None
    """h5ad/h5mu: take RNA counts from ``layers/<rna_layer>`` (e.g. ``"counts"``) instead of ``X``."""

    rna_modality: str = "rna"
    """h5mu: name of the RNA modality."""

    protein_modality: str = "prot"
    """h5mu: name of the protein modality."""

    protein_names: Sequence[str] | None = None
    """h5ad: protein names when the file does not record them."""

    gene_name_field: str = "name"
    """10x: ``"name"`` (gene symbols) or ``"id"`` (Ensembl ids, unique)."""

    batch_key: str | None = None
    """obs column by which protein panels are detected (a protein all zero within a batch is marked not measured
    there) and batches are reported; None: every cell measured every protein."""

    block_cells: int = DEFAULT_BLOCK_CELLS
    """Cells per read/validate/write block (the memory bound of an ingest)."""

    allow_non_integer: bool = False
    """Accept non-integer counts (e.g. ambient-corrected); NaN, infinite and negative values are refused
    regardless."""

    make_names_unique: bool = False
    """Append ``-1``, ``-2``, ... to repeated gene/protein names instead of refusing them."""

    overwrite: bool = False
    """Replace an existing output (only once the new one is complete)."""

    progress: bool = True
    """Show a progress bar."""

    def __post_init__(self) -> None:
        if self.block_cells < 1:
            raise ValueError(f"block_cells must be >= 1, got {self.block_cells}")

    @classmethod
    def resolve(cls, options: IngestOptions | None, overrides: dict[str, Any], *, caller: str) -> IngestOptions:
        """``options`` (default: the defaults) with the fields named in ``overrides`` replaced.

        Args:
            options: the caller's options, or None.
            overrides: keyword arguments given to ``caller``, each a field name.
            caller: the function name, for the message.

        Raises:
            TypeError: a keyword argument that is no field (as Python raises for an unknown keyword).
            ValueError: ``block_cells`` below 1.
        """
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise TypeError(f"{caller}() got unexpected keyword arguments {unknown}; "
                            f"the options are {sorted(known)}")
        return replace(options if options is not None else cls(), **overrides)
