"""``Stream``: the torch IterableDataset that turns a slot's share of the plan into CiteBatches."""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Callable, Iterable, Iterator

import numpy as np
import torch.utils.data

from loaders.aligned_rows import AlignedRows
from loaders.citebatch import CiteBatch
from loaders.collection import Collection
from loaders.errors import ConfigError, InvalidIdsError
from loaders.plan import EpochPlan, batches_per_slot, plan_epoch
from loaders.prefetch import prefetch
from loaders.read_unit import default_chunk_size, default_io_chunks
from loaders.thread_priority import lower_current_thread_priority

_TAG_ROWS = 0x5EED_B0


@dataclass(frozen=True)
class StreamConfig:
    """How cells are streamed. Memory per slot is bounded by ``(prefetch_batches + 1) * io_cells`` cells."""

    batch_size: int = 256
    """Maximum cells per minibatch; every slot gets the same number of batches, each within 1 cell of the rest."""

    chunk_size: int | None = None
    """Contiguous cells per chunk, the unit of the global shuffle (bigger: faster reads, coarser shuffle). None =
    64, or on object storage the stores' cells per stored chunk (``read_unit``: each chunk is one request)."""

    io_chunks: int | None = None
    """Chunks read per I/O call (an I/O group); rows are shuffled in memory within a group. None = enough for 32
    chunks and 4,096 cells (64 with 64-cell chunks)."""

    shuffle: bool = True
    """Shuffle chunks and rows; False streams ids in order (inference, writing results back)."""

    seed: int = 0
    """Seed of every shuffle; the order is a pure function of (seed, epoch, rank, worker)."""

    num_workers: int = 0
    """DataLoader worker processes per rank; 0 reads in the main process."""

    prefetch_batches: int = 2
    """I/O groups read ahead by a background thread in each worker (0: read inline)."""

    read_threads: int = 2
    """I/O groups read concurrently (at most ``prefetch_batches``; 1 = one reader thread). Reads whose time is spent
    outside Python (TileDB queries, object-store requests) overlap; the memory bound does not change."""

    ready_batches: int = 2
    """Dense minibatches cut from the groups and densified ahead of the consumer by a second background thread
    (0, or ``prefetch_batches == 0``: cut in the consuming thread). Takes ~2 ms a 256-cell batch off the training
    thread; costs at most ``ready_batches + 2`` dense minibatches of memory."""

    pin_memory: bool = False
    """Pin batches in page-locked memory (faster host-to-GPU copies)."""

    multiprocessing_context: str | None = None
    """Start method of DataLoader workers ("fork", "spawn", "forkserver"); None: the platform default."""

    def __post_init__(self) -> None:
        for name in ("batch_size", "chunk_size", "io_chunks", "read_threads"):
            value = getattr(self, name)
            if value is None and name in ("chunk_size", "io_chunks"):
                continue
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ConfigError(f"StreamConfig.{name} must be an integer >= 1; got {value!r}")
        for name in ("seed", "num_workers", "prefetch_batches", "ready_batches"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
                raise ConfigError(f"StreamConfig.{name} must be an integer >= 0; got {value!r}")

    def resolved(self, collection: Collection) -> StreamConfig:
        """This configuration with ``chunk_size`` and ``io_chunks`` set where they were left to the data
        (``read_unit``)."""
        chunk_size = self.chunk_size if self.chunk_size is not None else default_chunk_size(collection)
        io_chunks = self.io_chunks if self.io_chunks is not None else default_io_chunks(chunk_size)
        return replace(self, chunk_size=int(chunk_size), io_chunks=int(io_chunks))

    @property
    def io_cells(self) -> int:
        """Cells per I/O group: ``io_chunks * chunk_size`` (of a ``resolved`` configuration)."""
        if self.chunk_size is None or self.io_chunks is None:
            raise ConfigError("StreamConfig.io_cells needs chunk_size and io_chunks: call resolved(collection)")
        return self.io_chunks * self.chunk_size

    @property
    def slots_per_rank(self) -> int:
        """Plan slots per rank: ``max(1, num_workers)``."""
        return max(1, self.num_workers)


class Stream(torch.utils.data.IterableDataset):
    """Streams one rank's share of an epoch as CiteBatches.

    Each slot (rank x DataLoader worker) walks its positions of the epoch plan in I/O groups of
    ``io_chunks * chunk_size`` cells: positions -> ids, ids sorted (and de-duplicated) for locality, one
    ``Collection.read_aligned`` per group, rows permuted in memory with an RNG seeded from
    ``(seed, epoch, rank, worker, group)``, then cut into the plan's batch sizes (a batch may span groups).

    Memory bound: each slot holds at most ``(prefetch_batches + 1) * io_chunks * chunk_size`` cells of aligned
    rows (RNA kept sparse until a minibatch is cut), plus ``ready_batches + 2`` dense minibatches; a rank runs
    ``max(1, num_workers)`` slots, and torch's DataLoader keeps ``prefetch_factor * num_workers`` dense
    minibatches in flight on top. With ``read_ahead_epoch`` set, one more I/O group (the next epoch's first).

    The epoch is set from outside (``set_epoch``), never counted inside workers, so every worker and rank agrees.
    """

    def __init__(
        self, collection: Collection, ids: np.ndarray, config: StreamConfig, rank: int = 0, world_size: int = 1
    ) -> None:
        """Args:
            collection: the aligned data.
            ids: global ids this stream covers (e.g. training ids), in the order positions index them.
            config: the stream configuration.
            rank: this process's rank.
            world_size: number of ranks.

        Raises:
            InvalidIdsError: ids not a 1-D integer array within the collection.
            PlanError: fewer ids than ``world_size * slots_per_rank``, or rank out of range.
        """
        super().__init__()
        arr = np.asarray(ids)
        if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
            raise InvalidIdsError(f"Stream ids must be a 1-D integer array; got {arr.dtype} {arr.shape}")
        arr = arr.astype(np.int64)
        if arr.size and (arr.min() < 0 or arr.max() >= collection.n_obs):
            raise InvalidIdsError(f"Stream ids must lie in [0, {collection.n_obs}); got {arr.min()}..{arr.max()}")
        arr.flags.writeable = False
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank must be in [0, world_size={world_size}); got {rank}")
        config = config.resolved(collection)
        self.collection, self.ids, self.config = collection, arr, config
        self.rank, self.world_size = int(rank), int(world_size)
        self.n_batches_per_slot = batches_per_slot(arr.size, config.batch_size, world_size * config.slots_per_rank)
        self.epoch = 0
        self.start_batch = 0
        self.read_ahead_epoch: int | None = None
        self._early: dict[tuple[int, int, int], Future] = {}
        self._early_pool: ThreadPoolExecutor | None = None
        self._early_lock = threading.Lock()  # started on a reader thread, taken on the consumer's

    def set_read_ahead(self, epoch: int | None) -> None:
        """Reads the first I/O group of ``epoch`` as soon as the epoch being iterated has read its last group
        (None: never), so the next epoch's first batch does not wait for a cold read (~0.1 s an epoch on 2
        cores). Only without DataLoader worker processes (workers are forked anew each epoch, and a thread alive
        at a fork could leave a lock held in the child). The group read early is exactly the one the epoch would
        read, so the batches do not change; it is dropped if that epoch is not iterated from its start next."""
        self.read_ahead_epoch = None if epoch is None else int(epoch)

    def set_epoch(self, epoch: int) -> None:
        """Sets the epoch whose order the next iteration follows (call on every rank, before iterating)."""
        self.epoch = int(epoch)

    def set_start_batch(self, batches_consumed: int) -> None:
        """Skips the first ``batches_consumed`` batches of this rank in the next iteration (resume).

        The count is per rank. With W workers the DataLoader yields round-robin from workers 0, 1, ..., so plan
        worker w had consumed ``b // W + (w < b % W)``; the next iteration maps DataLoader worker j onto plan
        worker ``(j + b % W) % W`` so the round-robin continues where it stopped, and skips whole I/O groups.
        """
        self.start_batch = int(batches_consumed)

    def plan(self, epoch: int | None = None) -> EpochPlan:
        """The epoch plan this stream follows (``epoch`` defaults to the current one)."""
        cfg = self.config
        return plan_epoch(
            self.ids.size, seed=cfg.seed, epoch=self.epoch if epoch is None else int(epoch),
            chunk_size=cfg.chunk_size, batch_size=cfg.batch_size, world_size=self.world_size,
            num_workers=cfg.slots_per_rank, shuffle=cfg.shuffle,
        )

    def __iter__(self) -> Iterator[CiteBatch]:
        info = torch.utils.data.get_worker_info()
        n_slots = self.config.slots_per_rank
        n_loader_workers = 1 if info is None else info.num_workers
        if n_loader_workers != n_slots:
            raise ConfigError(
                f"Stream planned for {n_slots} worker slot(s) (config.num_workers={self.config.num_workers}) "
                f"but is iterated by {n_loader_workers}; use StreamLoader, or a DataLoader with the same num_workers"
            )
        loader_worker = 0 if info is None else info.id
        done, shift = divmod(self.start_batch, n_slots)
        worker = (loader_worker + shift) % n_slots
        return self.iter_slot(worker, start_batch=done + (worker < shift))

    def iter_slot(self, worker: int, start_batch: int = 0, epoch: int | None = None) -> Iterator[CiteBatch]:
        """Yields the batches of plan worker ``worker`` on this rank, from ``start_batch`` on.

        Args:
            worker: plan worker index in ``[0, slots_per_rank)``.
            start_batch: batches of this slot to skip (whole I/O groups before it are not read).
            epoch: defaults to the current epoch.

        Returns:
            An iterator of CiteBatch.
        """
        cfg, epoch = self.config, self.epoch if epoch is None else int(epoch)
        slot = self.plan(epoch).slot(self.rank, worker)
        early = self._take_early(epoch, worker)
        if start_batch >= slot.n_batches:
            return
        first_cell = slot.cells_before(start_batch)
        io = cfg.io_cells
        first_group, skip = divmod(first_cell, io)
        groups: Iterable[int] = range(first_group, -(-slot.n_cells // io))

        def read_group(g: int) -> tuple[AlignedRows, np.ndarray]:
            if early is not None and g == 0:
                return early.result()
            return self._read_group(epoch, worker, g, slot)

        following = self.read_ahead_epoch
        if following is not None and following != epoch and cfg.prefetch_batches and cfg.num_workers == 0:
            groups = _then(groups, lambda: self._start_early(following, worker))
        groups_read = prefetch(read_group, groups, cfg.prefetch_batches, cfg.read_threads)
        batches = _cut(groups_read, slot.batch_sizes[start_batch:], skip)
        if not (cfg.prefetch_batches and cfg.ready_batches):
            yield from batches
            return
        # Cutting and densifying (row gathers, CSR -> dense) run on a second read-ahead thread, which advances
        # ``batches``; the consumer only dequeues. Closing ``ready`` joins that thread before ``batches`` (and with
        # it the group reader) is closed here, so the generator is never run from two threads at once.
        ready = prefetch(_same, batches, cfg.ready_batches)
        try:
            yield from ready
        finally:
            ready.close()
            batches.close()

    def _read_group(self, epoch: int, worker: int, g: int, slot=None) -> tuple[AlignedRows, np.ndarray]:
        """Reads I/O group ``g`` of plan worker ``worker`` in ``epoch``: its rows and the order to cut them in.
        ``slot``: that worker's ``EpochPlan.slot`` when the caller has it (else computed)."""
        cfg, io = self.config, self.config.io_cells
        slot = self.plan(epoch).slot(self.rank, worker) if slot is None else slot
        gids = self.ids[slot.positions_slice(g * io, (g + 1) * io)]
        unique, inverse = np.unique(gids, return_inverse=True)
        rows = self.collection.read_aligned(unique)
        order = inverse.reshape(-1)
        if cfg.shuffle:
            rng = np.random.default_rng([_TAG_ROWS, cfg.seed, epoch, self.rank, worker, g])
            order = order[rng.permutation(order.size)]
        return rows, order

    def _start_early(self, epoch: int, worker: int) -> None:
        """Starts reading group 0 of ``epoch`` on a lowest-priority thread (see ``set_read_ahead``)."""
        key = (epoch, self.rank, worker)
        with self._early_lock:
            if key in self._early:
                return
            if self._early_pool is None:
                self._early_pool = ThreadPoolExecutor(1, thread_name_prefix="streamtotal-read-ahead",
                                                      initializer=lower_current_thread_priority)
            self._early[key] = self._early_pool.submit(self._read_group, epoch, worker, 0)

    def _take_early(self, epoch: int, worker: int) -> Future | None:
        """The early read of ``epoch``'s group 0 for ``worker``, if one was started; any other is dropped."""
        with self._early_lock:
            found = self._early.pop((epoch, self.rank, worker), None)
            for stale in self._early.values():
                stale.cancel()
            self._early.clear()
        return found

    def __getstate__(self) -> dict:
        # Pickled into DataLoader workers: threads and futures do not cross processes (nor are they used there).
        state = dict(self.__dict__)
        state["_early"], state["_early_pool"], state["_early_lock"] = {}, None, None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._early_lock = threading.Lock()


def _then(items: Iterable[int], callback: Callable[[], None]) -> Iterator[int]:
    """Yields ``items``, then calls ``callback`` once they are exhausted (not if the iteration stops early)."""
    yield from items
    callback()


def _same(batch: CiteBatch) -> CiteBatch:
    return batch


def _cut(groups: Iterator[tuple[AlignedRows, np.ndarray]], sizes: np.ndarray, skip: int) -> Iterator[CiteBatch]:
    """Cuts consecutive rows of the groups (each in its ``order``) into batches of ``sizes``; skips ``skip`` rows."""
    rows, order, at = None, np.zeros(0, dtype=np.int64), 0
    first = True
    try:
        for size in sizes.tolist():
            parts = []
            while size:
                if at == order.size:
                    rows = order = None  # let the previous group go before the next is fetched (memory bound)
                    rows, order = next(groups)
                    at = skip if first else 0
                    first = False
                take = min(size, order.size - at)
                parts.append(rows.take(order[at: at + take]))
                at += take
                size -= take
            yield AlignedRows.concat(parts).to_citebatch()
    finally:
        groups.close()  # stops and joins the read-ahead thread even when the consumer stops early
