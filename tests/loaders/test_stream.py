"""Tests of loaders.stream and loaders.stream_loader: coverage, order, content, prefetch, exact resume."""

import threading

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from loaders.array_source import ArraySource
from loaders.citebatch import CiteBatch
from loaders.collection import Collection
from loaders.errors import ConfigError, InvalidCountsError, ResumeError
from loaders.plan import split_validation
from loaders.stream import Stream, StreamConfig
from loaders.stream_loader import StreamLoader


def _source(name, n, genes, proteins, seed):
    rng = np.random.default_rng(seed)
    rna = sp.random(n, len(genes), density=0.3, format="csr", random_state=seed, dtype=np.float32)
    rna.data = np.ceil(rna.data * 9)
    protein = rng.poisson(20, size=(n, len(proteins))).astype(np.float32)
    return ArraySource(name, rna, protein, genes, proteins, obs={"b": rng.choice(["x", "y"], n)})


@pytest.fixture(scope="module")
def collection():
    genes = [f"g{i}" for i in range(12)]
    a = _source("A", 130, genes, ["CD3", "CD4", "CD8"], seed=1)
    b = _source("B", 87, genes[::-1], ["CD4", "CD3"], seed=2)
    return Collection([a, b], batch_key="b")


def _run(batches):
    return [b for b in batches]


def _ids_of(batches):
    return [b.cell_id.numpy().copy() for b in batches]


def _assert_same(xs, ys):
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys):
        for name in ("cell_id", "rna", "protein", "protein_mask", "batch", "label"):
            assert torch.equal(getattr(x, name), getattr(y, name)), name


def _assert_rows_match(col, batch):
    truth = col.read(np.sort(batch.cell_id.numpy()))
    order = np.argsort(batch.cell_id.numpy())
    for name in ("rna", "protein", "protein_mask", "batch", "label", "cell_id"):
        assert torch.equal(getattr(batch, name)[torch.from_numpy(order)], getattr(truth, name)), name


CONFIGS = [
    dict(batch_size=16, chunk_size=8, io_chunks=3),
    dict(batch_size=10, chunk_size=4, io_chunks=1),   # batches span several I/O groups
    dict(batch_size=50, chunk_size=7, io_chunks=100),  # one group holds the whole slot
]


@pytest.mark.parametrize("world_size, workers", [(1, 0), (2, 0), (2, 3), (3, 2)])
@pytest.mark.parametrize("cfg", CONFIGS)
def test_every_id_once_per_epoch_across_slots(collection, cfg, world_size, workers):
    ids = np.arange(collection.n_obs)[::-1].copy()  # positions index this array, not global ids
    config = StreamConfig(**cfg, num_workers=workers, seed=4)
    seen, counts = [], set()
    for rank in range(world_size):
        stream = Stream(collection, ids, config, rank=rank, world_size=world_size)
        stream.set_epoch(2)
        for w in range(config.slots_per_rank):
            batches = _run(stream.iter_slot(w))
            counts.add(len(batches))
            assert all(isinstance(b, CiteBatch) and 0 < len(b) <= config.batch_size for b in batches)
            seen += _ids_of(batches)
    assert counts == {stream.n_batches_per_slot}
    assert np.array_equal(np.sort(np.concatenate(seen)), np.arange(collection.n_obs))


def test_batch_rows_match_collection_and_ids_subset(collection):
    train, _ = split_validation(collection.n_obs, 0.2, seed=0)
    stream = Stream(collection, train, StreamConfig(batch_size=32, chunk_size=8, io_chunks=2))
    batches = _run(stream)
    assert np.array_equal(np.sort(np.concatenate(_ids_of(batches))), train)
    for b in batches:
        _assert_rows_match(collection, b)
    assert batches[0].rna.dtype == torch.float32 and batches[0].batch.dtype == torch.int64


def test_order_is_a_function_of_seed_and_epoch(collection):
    ids = np.arange(collection.n_obs)
    cfg = StreamConfig(batch_size=20, chunk_size=8, io_chunks=4, seed=1)
    s = Stream(collection, ids, cfg)
    s.set_epoch(0)
    e0 = _ids_of(s)
    e0_again = _ids_of(Stream(collection, ids, cfg))
    s.set_epoch(1)
    e1 = _ids_of(s)
    assert all(np.array_equal(x, y) for x, y in zip(e0, e0_again))
    assert not np.array_equal(np.concatenate(e0), np.concatenate(e1))
    # Rows are shuffled within a group, not just chunks: the first batch is not a run of chunks.
    assert not all((np.diff(x) == 1).sum() >= len(x) - 3 for x in e0)


