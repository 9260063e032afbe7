"""Stores for object storage: ingest writes ~2,048-cell chunks there, and streams left to their defaults read runs
of a stored chunk's cells from it (each chunk is one request), 64-cell runs from local disk (issue 18, part 1)."""

import numpy as np
import pytest
import torch
import zarr

from loaders import Collection, StreamConfig, StreamLoader, ZarrSource
from loaders.errors import ConfigError
from loaders.ingest import ingest
from loaders.read_unit import DEFAULT_IO_CELLS, MAX_IO_CELLS, MIN_RUNS_PER_GROUP, default_io_chunks
from loaders.store_layout import MAX_CHUNK_ELEMENTS_PER_CELL, OBJECT_STORAGE_CHUNK_CELLS, StoreLayoutConfig
from streamtotal.cli.main import main

LAYOUT = StoreLayoutConfig(chunk_cells=100, min_chunk_elements=8)
"""Small data, chunks of ~100 cells: a run of the shuffle then spans several stored rows' worth of requests."""


@pytest.fixture
def stores(tmp_path, s3_server, cite):
    """``(local path, s3 URL)``: one 700-cell store, on disk and uploaded to the moto server."""
    data = cite.make_cite(n=700, n_genes=40, n_proteins=6, seed=4)
    cite.write_h5ad(tmp_path / "study.h5ad", data)
    local = tmp_path / "study.zarr"
    ingest(tmp_path / "study.h5ad", local, batch_key="batch", layout=LAYOUT, progress=False)
    return local, s3_server.upload(local, "unit", tmp_path)


def _loader(source, config):
    collection = Collection([source], batch_key="batch")
    loader = StreamLoader(collection, np.arange(collection.n_obs), config)
    loader.set_epoch(2)
    return loader


