"""The epoch plan: which cells each (rank, worker) slot reads, in which order, cut into how many batches.

Pure functions of their arguments: no I/O, no torch.distributed, no hidden state. Every rank computes the
same plan from ``(seed, epoch, sizes)``, so ranks agree without communicating, and a resumed job recomputes
exactly the plan it was interrupted in.

Scheme: positions ``0..n_cells-1`` (indexes into a caller's id array) are cut into contiguous chunks of
``chunk_size`` (contiguous reads are what stores are fast at); a permutation of the chunks, a function of
``(seed, epoch)`` only, gives the epoch's order; that sequence is cut into ``S = world_size * num_workers``
contiguous pieces whose sizes differ by at most one cell. Every slot then makes exactly ``K`` batches with
``K = ceil(max_slot_cells / batch_size)``, sizes differing by at most one. Equal ``K`` on every slot is what
keeps DDP from hanging; near-equal batch sizes avoid a tiny last batch (a 1-cell batch breaks BatchNorm).
Cutting the sequence (rather than dealing whole chunks round-robin) balances slots to one cell, not one
chunk, and costs at most two partial chunks per slot.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from loaders.errors import PlanError

# Domain tags keep the RNG streams of different uses apart even for equal (seed, epoch).
_TAG_CHUNKS = 0x5EED_C4
_TAG_VALIDATION = 0x5EED_7A


def _check_int(value: int, name: str, minimum: int) -> int:
    if isinstance(value, bool) or int(value) != value or value < minimum:
        raise PlanError(f"{name} must be an integer >= {minimum}; got {value!r}")
    return int(value)


VALIDATION_BLOCK_CELLS = 64
"""Largest run of consecutive cells held out together (see ``validation_block``)."""


def validation_block(n_obs: int) -> int:
    """Cells per held-out block for ``n_obs`` cells: ``n_obs // 1000`` clamped to ``[1, VALIDATION_BLOCK_CELLS]``.

    Why blocks: validation cells are read every epoch, and single cells scattered over a large store make every
    read decode nearly every compressed chunk (a 1M-cell store: a full extra pass over the data, and read buffers
    that grow with the store). Runs of 64 cells are read like training chunks. Small data sets (under 2,000 cells)
    keep single cells, so their validation sets still sample many places of the store.
    """
    return max(1, min(VALIDATION_BLOCK_CELLS, int(n_obs) // 1000))


def split_validation(
    n_obs: int, fraction: float, seed: int, block: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Holds out a random set of cells for validation, deterministically.

    ``round(fraction * n_obs)`` cells (at least one when ``fraction > 0``) are held out: random runs of ``block``
    consecutive cells (the store is cut into such blocks and a random subset of them is taken, the last one
    trimmed to the exact count), drawn by an RNG seeded from ``seed`` only, so every rank and every restart gets
    the same split. ``block = 1`` draws single cells.

    Args:
        n_obs: number of cells.
        fraction: share held out, in ``[0, 1)``; 0 gives an empty validation set.
        seed: RNG seed (>= 0).
        block: cells per held-out run; None = ``validation_block(n_obs)``.

    Returns:
        ``(train_ids, val_ids)``: sorted int64, disjoint, together ``0..n_obs-1``.

    Raises:
        PlanError: ``fraction`` outside ``[0, 1)``, or no cell would be left for training.
    """
    n_obs = _check_int(n_obs, "n_obs", 0)
    seed = _check_int(seed, "seed", 0)
    block = validation_block(n_obs) if block is None else _check_int(block, "block", 1)
    if not 0.0 <= fraction < 1.0:
        raise PlanError(f"validation fraction must be in [0, 1); got {fraction}")
    n_val = int(round(fraction * n_obs))
    if fraction > 0 and n_obs > 1:
        n_val = min(max(n_val, 1), n_obs - 1)
    if n_val >= n_obs and n_obs > 0:
        raise PlanError(f"holding out {fraction:.1%} of {n_obs} cells leaves none for training")
    rng = np.random.default_rng([_TAG_VALIDATION, seed])
    is_val = np.zeros(n_obs, dtype=bool)
    if block == 1:
        is_val[rng.choice(n_obs, size=n_val, replace=False)] = True
    elif n_val:
        starts = rng.permutation(np.arange(0, n_obs, block))
        sizes = np.minimum(starts + block, n_obs) - starts
        k = int(np.searchsorted(np.cumsum(sizes), n_val))  # drawn blocks 0..k cover n_val cells
        # The drawn blocks' cells in draw order, cut at n_val: the last drawn block is trimmed from its end.
        picked = np.concatenate([np.arange(a, a + n) for a, n in zip(starts[: k + 1].tolist(),
                                                                     sizes[: k + 1].tolist())])
        is_val[picked[:n_val]] = True
    return np.flatnonzero(~is_val).astype(np.int64), np.flatnonzero(is_val).astype(np.int64)


