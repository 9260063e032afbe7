"""Stores written to object storage (a real S3-compatible server, moto, on 127.0.0.1): visible only complete."""

import socket

import numpy as np
import pytest

from loaders import ZarrSource
from loaders.errors import InvalidCountsError, ObjectStoreError, StoreExistsError, StoreFormatError
from loaders.ingest import ingest
from loaders.object_store import ObjectPath
from loaders.prefix_publish import ROOT_METADATA


@pytest.fixture
def bucket(s3_server, monkeypatch, tmp_path):
    """A fresh bucket, botocore's usual environment pointing at the server, and the working directory in tmp_path
    (where a store wrongly written locally would appear as ``s3:/...``)."""
    s3_server.set_environment(monkeypatch)
    monkeypatch.chdir(tmp_path)
    return s3_server.new_bucket("stores", tmp_path)


@pytest.fixture
def h5ad(tmp_path, cite):
    data = cite.make_cite(n=60)
    path = tmp_path / "study.h5ad"
    cite.write_h5ad(path, data)
    return path


def _same_rows(a: ZarrSource, b: ZarrSource) -> None:
    assert a.n_obs == b.n_obs
    np.testing.assert_array_equal(a.gene_names, b.gene_names)
    np.testing.assert_array_equal(a.protein_panels, b.protein_panels)
    ids = np.arange(a.n_obs)
    x, y = a.read(ids), b.read(ids)
    assert (x.rna != y.rna).nnz == 0
    np.testing.assert_array_equal(x.protein, y.protein)


def test_ingest_to_s3_writes_the_same_store_as_locally_and_leaves_no_temporary(h5ad, bucket, s3_server, tmp_path):
    url = f"s3://{bucket}/studies/study.zarr"
    ingest(h5ad, url, batch_key="batch", progress=False)
    ingest(h5ad, tmp_path / "local.zarr", batch_key="batch", progress=False)
    _same_rows(ZarrSource(url), ZarrSource(tmp_path / "local.zarr"))
    fs = s3_server.filesystem()
    assert fs.ls(f"{bucket}/studies", refresh=True) == [f"{bucket}/studies/study.zarr"]
    assert not (tmp_path / "s3:").exists()

    with pytest.raises(StoreExistsError, match="study.zarr"):
        ingest(h5ad, url, batch_key="batch", progress=False)
    ingest(h5ad, url, progress=False, overwrite=True)  # no batch key: one panel
    assert ZarrSource(url).protein_panels.shape[0] == 1
    assert fs.ls(f"{bucket}/studies", refresh=True) == [f"{bucket}/studies/study.zarr"]


def test_a_store_whose_publication_was_cut_short_is_never_opened(h5ad, bucket, s3_server):
    """The state a job killed while publishing leaves: every object but the root group marker."""
    ingest(h5ad, f"s3://{bucket}/done.zarr", batch_key="batch", progress=False)
    fs = s3_server.filesystem()
    fs.copy(f"{bucket}/done.zarr", f"{bucket}/cut.zarr", recursive=True)
    present = [f"{bucket}/cut.zarr/{name}" for name in ROOT_METADATA if fs.exists(f"{bucket}/cut.zarr/{name}")]
    assert present, "the store had no root metadata to remove"
    fs.rm(present)
    fs.invalidate_cache()
    with pytest.raises(StoreFormatError, match="cut.zarr"):
        ZarrSource(f"s3://{bucket}/cut.zarr")
    with pytest.raises(StoreExistsError, match="cut.zarr"):  # not silently mixed with a new one
        ingest(h5ad, f"s3://{bucket}/cut.zarr", progress=False)
    ingest(h5ad, f"s3://{bucket}/cut.zarr", batch_key="batch", progress=False, overwrite=True)
    _same_rows(ZarrSource(f"s3://{bucket}/cut.zarr"), ZarrSource(f"s3://{bucket}/done.zarr"))


def test_a_failed_ingest_leaves_nothing_in_the_bucket(tmp_path, cite, bucket, s3_server):
    data = cite.make_cite(n=60)
    data.rna.data[7] = np.nan
    bad = tmp_path / "bad.h5ad"
    cite.write_h5ad(bad, data)
    with pytest.raises(InvalidCountsError, match="NaN"):
        ingest(bad, f"s3://{bucket}/bad.zarr", progress=False)
    assert s3_server.filesystem().ls(bucket, refresh=True) == []


def test_a_missing_bucket_is_named(h5ad, bucket):
    with pytest.raises(ObjectStoreError, match="bucket 'no-such-bucket' does not exist"):
        ingest(h5ad, "s3://no-such-bucket/x.zarr", progress=False)


def test_an_unreachable_endpoint_is_named_after_one_attempt(s3_server):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    # Explicit options (fsspec caches a filesystem per options, so the environment of this process would not
    # reach an instance made earlier); one attempt, as AWS_MAX_ATTEMPTS=1 gives a command.
    options = {"key": s3_server.key, "secret": s3_server.secret, "client_kwargs": {"endpoint_url": closed},
               "config_kwargs": {"retries": {"max_attempts": 1}}}
    with pytest.raises(ObjectStoreError, match=f"cannot reach {closed}"):
        ZarrSource("s3://some-bucket/x.zarr", storage_options=options)
    with pytest.raises(ObjectStoreError, match=f"cannot reach {closed}"):
        ObjectPath("s3://some-bucket/run/model.pt", options).is_file()
    with pytest.raises(ObjectStoreError, match=f"cannot reach {closed}"):
        ObjectPath("s3://some-bucket/run", options).mkdir()
