"""The streamtotal store: an AnnData zarr store that trains fast and that any AnnData reader can open.

Layout (zarr format 2, readable by ``anndata.read_zarr`` and written by ``ZarrStoreWriter``)::

    <store>.zarr/
      .zattrs            encoding-type "anndata", encoding-version "0.1.0"
      .zmetadata         consolidated metadata: one request opens the whole store (matters on S3)
      X/                 encoding-type "csr_matrix", shape [n_cells, n_genes]; raw RNA counts
        data             int32 [nnz] for integer counts (ingest's default), else float32; chunks of ~chunk_cells
                         cells' worth of entries, Blosc lz4 byte shuffle
        indices          int32   [nnz], same chunking and codec
        indptr           int64   [n_cells + 1] (int64: atlases pass 2**31 non-zeros)
      obsm/protein_expression   float32 [n_cells, n_proteins] dense, chunks of whole rows (cell blocks)
      obs/               input obs columns (strings stored as categoricals, categoricals kept) plus
                         ``_protein_panel`` (int16 code into uns/streamtotal/protein_panels)
      var/               index = gene names (unique)
      uns/protein_names  str [n_proteins] (unique), column names of obsm/protein_expression
      uns/streamtotal/   format_version, protein_panels bool [P, n_proteins], panel_key (str, "" = none),
                         panel_groups str [G], panel_of_group int [G], n_cells, n_genes, n_proteins,
                         source_file
      layers/ obsp/ varm/ varp/   empty (AnnData expects them)

Why zarr format 2: anndata 0.12 writes it by default and every AnnData tool, zarr-python 2 and R
readers open it; zarr-python 3 decodes it as fast as format 3 (same codec pipeline; measured), and its
chunk files are simple enough for ``zarr_chunk_reader`` to decode directly, which is what makes reads
fast (zarr-python 3's own per-chunk overhead capped reads at ~30k cells/s on 2 cores). anndata has
announced format 3 as its next default; our stores stay readable either way, and format 3 sharding
(fewer objects on S3) can come later behind ``StoreLayoutConfig``.

Why Blosc lz4 with byte shuffle: lz4 reads fastest of what we measured and halves the store. Byte shuffle
beats bit shuffle on float32 counts (they share exponent bytes, which byte shuffle groups): on 20k simulated
cells x 2,000 genes at ~40% density the store is 38 MB instead of 61 MB and ``Collection.read_aligned`` of 64
random 64-cell runs costs ~25% less CPU. Earlier figures (benchmarks/store_read_speed.py, bit shuffle, 2 cores,
64 random 64-cell chunks per read), at 200 non-zeros a cell: lz4 ~100-130k cells/s, Blosc zstd ~73k, uncompressed ~160k; at 2,000 non-zeros a
cell (10x-like, 20k genes): lz4 ~38k, uncompressed ~30k (more bytes to move), zstd ~21k. zstd stores
are ~2.5x smaller than lz4: pick ``codec="zstd"`` for network storage where bytes cost more than CPU.

Why int32 for integer counts: lossless, and with byte shuffle their zero high bytes compress away: on the
20k-cell benchmark store X/data is 13 MB instead of 22 MB and a training read's CPU falls by ~8%.

Why ~chunk_cells cells per chunk: training reads random runs of a few dozen cells; a chunk much larger
than a run is decoded mostly to be thrown away, a much smaller one costs a file read per few cells.
"""

from __future__ import annotations

from dataclasses import dataclass

import numcodecs

FORMAT_VERSION = 1
"""Version of this layout, stored in ``uns/streamtotal/format_version``; bump on incompatible change."""

ZARR_FORMAT = 2
"""Zarr on-disk format of the stores we write."""

RNA_KEY = "X"
"""Group holding raw RNA counts (CSR)."""

PROTEIN_OBSM_KEY = "protein_expression"
"""Key under ``obsm`` of the dense protein count matrix."""

PROTEIN_NAMES_UNS_KEY = "protein_names"
"""Key under ``uns`` of the protein names (order of the protein matrix columns)."""

PANEL_OBS_COLUMN = "_protein_panel"
"""obs column holding each cell's protein panel code (index into ``protein_panels``)."""

META_UNS_KEY = "streamtotal"
"""Key under ``uns`` of the store's metadata dict."""

ANNDATA_ENCODING = {"encoding-type": "anndata", "encoding-version": "0.1.0"}
CSR_ENCODING = {"encoding-type": "csr_matrix", "encoding-version": "0.1.0"}
DENSE_ENCODING = {"encoding-type": "array", "encoding-version": "0.2.0"}
DICT_ENCODING = {"encoding-type": "dict", "encoding-version": "0.1.0"}


