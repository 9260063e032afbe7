"""Streaming a given set of cells of a store (any order, any size) through a model, batch by batch."""

from __future__ import annotations

from typing import Iterator

import numpy as np
from tqdm.auto import tqdm

from loaders.citebatch import CiteBatch
from loaders.collection import Collection
from loaders.stream import StreamConfig
from loaders.stream_loader import StreamLoader


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