def test_remote_streams_read_runs_of_a_stored_chunk_and_local_ones_64(stores, s3_server):
    local_path, url = stores
    local, remote = ZarrSource(local_path), ZarrSource(url, storage_options=s3_server.storage_options())
    assert local.read_unit_cells is None
    unit = remote.read_unit_cells
    # Estimated from the stored data chunk and the mean non-zeros per cell, as the readers count chunk cells.
    assert unit == remote._rna.chunk_cells and 80 <= unit <= 120
    on_disk = _loader(local, StreamConfig(batch_size=64, seed=3)).config
    assert (on_disk.chunk_size, on_disk.io_chunks) == (64, 64)
    on_s3 = _loader(remote, StreamConfig(batch_size=64, seed=3))
    assert on_s3.config.chunk_size == unit and on_s3.config.io_chunks == default_io_chunks(unit) == -(-4096 // unit)
    assert on_s3.config.io_cells >= 4096 and on_s3.config.io_chunks >= 32
    # Explicit values are kept; the resolved ones are what resume checks (the loader's fingerprint).
    explicit = _loader(remote, StreamConfig(batch_size=64, seed=3, chunk_size=16, io_chunks=4)).config
    assert (explicit.chunk_size, explicit.io_chunks) == (16, 4)
    assert on_s3.state_dict()["fingerprint"]["chunk_size"] == unit
    # The epoch covers every cell once, and is exactly the local store's epoch with the same resolved settings.
    same_on_disk = _loader(local, StreamConfig(batch_size=64, seed=3, chunk_size=unit, io_chunks=-(-4096 // unit)))
    ids = []
    for x, y in zip(on_s3, same_on_disk, strict=True):
        for field in ("rna", "protein", "protein_mask", "batch", "cell_id"):
            assert torch.equal(getattr(x, field), getattr(y, field)), field
        ids.append(x.cell_id.numpy())
    assert np.array_equal(np.sort(np.concatenate(ids)), np.arange(700))


def test_io_groups_hold_32_runs_and_4096_cells_without_passing_32768_cells_of_long_runs():
    """Local 64-cell runs: 64 a group. Object storage: 32 runs of 1,024 cells (stores ingested before 2,048 became
    the default stream as they did), 16 of 2,048, 8 of 4,096: the memory bound never passes 32,768 cells."""
    assert [default_io_chunks(c) for c in (64, 100, 1021, 1024, 2042, 2048, 4096)] == [64, 41, 32, 32, 16, 16, 8]
    for chunk in range(1, 4097):
        runs = default_io_chunks(chunk)
        assert runs * chunk >= DEFAULT_IO_CELLS  # enough cells to mix
        assert runs * chunk <= max(MAX_IO_CELLS, DEFAULT_IO_CELLS + chunk)  # the memory bound
        assert runs >= min(MIN_RUNS_PER_GROUP, MAX_IO_CELLS // chunk)  # as many places as the bound allows


def test_unresolved_sizes_are_refused_where_a_number_is_needed():
    with pytest.raises(ConfigError, match="resolved"):
        StreamConfig().io_cells
    with pytest.raises(ConfigError, match="chunk_size"):
        StreamConfig(chunk_size=0)


def test_ingest_writes_object_storage_chunks_to_s3_and_cli_chunk_cells_sets_them(tmp_path, s3_server, cite,
                                                                                monkeypatch):
    assert StoreLayoutConfig.for_destination(tmp_path / "a.zarr").chunk_cells == 64
    assert StoreLayoutConfig.for_destination("s3://b/a.zarr").chunk_cells == OBJECT_STORAGE_CHUNK_CELLS == 2048
    assert StoreLayoutConfig.for_destination("s3://b/a.zarr", 256).chunk_cells == 256
    # Chunks of many cells are not cut down by the element cap meant for dense data: 2,048 cells at up to 2,048
    # elements a cell; the local default keeps the 1 Mi cap.
    assert StoreLayoutConfig.for_destination("s3://b/a.zarr").max_chunk_elements == 2048 * MAX_CHUNK_ELEMENTS_PER_CELL
    assert StoreLayoutConfig.for_destination(tmp_path / "a.zarr").max_chunk_elements == 1 << 20
    assert StoreLayoutConfig.for_destination(tmp_path / "a.zarr").nnz_chunk(800.0) == 64 * 800
    assert StoreLayoutConfig.for_destination("s3://b/a.zarr").nnz_chunk(800.0) == 2048 * 800
    # Proteins (6 columns) are stored in chunks of max(chunk_cells, 16,384 / 6) rows: 4,096 shows the setting.
    data = cite.make_cite(n=300, n_genes=40, n_proteins=6, seed=1)
    cite.write_h5ad(tmp_path / "study.h5ad", data)
    s3_server.set_environment(monkeypatch)
    bucket = s3_server.new_bucket("ingest", tmp_path)
    ingest(tmp_path / "study.h5ad", f"s3://{bucket}/s.zarr", batch_key="batch", progress=False)
    on_s3 = zarr.open_group(f"s3://{bucket}/s.zarr", mode="r", storage_options=s3_server.storage_options())
    mean_nnz = on_s3["X/indptr"][-1] / 300
    assert on_s3["X/data"].chunks[0] == max(16_384, round(mean_nnz * OBJECT_STORAGE_CHUNK_CELLS))
    assert main(["ingest", str(tmp_path / "study.h5ad"), "--out", str(tmp_path / "big.zarr"), "--chunk-cells",
                 "4096", "--no-progress"]) == 0
    assert main(["ingest", str(tmp_path / "study.h5ad"), "--out", str(tmp_path / "default.zarr"),
                 "--no-progress"]) == 0
    assert zarr.open_group(tmp_path / "big.zarr", mode="r")["obsm/protein_expression"].chunks[0] == 4096
    assert zarr.open_group(tmp_path / "default.zarr", mode="r")["obsm/protein_expression"].chunks[0] == 16_384 // 6
    assert main(["ingest", str(tmp_path / "study.h5ad"), "--out", str(tmp_path / "bad.zarr"), "--chunk-cells",
                 "0", "--no-progress"]) == 2
    assert not (tmp_path / "bad.zarr").exists()


def test_a_store_with_object_storage_chunks_reads_cell_for_cell_like_the_default_layout(tmp_path, cite):
    """The layout is storage only: the same h5ad ingested with 64-cell and with 2,048-cell chunks streams the same
    batches under the same stream settings, and every cell's row is the same."""
    data = cite.make_cite(n=2500, n_genes=50, n_proteins=7, seed=9)
    cite.write_h5ad(tmp_path / "study.h5ad", data)
    small, large = tmp_path / "small.zarr", tmp_path / "large.zarr"
    # min_chunk_elements small: on this little data the default floor of 16,384 entries would make both alike.
    for path, cells in ((small, 64), (large, OBJECT_STORAGE_CHUNK_CELLS)):
        ingest(tmp_path / "study.h5ad", path, batch_key="batch", progress=False,
               layout=StoreLayoutConfig(chunk_cells=cells, min_chunk_elements=8))
    big_chunk, small_chunk = (ZarrSource(path)._rna.chunk_cells for path in (large, small))
    assert big_chunk >= 8 * small_chunk  # ~2,048 vs ~64 cells a stored RNA chunk
    config = StreamConfig(batch_size=128, seed=1, chunk_size=100, io_chunks=8)
    for x, y in zip(_loader(ZarrSource(small), config), _loader(ZarrSource(large), config), strict=True):
        for field in ("rna", "protein", "protein_mask", "batch", "cell_id"):
            assert torch.equal(getattr(x, field), getattr(y, field)), field
    ids = np.sort(np.random.default_rng(0).permutation(2500)[:700])
    a = Collection([ZarrSource(small)], batch_key="batch").read(ids)
    b = Collection([ZarrSource(large)], batch_key="batch").read(ids)
    for field in ("rna", "protein", "protein_mask", "batch", "cell_id"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field
    assert a.rna.sum() > 0 and np.array_equal(a.cell_id.numpy(), ids)
