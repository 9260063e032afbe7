"""Ingest: h5ad, h5mu and 10x ``.h5`` files into streamtotal zarr stores (one reader per format)."""

from loaders.ingest.h5ad_reader import H5adReader
from loaders.ingest.h5mu_reader import H5muReader
from loaders.ingest.ingest_options import IngestOptions
from loaders.ingest.ingest_report import ColumnSummary, IngestReport
from loaders.ingest.ingest_store import DEFAULT_BLOCK_CELLS, INPUT_FORMATS, detect_format, ingest, open_reader
from loaders.ingest.tenx_h5_reader import TenxH5Reader

__all__ = [
    "DEFAULT_BLOCK_CELLS",
    "INPUT_FORMATS",
    "ColumnSummary",
    "H5adReader",
    "H5muReader",
    "IngestOptions",
    "IngestReport",
    "TenxH5Reader",
    "detect_format",
    "ingest",
    "open_reader",
]