def test_no_shuffle_streams_ids_in_order(collection):
    ids = np.concatenate([np.arange(100, 150), np.arange(0, 30)])  # unsorted on purpose
    cfg = StreamConfig(batch_size=16, chunk_size=8, io_chunks=2, shuffle=False)
    got = np.concatenate(_ids_of(Stream(collection, ids, cfg)))
    assert np.array_equal(got, ids)


def test_prefetch_does_not_change_content(collection):
    ids = np.arange(collection.n_obs)
    base = dict(batch_size=24, chunk_size=8, io_chunks=2, seed=3)
    inline = _run(Stream(collection, ids, StreamConfig(**base, prefetch_batches=0)))
    ahead = _run(Stream(collection, ids, StreamConfig(**base, prefetch_batches=3)))
    _assert_same(inline, ahead)
    one_reader = _run(Stream(collection, ids, StreamConfig(**base, prefetch_batches=3, read_threads=1)))
    _assert_same(inline, one_reader)


def test_plain_dataloader_with_other_worker_count_is_refused(collection):
    stream = Stream(collection, np.arange(collection.n_obs), StreamConfig(num_workers=2, batch_size=32))
    with pytest.raises(ConfigError, match="iterated by 1"):
        next(iter(stream))


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_yields_round_robin_and_len(collection, workers):
    cfg = StreamConfig(batch_size=16, chunk_size=8, io_chunks=2, num_workers=workers, seed=9)
    loader = StreamLoader(collection, np.arange(collection.n_obs), cfg, rank=1, world_size=2)
    loader.set_epoch(3)
    batches = _run(loader)
    assert len(batches) == len(loader) == loader.stream.n_batches_per_slot * max(1, workers)
    stream = Stream(collection, np.arange(collection.n_obs), cfg, rank=1, world_size=2)
    stream.set_epoch(3)
    slots = [_run(stream.iter_slot(w)) for w in range(cfg.slots_per_rank)]
    expected = [slots[i % len(slots)][i // len(slots)] for i in range(len(batches))]
    _assert_same(batches, expected)


@pytest.mark.parametrize("workers, consumed", [(0, 0), (0, 5), (2, 3), (2, 4), (2, 11)])
def test_resume_mid_epoch_is_exact(collection, workers, consumed):
    ids = split_validation(collection.n_obs, 0.1, seed=0)[0]
    cfg = StreamConfig(batch_size=12, chunk_size=8, io_chunks=2, num_workers=workers, seed=2)
    full_loader = StreamLoader(collection, ids, cfg)
    full_loader.set_epoch(1)
    full = _run(full_loader)
    assert consumed < len(full)

    first = StreamLoader(collection, ids, cfg)
    first.set_epoch(1)
    it = iter(first)
    head = [next(it) for _ in range(consumed)]
    state = first.state_dict()
    it.close()
    assert state["epoch"] == 1 and state["batches_consumed"] == consumed

    resumed = StreamLoader(collection, ids, cfg)
    resumed.load_state_dict(state)
    resumed.set_epoch(1)  # a training loop re-selecting the saved epoch keeps the resume point
    tail = _run(resumed)
    _assert_same(head + tail, full)
    assert resumed.batches_remaining == 0


def test_resume_edges_and_next_epoch(collection):
    ids = np.arange(collection.n_obs)
    cfg = StreamConfig(batch_size=40, chunk_size=8, io_chunks=2)
    loader = StreamLoader(collection, ids, cfg)
    n = len(_run(loader))
    end_state = loader.state_dict()
    assert end_state["batches_consumed"] == n
    assert len(_run(loader)) == n  # a finished epoch replays when iterated again, like a DataLoader
    fresh = StreamLoader(collection, ids, cfg)
    fresh.load_state_dict(end_state)
    assert _run(fresh) == []       # ... but a state saved at the end resumes to nothing
    fresh.set_epoch(1)
    assert len(_run(fresh)) == n

    partial = StreamLoader(collection, ids, cfg)
    it = iter(partial)
    next(it)
    it.close()                     # leaving the loop early keeps the position
    assert len(_run(partial)) == n - 1


def test_resume_refuses_other_loader(collection):
    ids = np.arange(collection.n_obs)
    state = StreamLoader(collection, ids, StreamConfig(batch_size=32)).state_dict()
    with pytest.raises(ResumeError, match=r"batch_size: saved 32, now 16"):
        StreamLoader(collection, ids, StreamConfig(batch_size=16)).load_state_dict(state)
    other_ids = ids.copy()
    other_ids[[0, 1]] = other_ids[[1, 0]]
    with pytest.raises(ResumeError, match="ids_crc32"):
        StreamLoader(collection, other_ids, StreamConfig(batch_size=32)).load_state_dict(state)
    with pytest.raises(ResumeError, match="missing"):
        StreamLoader(collection, ids, StreamConfig(batch_size=32)).load_state_dict({"epoch": 0})


def test_config_checks():
    with pytest.raises(ConfigError, match="batch_size"):
        StreamConfig(batch_size=0)
    with pytest.raises(ConfigError, match="prefetch_batches"):
        StreamConfig(prefetch_batches=-1)
    with pytest.raises(ConfigError, match="read_threads"):
        StreamConfig(read_threads=0)
    assert StreamConfig(io_chunks=3, chunk_size=5).io_cells == 15


def test_read_errors_surface_and_reader_threads_stop():
    genes = [f"g{i}" for i in range(5)]
    src = _source("Z", 64, genes, ["CD3"], seed=3)
    col = Collection([src])
    cfg = StreamConfig(batch_size=8, chunk_size=4, io_chunks=2, prefetch_batches=2, shuffle=False)
    before = threading.active_count()
    it = iter(Stream(col, np.arange(64), cfg))
    next(it)
    it.close()  # consumer stops early: the read-ahead thread is joined
    assert threading.active_count() == before
    src._protein[40, 0] = np.nan  # storage went bad after the source was built
    with pytest.raises(InvalidCountsError, match=r"study 'Z'.*cell 40 \(local id 40\), column 'CD3'"):
        _run(Stream(col, np.arange(64), cfg))
    assert threading.active_count() == before


class _CountingCollection:
    """The real collection, counting ``read_aligned`` calls (the group reads a stream makes)."""

    def __init__(self, collection):
        self._collection, self.reads, self._lock = collection, [], threading.Lock()

    def __getattr__(self, name):
        return getattr(self._collection, name)

    def read_aligned(self, ids):
        with self._lock:
            self.reads.append(ids.copy())
        return self._collection.read_aligned(ids)


@pytest.mark.parametrize("read_threads", [1, 2])
def test_read_ahead_reads_the_next_epochs_first_group_early_and_changes_no_batch(collection, read_threads):
    config = StreamConfig(batch_size=16, chunk_size=8, io_chunks=3, seed=7, read_threads=read_threads)
    ids = np.arange(collection.n_obs)
    plain = StreamLoader(collection, ids, config)
    expected = []
    for epoch in (0, 1):
        plain.set_epoch(epoch)
        expected.append(_run(plain))

    counting = _CountingCollection(collection)
    loader = StreamLoader(counting, ids, config)
    n_groups = -(-collection.n_obs // config.io_cells)
    loader.set_epoch(0)
    loader.set_read_ahead(1)
    got0 = _run(loader)
    loader.stream._early[(1, 0, 0)].result()  # the early read finished (or raised) before epoch 1 was asked for
    assert len(counting.reads) == n_groups + 1  # epoch 0's groups, then epoch 1's first
    loader.set_epoch(1)
    loader.set_read_ahead(None)
    got1 = _run(loader)
    assert len(counting.reads) == 2 * n_groups  # epoch 1 used the early read instead of reading group 0 again
    _assert_same(got0, expected[0])
    _assert_same(got1, expected[1])


def test_read_ahead_of_an_epoch_not_iterated_next_is_dropped(collection):
    config = StreamConfig(batch_size=16, chunk_size=8, io_chunks=3, seed=7)
    ids = np.arange(collection.n_obs)
    loader = StreamLoader(collection, ids, config)
    loader.set_epoch(0)
    loader.set_read_ahead(1)
    _run(loader)
    loader.set_epoch(2)  # e.g. training resumed elsewhere: epoch 1's early read must not be used for epoch 2
    loader.set_read_ahead(None)
    got = _run(loader)
    reference = StreamLoader(collection, ids, config)
    reference.set_epoch(2)
    _assert_same(got, _run(reference))
    assert not loader.stream._early