OBJECT_STORAGE_CHUNK_CELLS = 2048
"""Cells per chunk of a store written for object storage. There every chunk is one request, and a request costs
10-50 ms of latency and a few ms of client and server CPU whatever its size, so chunks of ~1-2 MB stored (2,048 cells
at ~800 non-zeros, lz4) are what streams fast; the loader then reads runs of as many cells
(``StreamConfig.chunk_size``). 2,048 rather than 1,024: a run of a stored chunk's cells touches ~2 chunks of X data
and of X indices (cells do not end on chunk boundaries) and one of proteins, so halving the chunks per cell halves
the requests; through a 20 ms proxy to moto on 2 cores that took a shuffled epoch of 100,000 cells from
18,352-20,345 to 26,821-32,447 cells/s (``benchmarks/loader_throughput.py --object-storage-only``)."""

MAX_CHUNK_ELEMENTS_PER_CELL = 2048
"""``for_destination`` caps elements per chunk at ``max(1 << 20, chunk_cells * this)``: dense or very deep data
still gets chunks of at most ~8 KiB a cell (16 MiB for 2,048 cells) uncompressed, while ordinary data keeps its
chunk of ``chunk_cells`` cells however large ``chunk_cells`` is."""


@dataclass(frozen=True)
class StoreLayoutConfig:
    """How a store's arrays are chunked and compressed. Readers do not need it: zarr records it."""

    chunk_cells: int = 64
    """Target number of cells per chunk. A random run of L cells touches 1 + (L - 1) / C chunks of C cells on
    average: for training's 64-cell runs, ~128 cells decoded with C = 64 against ~192 with C = 128. X
    data/indices chunks hold about this many cells' non-zeros (estimated from the first appended block); protein
    chunks hold at least this many whole rows."""

    min_chunk_elements: int = 16_384
    """Lower bound on elements per chunk, so very sparse or narrow data does not make tiny chunks."""

    max_chunk_elements: int = 1 << 20
    """Upper bound on elements per chunk (4 MiB of float32), so dense data does not make huge chunks."""

    codec: str | None = "lz4"
    """Blosc compressor name (``lz4``, ``zstd``, ``blosclz``, ...); None stores chunks uncompressed
    (fastest from a local page cache, ~2x larger)."""

    clevel: int = 5
    """Blosc compression level (lz4 decodes at the same speed at every level)."""

    bitshuffle: bool = False
    """Bit shuffle before compressing; False = byte shuffle (smaller and faster to decode for float32 counts)."""

    indptr_chunk: int = 1 << 20
    """Chunk length of ``X/indptr``; it is read whole when a store is opened."""

    def __post_init__(self) -> None:
        if self.chunk_cells < 1:
            raise ValueError(f"StoreLayoutConfig.chunk_cells must be >= 1, got {self.chunk_cells}")
        if not 1 <= self.min_chunk_elements <= self.max_chunk_elements:
            raise ValueError(
                "StoreLayoutConfig needs 1 <= min_chunk_elements <= max_chunk_elements, got "
                f"{self.min_chunk_elements} and {self.max_chunk_elements}"
            )

    @classmethod
    def for_destination(cls, out_path, chunk_cells: int | None = None) -> StoreLayoutConfig:
        """The layout for a store written to ``out_path``: ``chunk_cells`` when given, else 64 cells per chunk on
        local disk and ``OBJECT_STORAGE_CHUNK_CELLS`` on object storage (an ``s3://``-style URL); chunks of at most
        ``max(1 << 20, chunk_cells * MAX_CHUNK_ELEMENTS_PER_CELL)`` elements.

        Raises:
            ValueError: ``chunk_cells`` below 1.
        """
        from loaders.object_store import is_url

        if chunk_cells is None:
            chunk_cells = OBJECT_STORAGE_CHUNK_CELLS if is_url(out_path) else cls.chunk_cells
        chunk_cells = int(chunk_cells)
        # The default cap (1 Mi elements) would cut a 2,048-cell chunk of ~800 non-zeros a cell to ~1,300 cells.
        return cls(chunk_cells=chunk_cells,
                   max_chunk_elements=max(cls.max_chunk_elements, chunk_cells * MAX_CHUNK_ELEMENTS_PER_CELL))

    def compressor(self) -> numcodecs.Blosc | None:
        """Returns the numcodecs compressor for every array of the store (None: uncompressed)."""
        if self.codec is None:
            return None
        shuffle = numcodecs.Blosc.BITSHUFFLE if self.bitshuffle else numcodecs.Blosc.SHUFFLE
        return numcodecs.Blosc(cname=self.codec, clevel=self.clevel, shuffle=shuffle)

    def nnz_chunk(self, mean_nnz_per_cell: float) -> int:
        """Returns the chunk length of X data/indices for a given mean number of non-zeros per cell."""
        target = int(round(max(mean_nnz_per_cell, 1.0) * self.chunk_cells))
        return int(min(max(target, self.min_chunk_elements), self.max_chunk_elements))

    def row_chunk(self, n_columns: int) -> int:
        """Returns rows per chunk of a dense ``[n_cells, n_columns]`` matrix."""
        rows = max(self.chunk_cells, self.min_chunk_elements // max(n_columns, 1))
        return int(max(1, min(rows, self.max_chunk_elements // max(n_columns, 1))))
