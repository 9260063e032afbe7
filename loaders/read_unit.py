"""How many contiguous cells a shuffled read should take from each place of a collection's stores.

On local disk a chunk decode costs microseconds, so the shuffle's unit is small (64 cells: fine mixing). On object
storage every stored chunk is one request (10-50 ms of latency, a few ms of CPU in client and server, whatever its
size): reading 64-cell runs out of chunks written for object storage (~2,048 cells, ``store_layout``) would fetch
each chunk for a thirty-second of its cells. So a source that reads from object storage declares its stored chunk's
cells (``Source.read_unit_cells``), and streams whose ``chunk_size`` is left unset read runs of that many cells,
in I/O groups of enough runs that minibatches still mix many places of the data.
"""

from __future__ import annotations

DEFAULT_CHUNK_SIZE = 64
"""Contiguous cells per shuffle chunk on local disk."""

MAX_CHUNK_SIZE = 4096
"""Upper bound of a run chosen from the stores (a store with huge chunks still mixes at this grain)."""

MIN_RUNS_PER_GROUP = 32
"""Runs read (and shuffled together) per I/O group, so a minibatch draws on many places of the data: at least this
many, unless that would pass ``MAX_IO_CELLS``."""

DEFAULT_IO_CELLS = 4096
"""Cells per I/O group at least (64 runs of 64 cells on local disk)."""

MAX_IO_CELLS = 32_768
"""Cells per I/O group at most where runs are long (object storage): 32 runs of 1,024 cells, 16 of 2,048, 8 of
4,096. The group is what a stream slot holds ``prefetch_batches + 1`` of, so this keeps the memory bound of stores
with larger chunks where 1,024-cell chunks had it, and smaller groups also start the pipeline sooner."""


def read_unit_cells(collection) -> int | None:
    """The largest stored-chunk size (cells) among the collection's sources that read from object storage, or None
    when none does (local files, or sources that choose their own reads, such as TileDB-SOMA)."""
    units = [getattr(source, "read_unit_cells", None) for source in collection.sources]
    units = [int(u) for u in units if u]
    return max(units) if units else None


def default_chunk_size(collection) -> int:
    """``DEFAULT_CHUNK_SIZE``, or the stores' read unit on object storage (see the module docstring), capped at
    ``MAX_CHUNK_SIZE``."""
    unit = read_unit_cells(collection)
    return DEFAULT_CHUNK_SIZE if unit is None else max(DEFAULT_CHUNK_SIZE, min(unit, MAX_CHUNK_SIZE))


def default_io_chunks(chunk_size: int) -> int:
    """Runs per I/O group: at least ``DEFAULT_IO_CELLS`` cells, and ``MIN_RUNS_PER_GROUP`` runs where that stays
    within ``MAX_IO_CELLS`` cells (64 x 64 locally; 32 x 1,024 and 16 x 2,048 on object storage)."""
    chunk_size = int(chunk_size)
    return max(-(-DEFAULT_IO_CELLS // chunk_size), min(MIN_RUNS_PER_GROUP, MAX_IO_CELLS // chunk_size))
