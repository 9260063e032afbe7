"""The streamtotal layout of a TileDB-SOMA Experiment, shared by ``SomaSource`` and the SOMA ingest.

Layout (what ``ingest_soma`` writes; ``SomaSource`` also reads Experiments written by others, e.g. by
``tiledbsoma.io.from_h5ad`` or CELLxGENE Census, as long as both measurements exist)::

    <experiment>/
      obs                 DataFrame: soma_joinid, obs_id (cell name), the input obs columns (strings as
                          large_string, numbers and bools as they are), _study (str: which ingest wrote
                          the cell), _protein_panel (int16: index into the panels in the metadata)
      ms/RNA/var          DataFrame: soma_joinid, var_id (gene name, unique)
      ms/RNA/X/data       SparseNDArray float32 [n_cells, n_genes]: raw RNA counts
      ms/prot/var         DataFrame: soma_joinid, var_id (protein name, unique)
      ms/prot/X/data      SparseNDArray float32 [n_cells, n_proteins]: raw protein counts (zeros not stored)
      metadata["streamtotal"]  JSON (see ``SomaMetadata``): format version, measurement and layer names,
                          protein panels over the protein var (soma_joinid order), studies ingested.

Cells of every study share one obs and one soma_joinid space (an appended study's cells follow the
existing ones); genes and proteins are the union over studies (a study's new names get new var
soma_joinids). A cell has no entries at genes or proteins its study did not measure: proteins are
masked through the panels; for genes, each study's entry in the metadata records which RNA var rows it
measured (``genes_measured``), and a Source whose cells all come from one study lists only those genes, so
the Collection's gene alignment treats the others as absent, not as measured zeros. streamtotal opens an
Experiment of several studies as one Source per study (``streamtotal.data``; ``open_soma_sources`` here).

Why these array settings: a sparse array's data tile holds ``capacity`` non-zeros; a read decodes whole
tiles, so TileDB's default (100,000, i.e. ~500 cells at 200 non-zeros a cell) decodes mostly cells that
were not asked for when training reads random runs of 64 cells; small tiles decode little beyond the cells a
read wants (benchmarks/soma_read_speed.py compares tile sizes), and the store is as small. The gene
dimension gets one space tile (extent 2**31) so a cell's entries are contiguous in TileDB's global order
whatever the gene count (the default extent of 2,048 would split a 30k-gene row over 15 tiles). zstd:
lz4 read no faster here and made stores ~2.5x larger.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np

from loaders.errors import StoreFormatError

SOMA_FORMAT_VERSION = 1
"""Version of this layout, stored in ``metadata["streamtotal"]["format_version"]``."""

METADATA_KEY = "streamtotal"
"""Experiment metadata key of the JSON document written by our ingest."""

OBS_ID_COLUMN = "obs_id"
"""obs column of cell names (as ``tiledbsoma.io`` names it)."""

VAR_ID_COLUMN = "var_id"
"""var column of gene and protein names (as ``tiledbsoma.io`` names it)."""

STUDY_OBS_COLUMN = "_study"
"""obs column naming the study (ingest) each cell came from."""

DEFAULT_RNA_MEASUREMENT = "RNA"
DEFAULT_PROTEIN_MEASUREMENT = "prot"
DEFAULT_X_LAYER = "data"

GENE_TILE_EXTENT = 1 << 31
"""Space tile extent of the feature dimension: one tile, so each cell's entries are contiguous."""