def batches_per_slot(n_cells: int, batch_size: int, n_slots: int) -> int:
    """K, the number of batches every slot makes in an epoch (same for all slots and epochs).

    Raises:
        PlanError: as ``plan_epoch``.
    """
    n_cells = _check_int(n_cells, "n_cells", 1)
    batch_size = _check_int(batch_size, "batch_size", 1)
    n_slots = _check_int(n_slots, "world_size * num_workers", 1)
    if n_cells < n_slots:
        raise PlanError(
            f"{n_cells} cells cannot feed {n_slots} slots (world_size x num_workers): some would be empty. "
            "Use fewer ranks or DataLoader workers."
        )
    smallest, largest = n_cells // n_slots, -(-n_cells // n_slots)
    k = -(-largest // batch_size)
    if smallest < k:  # only possible with batch_size 1 and a remainder
        raise PlanError(
            f"batch_size={batch_size} cannot give all {n_slots} slots the same number of batches with "
            f"{n_cells} cells (not a multiple of {n_slots}); use batch_size >= 2."
        )
    return k


@dataclass(frozen=True, eq=False)
class SlotPlan:
    """One slot's share of an epoch: a contiguous piece of the epoch's chunk sequence.

    Attributes:
        slot: slot index, ``rank * num_workers + worker``.
        start: offset of this slot's piece in the epoch sequence.
        n_cells: number of positions (cells) of this slot.
        batch_sizes: ``[K] int64``, each <= batch_size, summing to ``n_cells``.
    """

    slot: int
    start: int
    n_cells: int
    batch_sizes: np.ndarray
    _plan: "EpochPlan"

    @property
    def n_batches(self) -> int:
        """K, the number of batches (equal on every slot)."""
        return int(self.batch_sizes.size)

    @property
    def positions(self) -> np.ndarray:
        """``[n_cells] int64`` positions in epoch order (materialised; see ``positions_slice``)."""
        return self.positions_slice(0, self.n_cells)

    def positions_slice(self, lo: int, hi: int) -> np.ndarray:
        """Positions ``lo:hi`` of this slot, computed without materialising the rest.

        Args:
            lo: first index into this slot's positions.
            hi: one past the last (clipped to ``n_cells``).

        Returns:
            ``[hi - lo] int64``.
        """
        lo, hi = max(0, int(lo)), min(int(hi), self.n_cells)
        return self._plan.sequence(self.start + lo, self.start + max(lo, hi))

    def cells_before(self, batch: int) -> int:
        """Number of this slot's cells in its first ``batch`` batches (where a resume starts reading)."""
        return int(self.batch_sizes[: int(batch)].sum())


@dataclass(frozen=True, eq=False)
class EpochPlan:
    """The order of one epoch and its split into slots. Build with ``plan_epoch``.

    Attributes:
        n_cells, seed, epoch, chunk_size, batch_size, world_size, num_workers, shuffle: the inputs.
        n_batches: K, batches per slot.
        chunk_order: ``[n_chunks] int64`` chunk ids in epoch order.
    """

    n_cells: int
    seed: int
    epoch: int
    chunk_size: int
    batch_size: int
    world_size: int
    num_workers: int
    shuffle: bool
    n_batches: int
    chunk_order: np.ndarray
    _chunk_starts: np.ndarray  # offset of each ordered chunk in the epoch sequence, plus the total

    @property
    def n_slots(self) -> int:
        """S = world_size * num_workers."""
        return self.world_size * self.num_workers

    def sequence(self, lo: int, hi: int) -> np.ndarray:
        """Positions ``lo:hi`` of the whole epoch sequence (chunks concatenated in ``chunk_order``)."""
        if hi <= lo:
            return np.zeros(0, dtype=np.int64)
        first = int(np.searchsorted(self._chunk_starts, lo, side="right") - 1)
        last = int(np.searchsorted(self._chunk_starts, hi, side="left"))
        chunks = self.chunk_order[first:last]
        seq_start = self._chunk_starts[first:last]
        lengths = self._chunk_starts[first + 1:last + 1] - seq_start
        # Each position = its chunk's first cell + (offset in sequence - chunk's offset in sequence).
        base = np.repeat(chunks * self.chunk_size - seq_start, lengths)
        run = np.arange(seq_start[0], seq_start[0] + lengths.sum(), dtype=np.int64)
        return (base + run)[lo - seq_start[0]: hi - seq_start[0]]

    def slot(self, rank: int, worker: int = 0) -> SlotPlan:
        """The share of ``(rank, worker)``.

        Raises:
            PlanError: rank or worker out of range.
        """
        if not (0 <= rank < self.world_size and 0 <= worker < self.num_workers):
            raise PlanError(
                f"(rank={rank}, worker={worker}) is outside world_size={self.world_size}, "
                f"num_workers={self.num_workers}"
            )
        s = rank * self.num_workers + worker
        base, extra = divmod(self.n_cells, self.n_slots)
        n = base + (s < extra)
        start = s * base + min(s, extra)
        size, bigger = divmod(n, self.n_batches)
        sizes = np.full(self.n_batches, size, dtype=np.int64)
        sizes[:bigger] += 1
        return SlotPlan(slot=s, start=start, n_cells=n, batch_sizes=sizes, _plan=self)


def plan_epoch(
    n_cells: int,
    *,
    seed: int,
    epoch: int,
    chunk_size: int,
    batch_size: int,
    world_size: int = 1,
    num_workers: int = 1,
    shuffle: bool = True,
) -> EpochPlan:
    """Plans one epoch over positions ``0..n_cells-1``.

    Args:
        n_cells: number of positions (e.g. ``len(train_ids)``).
        seed: RNG seed (>= 0); with ``epoch`` it fixes the chunk order.
        epoch: epoch number (>= 0); different epochs give different orders.
        chunk_size: cells per contiguous chunk.
        batch_size: maximum cells per batch.
        world_size: number of ranks.
        num_workers: DataLoader workers per rank (use 1 for in-process loading).
        shuffle: permute chunks; False keeps positions in order (inference).

    Returns:
        The plan; ``plan.slot(rank, worker)`` gives each slot's positions and batch sizes.

    Raises:
        PlanError: a size is not a positive integer, ``n_cells < world_size * num_workers``, or
            ``batch_size == 1`` cannot give equal batch counts.
    """
    seed = _check_int(seed, "seed", 0)
    epoch = _check_int(epoch, "epoch", 0)
    chunk_size = _check_int(chunk_size, "chunk_size", 1)
    world_size = _check_int(world_size, "world_size", 1)
    num_workers = _check_int(num_workers, "num_workers", 1)
    k = batches_per_slot(n_cells, batch_size, world_size * num_workers)
    n_chunks = -(-n_cells // chunk_size)
    if shuffle:
        order = np.random.default_rng([_TAG_CHUNKS, seed, epoch]).permutation(n_chunks).astype(np.int64)
    else:
        order = np.arange(n_chunks, dtype=np.int64)
    lengths = np.minimum(chunk_size, n_cells - order * chunk_size)
    starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return EpochPlan(
        n_cells=int(n_cells), seed=seed, epoch=epoch, chunk_size=chunk_size, batch_size=int(batch_size),
        world_size=world_size, num_workers=num_workers, shuffle=bool(shuffle), n_batches=k,
        chunk_order=order, _chunk_starts=starts,
    )
