"""Tests of loaders.plan: coverage, equal batch counts, determinism, validation split."""

import numpy as np
import pytest

from loaders.errors import PlanError
from loaders.plan import batches_per_slot, plan_epoch, split_validation

COMBOS = [
    # n_cells, chunk_size, batch_size, world_size, num_workers
    (1000, 64, 256, 1, 1),
    (1000, 64, 100, 2, 2),
    (997, 10, 33, 3, 2),     # prime n, remainders everywhere
    (7, 3, 2, 2, 3),         # barely more cells than slots
    (6, 4, 1, 2, 3),         # batch_size 1 with n a multiple of S
    (513, 1000, 16, 4, 1),   # one partial chunk bigger than the data
    (300, 7, 300, 1, 4),     # batch bigger than a slot's share
]


def _all_slots(plan):
    return [plan.slot(r, w) for r in range(plan.world_size) for w in range(plan.num_workers)]


@pytest.mark.parametrize("n, chunk, batch, world, workers", COMBOS)
def test_every_cell_once_equal_batches(n, chunk, batch, world, workers):
    plan = plan_epoch(n, seed=3, epoch=1, chunk_size=chunk, batch_size=batch, world_size=world, num_workers=workers)
    slots = _all_slots(plan)
    cells = np.concatenate([s.positions for s in slots])
    assert np.array_equal(np.sort(cells), np.arange(n))
    assert {s.n_batches for s in slots} == {plan.n_batches}
    for s in slots:
        assert s.batch_sizes.sum() == s.n_cells == s.positions.size
        assert s.batch_sizes.max() <= batch and s.batch_sizes.min() >= 1
        assert s.batch_sizes.max() - s.batch_sizes.min() <= 1
    assert max(s.n_cells for s in slots) - min(s.n_cells for s in slots) <= 1
    assert plan.n_batches == batches_per_slot(n, batch, world * workers)


def test_positions_slice_matches_full_positions():
    plan = plan_epoch(997, seed=1, epoch=0, chunk_size=10, batch_size=33, world_size=3, num_workers=2)
    slot = plan.slot(1, 1)
    full = slot.positions
    for lo, hi in [(0, 5), (3, 40), (100, full.size), (full.size - 1, full.size + 10)]:
        assert np.array_equal(slot.positions_slice(lo, hi), full[lo:hi])
    assert slot.cells_before(2) == slot.batch_sizes[:2].sum()


def test_chunks_stay_contiguous():
    plan = plan_epoch(1000, seed=0, epoch=0, chunk_size=50, batch_size=64)
    seq = plan.slot(0, 0).positions.reshape(20, 50)
    assert (np.diff(seq, axis=1) == 1).all()          # each chunk is a contiguous run
    assert not np.array_equal(seq[:, 0], np.arange(0, 1000, 50))  # but chunks are permuted


def test_order_depends_on_epoch_and_is_reproducible():
    kw = dict(seed=5, chunk_size=8, batch_size=32, world_size=2, num_workers=2)
    a = plan_epoch(800, epoch=0, **kw).slot(1, 0).positions
    b = plan_epoch(800, epoch=0, **kw).slot(1, 0).positions
    c = plan_epoch(800, epoch=1, **kw).slot(1, 0).positions
    d = plan_epoch(800, epoch=0, **{**kw, "seed": 6}).slot(1, 0).positions
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    assert not np.array_equal(a, d)


def test_no_shuffle_is_in_order():
    plan = plan_epoch(100, seed=0, epoch=4, chunk_size=7, batch_size=10, world_size=2, num_workers=1, shuffle=False)
    assert np.array_equal(np.concatenate([s.positions for s in _all_slots(plan)]), np.arange(100))


def test_refuses_impossible_plans():
    with pytest.raises(PlanError, match="cannot feed 6 slots"):
        plan_epoch(5, seed=0, epoch=0, chunk_size=2, batch_size=4, world_size=2, num_workers=3)
    with pytest.raises(PlanError, match="batch_size=1"):
        plan_epoch(7, seed=0, epoch=0, chunk_size=2, batch_size=1, world_size=2)
    with pytest.raises(PlanError, match="chunk_size"):
        plan_epoch(7, seed=0, epoch=0, chunk_size=0, batch_size=1)
    with pytest.raises(PlanError, match="outside"):
        plan_epoch(10, seed=0, epoch=0, chunk_size=2, batch_size=4, world_size=2).slot(2, 0)


@pytest.mark.parametrize("n, fraction", [(1000, 0.1), (7, 0.5), (10, 0.01), (50, 0.0), (1, 0.3), (20_000, 0.1),
                                         (100_003, 0.1), (5_000, 0.37)])
def test_split_validation(n, fraction):
    train, val = split_validation(n, fraction, seed=11)
    for part in (train, val):
        assert part.dtype == np.int64 and (np.diff(part) > 0).all()
    assert np.intersect1d(train, val).size == 0
    assert np.array_equal(np.union1d(train, val), np.arange(n))
    if fraction == 0:
        assert val.size == 0
    elif n > 1:
        assert val.size == max(1, round(fraction * n)) and train.size > 0
    again = split_validation(n, fraction, seed=11)
    assert np.array_equal(again[1], val)


def test_split_validation_depends_on_seed_and_refuses_bad_fraction():
    assert not np.array_equal(split_validation(1000, 0.2, seed=0)[1], split_validation(1000, 0.2, seed=1)[1])
    with pytest.raises(PlanError, match=r"\[0, 1\)"):
        split_validation(10, 1.0, seed=0)


def test_large_stores_hold_out_runs_of_cells_small_ones_single_cells():
    from loaders.plan import VALIDATION_BLOCK_CELLS, validation_block

    assert validation_block(1_999) == 1 and validation_block(20_000) == 20
    assert validation_block(10**7) == VALIDATION_BLOCK_CELLS
    _, val = split_validation(1_000_000, 0.1, seed=3)
    runs = np.count_nonzero(np.diff(val) != 1) + 1
    # ~100,000 cells in runs of 64 (runs that touch merge): about 1,560 runs, not ~90,000 scattered cells.
    assert runs <= val.size // VALIDATION_BLOCK_CELLS + 1
    # Blocks start on multiples of the block size, except where a trimmed last block ends early.
    starts = val[np.concatenate([[0], np.flatnonzero(np.diff(val) != 1) + 1])]
    assert (starts % VALIDATION_BLOCK_CELLS == 0).all()
    # The block size is a parameter: block=1 is the single-cell split.
    _, single = split_validation(1_000_000, 0.1, seed=3, block=1)
    assert np.count_nonzero(np.diff(single) != 1) > 80_000
