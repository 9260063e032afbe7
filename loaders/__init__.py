"""streamtotal's data layer: Sources, Collections, Plans, Streams and CiteBatches.

This package imports nothing from ``streamtotal``: it is usable on its own to stream CITE-seq minibatches.
"""

from loaders.aligned_rows import AlignedRows
from loaders.array_source import ArraySource
from loaders.citebatch import CiteBatch
from loaders.collection import Collection
from loaders.plan import EpochPlan, SlotPlan, batches_per_slot, plan_epoch, split_validation
from loaders.registry import Registry
from loaders.source import Source, SourceRows
from loaders.stream import Stream, StreamConfig
from loaders.stream_loader import StreamLoader

__all__ = [
    "AlignedRows",
    "ArraySource",
    "CiteBatch",
    "Collection",
    "EpochPlan",
    "Registry",
    "SlotPlan",
    "Source",
    "SourceRows",
    "Stream",
    "StreamConfig",
    "StreamLoader",
    "batches_per_slot",
    "plan_epoch",
    "split_validation",
]

# Store formats: validation, the streamtotal zarr store (writer + layout), ingest, zarr and h5ad Sources.
from loaders.count_validation import validate_counts  # noqa: E402
from loaders.h5ad_source import H5adSource  # noqa: E402
from loaders.ingest import IngestReport, detect_format, ingest  # noqa: E402
from loaders.protein_panels import PanelAssignment, ProteinPanelDetector  # noqa: E402
from loaders.store_layout import StoreLayoutConfig  # noqa: E402
from loaders.store_writer import ZarrStoreWriter  # noqa: E402
from loaders.zarr_source import ZarrSource  # noqa: E402

__all__ += [
    "H5adSource",
    "IngestReport",
    "PanelAssignment",
    "ProteinPanelDetector",
    "StoreLayoutConfig",
    "ZarrSource",
    "ZarrStoreWriter",
    "detect_format",
    "ingest",
    "validate_counts",
]

# TileDB-SOMA: Source over an Experiment (RNA + protein measurements) and the block-wise SOMA ingest. Imported
# on first use (PEP 562), so ``import loaders`` works without the optional ``soma`` extra (tiledbsoma, pyarrow).
_SOMA_EXPORTS = {
    "SomaExperimentWriter": "loaders.ingest.soma_writer",
    "SomaLayoutConfig": "loaders.soma_layout",
    "SomaSource": "loaders.soma_source",
    "ingest_soma": "loaders.ingest.soma_ingest",
    "open_soma_sources": "loaders.soma_source",
}


def __getattr__(name: str):
    if name in _SOMA_EXPORTS:
        import importlib

        try:
            module = importlib.import_module(_SOMA_EXPORTS[name])
        except ImportError as err:
            raise ImportError(
                f"loaders.{name} needs tiledbsoma ({err}); install it with: pip install 'streamtotal[soma]'"
            ) from err
        return getattr(module, name)
    raise AttributeError(f"module 'loaders' has no attribute {name!r}")


__all__ += list(_SOMA_EXPORTS)

# LaminDB: the h5ad / zarr artifacts of a Collection as Sources (lamindb is imported only when resolving).
from loaders.lamin_sources import is_lamin_uri, lamin_sources, parse_lamin_uri  # noqa: E402

__all__ += ["is_lamin_uri", "lamin_sources", "parse_lamin_uri"]