@dataclass(frozen=True)
class SomaLayoutConfig:
    """How the X arrays of an Experiment are tiled and compressed. Readers do not need it."""

    tile_cells: int = 16
    """Target cells per data tile: capacity = tile_cells x mean non-zeros per cell of the first block. Reads of
    64-cell runs decode the tiles they overlap: 16-cell tiles read ~20% faster than 64-cell ones (30k x 2,000 at
    41%, 64 random runs a read), at the same size on disk."""

    min_capacity: int = 4096
    """Lower bound on non-zeros per data tile (very sparse data)."""

    max_capacity: int = 1 << 18
    """Upper bound on non-zeros per data tile."""

    codec: str = "zstd"
    """``"zstd"`` (~2.5x smaller, as fast from a local page cache in our measurements) or ``"lz4"``."""

    level: int = 3
    """zstd level (ignored for lz4)."""

    cell_tile: int = 2048
    """Space tile extent of the cell dimension (global order is by cell either way)."""

    def __post_init__(self) -> None:
        if self.tile_cells < 1 or not 1 <= self.min_capacity <= self.max_capacity:
            raise ValueError(
                "SomaLayoutConfig needs tile_cells >= 1 and 1 <= min_capacity <= max_capacity, got "
                f"{self.tile_cells}, {self.min_capacity}, {self.max_capacity}"
            )
        if self.codec not in ("zstd", "lz4"):
            raise ValueError(f"SomaLayoutConfig.codec must be 'zstd' or 'lz4', got {self.codec!r}")

    def capacity(self, mean_nnz_per_cell: float) -> int:
        """Returns non-zeros per data tile for a given mean number of non-zeros per cell."""
        target = int(round(max(mean_nnz_per_cell, 1.0) * self.tile_cells))
        return int(min(max(target, self.min_capacity), self.max_capacity))

    def platform_config(self, mean_nnz_per_cell: float) -> dict:
        """Returns the ``platform_config`` for ``SparseNDArray.create``."""
        codec = {"_type": "ZstdFilter", "level": self.level} if self.codec == "zstd" else {"_type": "LZ4Filter"}
        dim_filters = [{"_type": "ZstdFilter", "level": self.level}] if self.codec == "zstd" else [
            {"_type": "DoubleDeltaFilter"}, {"_type": "LZ4Filter"}
        ]
        return {
            "tiledb": {
                "create": {
                    "capacity": self.capacity(mean_nnz_per_cell),
                    "dims": {
                        "soma_dim_0": {"tile": self.cell_tile, "filters": dim_filters},
                        "soma_dim_1": {"tile": GENE_TILE_EXTENT, "filters": dim_filters},
                    },
                    "attrs": {"soma_data": {"filters": [codec]}},
                }
            }
        }


@dataclass
class SomaMetadata:
    """The JSON document under ``metadata["streamtotal"]``.

    Attributes:
        rna_measurement, protein_measurement, x_layer: names the ingest used.
        protein_panels: ``[P, T] bool`` over the protein var in soma_joinid order.
        studies: one dict per ingest: name, source_file, first_joinid, n_cells, panel_key.
    """

    rna_measurement: str = DEFAULT_RNA_MEASUREMENT
    protein_measurement: str = DEFAULT_PROTEIN_MEASUREMENT
    x_layer: str = DEFAULT_X_LAYER
    protein_panels: np.ndarray = field(default_factory=lambda: np.ones((1, 0), dtype=bool))
    studies: list[dict] = field(default_factory=list)

    def to_json(self) -> str:
        """Returns the document (panels as strings of 0/1, one per panel)."""
        panels = ["".join("1" if v else "0" for v in row) for row in np.asarray(self.protein_panels, bool)]
        return json.dumps({
            "format_version": SOMA_FORMAT_VERSION,
            "rna_measurement": self.rna_measurement,
            "protein_measurement": self.protein_measurement,
            "x_layer": self.x_layer,
            "n_proteins": int(np.asarray(self.protein_panels).shape[1]),
            "protein_panels": panels,
            "studies": self.studies,
        })

    @classmethod
    def from_json(cls, text: str, where: str) -> SomaMetadata:
        """Parses the document.

        Raises:
            StoreFormatError: not JSON, a newer format version, or malformed panels.
        """
        try:
            doc = json.loads(text)
            version = int(doc.get("format_version", 0))
            if version > SOMA_FORMAT_VERSION:
                raise StoreFormatError(
                    f"{where}: metadata {METADATA_KEY!r} has format_version {version}; this streamtotal reads "
                    f"up to {SOMA_FORMAT_VERSION}. Upgrade streamtotal."
                )
            n = int(doc["n_proteins"])
            rows = doc["protein_panels"]
            panels = np.array([[c == "1" for c in row] for row in rows], dtype=bool).reshape(len(rows), n)
            if any(len(row) != n for row in rows) or not rows:
                raise ValueError("panel rows do not match n_proteins")
            return cls(
                rna_measurement=str(doc.get("rna_measurement", DEFAULT_RNA_MEASUREMENT)),
                protein_measurement=str(doc.get("protein_measurement", DEFAULT_PROTEIN_MEASUREMENT)),
                x_layer=str(doc.get("x_layer", DEFAULT_X_LAYER)),
                protein_panels=panels,
                studies=list(doc.get("studies", [])),
            )
        except StoreFormatError:
            raise
        except (ValueError, KeyError, TypeError) as err:
            raise StoreFormatError(f"{where}: metadata {METADATA_KEY!r} is malformed ({err}).") from err
