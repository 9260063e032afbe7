"""Zarr stores on object storage read by fetching every chunk of a read concurrently (``remote_chunk_reader``):
exactly what the same store on local disk gives, cell for cell, and the same errors (issue 18, part 1)."""

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from loaders import Collection, StreamConfig, StreamLoader, ZarrSource
from loaders.errors import StoreFormatError
from loaders.ingest import ingest
from loaders.store_layout import StoreLayoutConfig

SMALL = StoreLayoutConfig(chunk_cells=8, min_chunk_elements=8)
"""Small chunks: a 300-cell store has dozens of chunks per array, so reads touch many, shared ones included."""


@pytest.fixture
def stores(tmp_path, s3_server, cite):
    """``(local path, s3 URL, data)``: one ingested store, on disk and uploaded to the moto server."""
    data = cite.make_cite(n=300, n_genes=40, n_proteins=6, seed=2)
    cite.write_h5ad(tmp_path / "study.h5ad", data)
    local = tmp_path / "study.zarr"
    ingest(tmp_path / "study.h5ad", local, batch_key="batch", layout=SMALL, progress=False)
    return local, s3_server.upload(local, "conc", tmp_path), data


def _epoch(source, seed):
    collection = Collection([source], batch_key="batch", labels_key="cell_type")
    loader = StreamLoader(collection, np.arange(collection.n_obs),
                          StreamConfig(batch_size=32, chunk_size=8, io_chunks=5, seed=seed, read_threads=2))
    loader.set_epoch(1)
    return list(loader)


def test_concurrent_remote_reads_return_exactly_the_local_rows(stores, s3_server, cite):
    local_path, url, data = stores
    local = ZarrSource(local_path)
    remote = ZarrSource(url, storage_options=s3_server.storage_options())
    zarr_reads = ZarrSource(url, storage_options=s3_server.storage_options(), direct_local_reads=False)
    assert remote._rna.remote and remote._protein.remote  # the concurrent chunk fetcher, not zarr's reads
    assert not zarr_reads._rna.remote
    rng = np.random.default_rng(5)
    id_sets = [cite.sorted_ids_with_runs(rng, 300) for _ in range(6)] + [np.arange(300), np.array([0, 299])]
    for ids in id_sets:
        want = local.read(ids)
        for source in (remote, zarr_reads):
            got = source.read(ids)
            assert (got.rna != want.rna).nnz == 0
            np.testing.assert_array_equal(got.rna.toarray(), data.rna[ids].toarray())
            np.testing.assert_array_equal(got.protein, want.protein)
    for seed in (0, 1):
        for x, y in zip(_epoch(local, seed), _epoch(remote, seed), strict=True):
            for field in ("rna", "protein", "protein_mask", "batch", "label", "cell_id"):
                assert torch.equal(getattr(x, field), getattr(y, field)), field


def test_concurrent_remote_reads_from_several_threads_are_each_exact(stores, s3_server, cite):
    _, url, data = stores
    remote = ZarrSource(url, storage_options=s3_server.storage_options())
    rng = np.random.default_rng(4)
    reads = [cite.sorted_ids_with_runs(rng, remote.n_obs) for _ in range(8)]
    with ThreadPoolExecutor(4) as pool:  # several reads decoding at once: each keeps its own fetched chunks
        results = list(pool.map(remote.read, reads))
    for ids, rows in zip(reads, results):
        np.testing.assert_array_equal(rows.rna.toarray(), data.rna[ids].toarray())
        np.testing.assert_array_equal(rows.protein, data.protein[ids])


@pytest.mark.parametrize("array", ["data", "indices"])
def test_a_lost_chunk_object_is_the_same_error_as_a_lost_local_chunk_file(stores, s3_server, array):
    local_path, url, _ = stores
    fs = s3_server.filesystem()
    fs.rm(f"{url[len('s3://'):]}/X/{array}/2")
    (local_path / "X" / array / "2").unlink()
    remote = ZarrSource(url, storage_options=s3_server.storage_options())
    ids = np.arange(0, 300, 7)
    for source in (remote, ZarrSource(local_path)):
        with pytest.raises(StoreFormatError, match="missing") as err:
            source.read(ids)
        assert f"X/{array}/2" in str(err.value)
    with pytest.raises(StoreFormatError, match=rf"chunk 'X/{array}/2' is missing") as err:
        remote.read(ids)
    assert url in str(err.value)
    # Reads that do not touch the lost chunk still work, and still match the local store.
    far = np.arange(250, 300)
    assert (remote.read(far).rna != ZarrSource(local_path).read(far).rna).nnz == 0


def test_a_truncated_chunk_object_is_an_error_naming_it(stores, s3_server):
    _, url, _ = stores
    fs = s3_server.filesystem()
    key = f"{url[len('s3://'):]}/X/data/1"
    fs.pipe(key, fs.cat(key)[:-7])
    with pytest.raises(StoreFormatError, match="truncated or corrupt") as err:
        ZarrSource(url, storage_options=s3_server.storage_options()).read(np.arange(300))
    assert "X/data/1" in str(err.value)


def test_the_connection_pool_is_sized_for_the_requests_in_flight(stores, s3_server):
    from loaders.remote_chunk_reader import FETCH_CONCURRENCY
    from loaders.zarr_source import _with_connection_pool

    options = _with_connection_pool("s3://b/x.zarr", s3_server.storage_options())
    assert options["config_kwargs"]["max_pool_connections"] == FETCH_CONCURRENCY
    assert s3_server.storage_options().get("config_kwargs", {}).get("max_pool_connections") is None  # not mutated
    mine = {"config_kwargs": {"max_pool_connections": 7}}
    assert _with_connection_pool("s3://b/x.zarr", mine) is mine
    assert _with_connection_pool("/local/x.zarr", None) is None
