"""Streaming a given set of cells of a store (any order, any size) through a model, batch by batch.

``stream_blocks`` groups the cells by **block** of ``block_rows`` consecutive store rows (block ``b`` = rows
``[b * block_rows, (b + 1) * block_rows)``) and yields one batch per block. Random draws are seeded per block
(``block_generator(seed, b)``), never carried over from one block to the next, so a cell's result depends only on
(model, seed, block_rows, the requested cells of its block): the whole store in memory, written back in one go,
or written back across an interruption and a resume give the same values.
"""

from __future__ import annotations

from dataclasses import fields, replace
from typing import Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from loaders.citebatch import CiteBatch
from loaders.collection import Collection
from loaders.stream import StreamConfig
from loaders.stream_loader import StreamLoader


def block_seed(seed: int, block: int) -> int:
    """A 63-bit seed for block ``block`` of a run seeded with ``seed`` (independent streams per block)."""
    state = np.random.SeedSequence([int(seed), int(block)]).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & ((1 << 63) - 1)


def block_generator(seed: int, block: int, device) -> torch.Generator:
    """The torch random source of block ``block`` (on ``device``)."""
    return torch.Generator(device=device).manual_seed(block_seed(seed, block))


def block_rng(seed: int, block: int) -> np.random.Generator:
    """The numpy random source of block ``block`` (NB and Bernoulli draws of the posterior predictive)."""
    return np.random.default_rng([int(seed), int(block), 1])


def _take(batch: CiteBatch, start: int, stop: int) -> CiteBatch:
    return CiteBatch(**{f.name: None if getattr(batch, f.name) is None else getattr(batch, f.name)[start:stop]
                        for f in fields(batch)})


def _cat(parts: list[CiteBatch]) -> CiteBatch:
    if len(parts) == 1:
        return parts[0]
    if any(p.rna_mask is not None for p in parts):  # a part without absent genes has an all-True mask
        parts = [p if p.rna_mask is not None else replace(p, rna_mask=torch.ones_like(p.rna, dtype=torch.bool))
                 for p in parts]
    return CiteBatch(**{f.name: torch.cat([getattr(p, f.name) for p in parts]) if getattr(parts[0], f.name) is not None
                        else None for f in fields(parts[0])})


def stream_blocks(
    collection: Collection, ids: np.ndarray, *, block_rows: int, device, desc: str, progress: bool, offset: int = 0,
) -> Iterator[tuple[int, CiteBatch, np.ndarray]]:
    """Reads ``ids`` in store order and yields ``(block, batch on device, rows)``, one batch per block.

    ``rows`` are the positions in ``ids`` of the batch's cells, so a caller can put results back in the requested
    order. Reads go through a ``StreamLoader`` (background prefetch) in batches of ``block_rows`` cells; when the
    requested cells are whole blocks (the whole store, or the pending units of a write-back) its batches are the
    blocks, otherwise they are re-cut at block boundaries.

    Args:
        collection: the aligned store.
        ids: unique global cell ids, any order.
        block_rows: store rows per block (the batch size).
        device: where the batch is moved.
        desc: progress-bar label.
        progress: show a tqdm bar.
        offset: blocks count from this global id (the first cell of one store of a multi-store collection):
            block ``b`` is ids ``offset + [b * block_rows, (b + 1) * block_rows)``.

    Yields:
        ``(block, batch, rows)``.
    """
    ids = np.asarray(ids, dtype=np.int64)
    if ids.size == 0:
        return
    order = np.argsort(ids, kind="stable")
    sorted_ids = ids[order]
    loader = StreamLoader(collection, sorted_ids, StreamConfig(batch_size=int(block_rows), shuffle=False,
                                                              num_workers=0))
    loader.set_epoch(0)
    current: list[CiteBatch] = []
    current_block = -1

    def flush():
        batch = _cat(current)
        rows = order[np.searchsorted(sorted_ids, batch.cell_id.numpy())]
        return current_block, batch.to(device), rows

    for batch in tqdm(loader, total=len(loader), desc=desc, unit="batch", disable=not progress):
        blocks = (batch.cell_id.numpy() - offset) // block_rows
        cuts = np.concatenate([[0], np.flatnonzero(np.diff(blocks)) + 1, [len(blocks)]])
        for start, stop in zip(cuts[:-1], cuts[1:]):
            block = int(blocks[start])
            if current and block != current_block:
                yield flush()
                current = []
            current_block = block
            current.append(_take(batch, int(start), int(stop)))
    if current:
        yield flush()


def stream_cells(
    collection: Collection, ids: np.ndarray, *, batch_size: int, device, desc: str, progress: bool,
) -> Iterator[tuple[CiteBatch, np.ndarray]]:
    """Reads ``ids`` in store order (sorted, for locality) and yields ``(batch on device, rows)``.

    ``rows`` are the positions in ``ids`` of the batch's cells, so a caller can put results back in the requested
    order. The batches (and so any random draws consumed batch by batch) depend only on ``ids`` and
    ``batch_size``: results are deterministic.

    Args:
        collection: the aligned store.
        ids: unique global cell ids, any order.
        batch_size: cells per batch.
        device: where the batch is moved.
        desc: progress-bar label.
        progress: show a tqdm bar.

    Yields:
        ``(batch, rows)``.
    """
    ids = np.asarray(ids, dtype=np.int64)
    order = np.argsort(ids, kind="stable")
    sorted_ids = ids[order]
    loader = StreamLoader(collection, sorted_ids, StreamConfig(batch_size=int(batch_size), shuffle=False,
                                                              num_workers=0))
    loader.set_epoch(0)
    for batch in tqdm(loader, total=len(loader), desc=desc, unit="batch", disable=not progress):
        rows = order[np.searchsorted(sorted_ids, batch.cell_id.numpy())]
        yield batch.to(device), rows
