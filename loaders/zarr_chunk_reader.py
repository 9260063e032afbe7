"""Reads row ranges of a local zarr format 2 array by decoding its chunk files directly.

Why not zarr's own reads: zarr-python 3 spends ~0.5 ms of event-loop and thread hand-off per chunk, so a
training read touching ~300 chunks ran at ~30k cells/s on 2 cores; decoding the same chunks directly
runs at 100-130k (benchmarks/store_read_speed.py, 200 non-zeros a cell). The zarr v2 chunk format is
a frozen spec (one file per chunk named by its grid position, compressor then filters, fill value for
absent chunks), so reading it directly is safe. Anything this reader does not handle (format 3, object
dtypes, remote stores, arrays chunked along columns) is left to zarr: ``for_array`` returns None.

A chunk file that cannot be decoded, or decodes to fewer rows than its place in the array needs, is a
``StoreFormatError`` naming the file. An absent chunk file reads as the fill value (zarr does not write chunks that
hold only it) unless the array is opened with ``absent_chunks="error"``: the data and indices of a CSR matrix, where
an absent chunk means a lost file, not zeros (see ``zarr_matrix_reader``).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import zarr
from numcodecs.compat import ensure_ndarray_like
from zarr.storage import LocalStore

from loaders.errors import StoreFormatError

ABSENT_CHUNKS = ("fill", "error")
"""What an absent chunk file means: the fill value (zarr's rule), or a lost file (an error)."""


def plain_v2_dtype(array: zarr.Array, absent_chunks: str) -> np.dtype | None:
    """The native dtype of ``array`` when its chunks can be decoded directly (zarr format 2, numeric, 1-D or
    chunked along rows only), else None (zarr's own reads then).

    Raises:
        ValueError: an unknown ``absent_chunks``.
    """
    if absent_chunks not in ABSENT_CHUNKS:
        raise ValueError(f"absent_chunks must be one of {ABSENT_CHUNKS}, got {absent_chunks!r}")
    meta = array.metadata
    if meta.zarr_format != 2:
        return None
    dtype = np.dtype(meta.dtype.to_native_dtype())
    if dtype.kind not in "biuf" or len(meta.shape) not in (1, 2):
        return None
    if len(meta.shape) == 2 and meta.chunks[1] < meta.shape[1]:
        return None
    return dtype


class LocalChunkReader:
    """Reads ``[start, stop)`` row ranges (axis 0) of one local zarr v2 array."""

    def __init__(self, directory: Path, metadata, dtype: np.dtype, *, absent_chunks: str = "fill",
                 where: str = "") -> None:
        """Use ``for_array``; this takes the array's directory, its v2 metadata and native dtype."""
        self._dir = os.fspath(directory)
        self._chunks = tuple(int(c) for c in metadata.chunks)
        self._rows = self._chunks[0]
        self._n_rows = int(metadata.shape[0])
        self._absent_is_fill = absent_chunks == "fill"
        self._where = where
        self._sep = metadata.dimension_separator
        self._order = metadata.order
        self._compressor = metadata.compressor
        self._filters = tuple(metadata.filters or ())
        self._dtype = dtype
        fill = metadata.fill_value
        self._fill = 0 if fill is None else fill
        self._key_suffix = "".join(f"{self._sep}0" for _ in self._chunks[1:])
        # A chunk file is at most its decoded size plus the codec's header; read it in one call of that size.
        self._read_size = int(np.prod(self._chunks)) * dtype.itemsize + 4096
        # Chunks decode into one reused buffer per thread and only the rows asked for are copied out: a fresh
        # buffer per chunk cost ~50 us more (its pages are cold), ~10 ms per 4,096-cell training read.
        # Only Blosc: its header records the decoded size, so a chunk that decodes short (which would leave the
        # previous chunk's rows in the buffer) is caught; other codecs decode chunk by chunk, where sizes are checked.
        self._into_buffer = not self._filters and getattr(self._compressor, "codec_id", None) == "blosc" and (
            len(self._chunks) == 1 or self._order == "C")
        self._row_bytes = int(np.prod(self._chunks[1:])) * dtype.itemsize
        self._scratch = threading.local()

    @classmethod
    def for_array(cls, array: zarr.Array, *, absent_chunks: str = "fill", where: str = "") -> LocalChunkReader | None:
        """Returns a reader for ``array``, or None where zarr's own reads must be used.

        Args:
            array: an opened zarr array.
            absent_chunks: ``"fill"``: an absent chunk file holds the fill value (zarr's rule); ``"error"``: it is a
                lost file, refused with a ``StoreFormatError``.
            where: the store, for messages (``"study 'x' (x.zarr)"``).

        Raises:
            ValueError: an unknown ``absent_chunks``.
        """
        dtype = plain_v2_dtype(array, absent_chunks)
        store = array.store
        if dtype is None or not isinstance(store, LocalStore):
            return None
        return cls(Path(store.root) / array.path, array.metadata, dtype, absent_chunks=absent_chunks,
                   where=where or os.fspath(store.root))

    def read_ranges(self, starts: np.ndarray, stops: np.ndarray) -> list[np.ndarray]:
        """Returns rows ``starts[i]:stops[i]`` for each i; each chunk is decoded once (ranges sorted by start).

        The parts are consecutive views of one new array (``row_runs.joined_parts`` gives it back without a copy).
        """
        starts, stops = np.asarray(starts, dtype=np.int64), np.asarray(stops, dtype=np.int64)
        if not self._into_buffer or np.any(np.diff(starts) < 0):
            return self._read_ranges_chunkwise(starts, stops)
        c = self._rows
        lengths = stops - starts
        offsets = np.zeros(len(starts) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        out = np.empty((int(offsets[-1]), *self._chunks[1:]), dtype=self._dtype)
        current, chunk = -1, None
        for a, b, o in zip(starts.tolist(), stops.tolist(), offsets[:-1].tolist()):
            at = a
            while at < b:
                j = at // c
                if j != current:
                    chunk, current = self._chunk_into_buffer(j), j
                end = min(b, (j + 1) * c)
                out[o + at - a : o + end - a] = chunk[at - j * c : end - j * c]
                at = end
        return [out[o : o + n] for o, n in zip(offsets[:-1].tolist(), lengths.tolist())]

    def _read_ranges_chunkwise(self, starts: np.ndarray, stops: np.ndarray) -> list[np.ndarray]:
        """``read_ranges`` for any order of ranges and any codec: every chunk touched is decoded into its own array."""
        c = self._rows
        first, last = starts // c, (stops - 1) // c
        decoded = {int(j): self._chunk(int(j)) for j in np.unique(np.concatenate(
            [np.arange(a, b + 1) for a, b in zip(first, last)]
        ))} if len(starts) else {}
        parts = []
        for a, b, ja, jb in zip(starts.tolist(), stops.tolist(), first.tolist(), last.tolist()):
            if a == b:  # an empty range (cells without entries): at a chunk boundary it touches no chunk
                parts.append(np.empty((0, *self._chunks[1:]), dtype=self._dtype))
            elif ja == jb:
                parts.append(decoded[ja][a - ja * c : b - ja * c])
            else:
                parts.append(np.concatenate(
                    [decoded[j][max(a - j * c, 0) : min(b - j * c, c)] for j in range(ja, jb + 1)]
                ))
        return parts

    def _chunk_into_buffer(self, index: int) -> np.ndarray:
        """Chunk ``index`` decoded into this thread's buffer (valid until the thread decodes the next one)."""
        buffer = getattr(self._scratch, "buffer", None)
        if buffer is None:
            buffer = self._scratch.buffer = np.empty(self._chunks, dtype=self._dtype)
        raw = self._raw_chunk(index)
        if raw is None:
            buffer.fill(self._fill)
            return buffer
        # A short last chunk (some writers store one) decodes into the buffer's front; rows past the end of the
        # array are never asked for.
        if self._blosc_header(index, raw) < self._needed_rows(index) * self._row_bytes:
            raise self._bad_chunk(index, f"holds fewer than the {self._needed_rows(index)} rows it must hold")
        try:
            self._compressor.decode(raw, out=buffer)
        except Exception as err:  # numcodecs raises RuntimeError, ValueError, ... by codec
            raise self._bad_chunk(index, f"cannot be decoded ({err})") from err
        return buffer

    def _blosc_header(self, index: int, raw: bytes) -> int:
        """The decoded size a Blosc chunk's header records, after checking the chunk is whole."""
        problem = blosc_chunk_problem(raw)
        if problem is not None:
            raise self._bad_chunk(index, problem)
        return int.from_bytes(raw[4:8], "little")

    def _path(self, index: int) -> str:
        return os.path.join(self._dir, f"{index}{self._key_suffix}")

    def _needed_rows(self, index: int) -> int:
        """Rows chunk ``index`` must decode to: a whole chunk, or up to the array's end for the last one."""
        return min(self._rows, self._n_rows - index * self._rows)

    def _bad_chunk(self, index: int, what: str) -> StoreFormatError:
        return StoreFormatError(
            f"{self._where}: chunk file {self._path(index)} {what}: the file is truncated or corrupt. Copy the "
            "store again (or re-run ingest)."
        )

    def _raw_chunk(self, index: int) -> bytes | None:
        """Chunk ``index``'s file as stored, or None where there is none and that means the fill value (zarr does not
        write chunks that hold only it).

        Raises:
            StoreFormatError: the file is absent and this array's chunks are never legitimately absent.
        """
        try:
            return _read_file(self._path(index), self._read_size)
        except FileNotFoundError:
            if self._absent_is_fill:
                return None
            raise StoreFormatError(
                f"{self._where}: chunk file {self._path(index)} (chunk {index} of {self._dir}) is missing. Chunks of "
                "a CSR matrix's data and indices are always written, so the store is incomplete (an interrupted "
                "copy or sync, or a deleted file): copy the store again (or re-run ingest)."
            ) from None

    def _chunk(self, index: int) -> np.ndarray:
        raw = self._raw_chunk(index)
        if raw is None:
            return np.full(self._chunks, self._fill, dtype=self._dtype)
        if getattr(self._compressor, "codec_id", None) == "blosc":
            self._blosc_header(index, raw)
        try:
            buf = self._compressor.decode(raw) if self._compressor is not None else raw
            for f in reversed(self._filters):
                buf = f.decode(buf)
            arr = ensure_ndarray_like(buf).view(self._dtype)
        except Exception as err:  # numcodecs raises RuntimeError, ValueError, ... by codec
            raise self._bad_chunk(index, f"cannot be decoded ({err})") from err
        if arr.size == int(np.prod(self._chunks)):
            return arr.reshape(self._chunks, order=self._order)
        # Some writers store a short last chunk; rows past the end are never asked for. A chunk short of the rows
        # the array needs from it is a truncated file, whose rows must not silently go missing.
        row_elements = int(np.prod(self._chunks[1:]))
        if arr.size % row_elements or arr.size // row_elements < self._needed_rows(index):
            raise self._bad_chunk(index, f"decodes to {arr.size} values, fewer than the "
                                         f"{self._needed_rows(index)} rows it must hold")
        return arr.reshape((-1, *self._chunks[1:]), order=self._order)


def blosc_chunk_problem(raw) -> str | None:
    """What is wrong with a Blosc-compressed chunk's bytes, if its header shows it (None: it looks whole).

    Blosc does not notice a cut-off end of a chunk it stored uncompressed, and reads past the buffer: the compressed
    size its header records is therefore checked against the bytes there are (a truncated file).
    """
    head = bytes(raw[:16])
    # Blosc 1 header: version, versionlz, flags, typesize, then uint32 LE nbytes, blocksize, cbytes.
    if len(head) < 16 or head[0] == 0:
        return f"is {len(raw)} bytes and has no Blosc header"
    stored = int.from_bytes(head[12:16], "little")
    if stored != len(raw):
        return f"is {len(raw)} bytes but its Blosc header says {stored}"
    return None


def _read_file(path: str, size_hint: int) -> bytes:
    """The whole file: open + one read of ``size_hint`` bytes + close (half the time of ``Path.read_bytes``, which
    also stats the file, on the ~40 KB chunk files a training read opens a hundred of)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        parts = [os.read(fd, size_hint)]
        while len(parts[-1]) == size_hint:  # larger than the hint (another writer's codec): read on to the end
            parts.append(os.read(fd, size_hint))
    finally:
        os.close(fd)
    return parts[0] if len(parts) == 1 else b"".join(parts)
