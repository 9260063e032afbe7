"""Zarr stores on object storage: the same data read through a real S3-compatible server on 127.0.0.1."""

import numpy as np
import pytest
import torch

from loaders import Collection, StreamConfig, StreamLoader, ZarrSource
from loaders.ingest import ingest


@pytest.fixture
def local_and_s3_store(tmp_path, s3_server, cite):
    data = cite.make_cite(n=60)
    h5ad = tmp_path / "study.h5ad"
    cite.write_h5ad(h5ad, data)
    local = tmp_path / "study.zarr"
    ingest(h5ad, local, batch_key="batch", progress=False)
    return local, s3_server.upload(local, "bucket", tmp_path)


def _epoch(source, seed=3, epoch=1):
    collection = Collection([source], batch_key="batch", labels_key="cell_type")
    loader = StreamLoader(collection, np.arange(collection.n_obs), StreamConfig(batch_size=16, chunk_size=4,
                                                                                io_chunks=3, seed=seed))
    loader.set_epoch(epoch)
    return list(loader)


def test_s3_store_reads_the_same_rows_and_batches_as_local(local_and_s3_store, s3_server):
    local_path, url = local_and_s3_store
    local = ZarrSource(local_path)
    remote = ZarrSource(url, storage_options=s3_server.storage_options())
    assert remote.n_obs == local.n_obs
    np.testing.assert_array_equal(remote.gene_names, local.gene_names)
    np.testing.assert_array_equal(remote.protein_names, local.protein_names)
    np.testing.assert_array_equal(remote.protein_panels, local.protein_panels)
    ids = np.array([0, 1, 2, 7, 8, 30, 31, 59])
    a, b = local.read(ids), remote.read(ids)
    assert (a.rna != b.rna).nnz == 0
    np.testing.assert_array_equal(a.protein, b.protein)
    for x, y in zip(_epoch(local), _epoch(remote)):
        for field in ("rna", "protein", "protein_mask", "batch", "label", "cell_id"):
            assert torch.equal(getattr(x, field), getattr(y, field)), field


def test_s3_credentials_and_endpoint_come_from_the_usual_environment(local_and_s3_store, s3_server, monkeypatch):
    local_path, url = local_and_s3_store
    s3_server.set_environment(monkeypatch)
    remote = ZarrSource(url)  # no storage_options: botocore's usual chain supplies everything
    ids = np.arange(10, 20)
    assert (remote.read(ids).rna != ZarrSource(local_path).read(ids).rna).nnz == 0
    assert s3_server.secret not in repr(remote)


def test_missing_s3_store_is_a_clear_error(s3_server):
    from loaders.errors import LoaderError

    fs = s3_server.filesystem()
    fs.mkdir("empty-bucket")
    with pytest.raises((LoaderError, FileNotFoundError), match="empty-bucket"):
        ZarrSource("s3://empty-bucket/none.zarr", storage_options=s3_server.storage_options())
