"""Tests of the result writers (loaders.obsm_writer, loaders.obs_writer, their ResultWriter lifecycle) and of
reading their results back (loaders.store_results), on real ingested Zarr stores."""

import anndata as ad
import numpy as np
import pytest

from loaders.errors import StoreFormatError
from loaders.obs_writer import ObsColumnWriter
from loaders.obsm_writer import ObsmWriter
from loaders.store_layout import StoreLayoutConfig
from loaders.store_results import has_obsm, obsm_shape, read_obs_codes, read_obs_column, read_obsm
from loaders.store_writer import ZarrStoreWriter

pytestmark = [
    pytest.mark.filterwarnings("ignore:Writing zarr v2 data will no longer be the default"),
    pytest.mark.filterwarnings("ignore:Consolidated metadata is currently not part"),
]

SMALL = StoreLayoutConfig(chunk_cells=4, min_chunk_elements=8)


@pytest.fixture
def store(tmp_path, cite):
    d = cite.make_cite(n=40)
    path = tmp_path / "s.zarr"
    with ZarrStoreWriter(path, d.genes, d.proteins, layout=SMALL) as w:
        w.append(d.rna, d.protein, d.obs)
    return path


def test_obsm_written_in_runs_reads_back_whole_and_by_rows(store):
    values = np.arange(40 * 3, dtype=np.float32).reshape(40, 3)
    with ObsmWriter(store, "X_test", 40, 3, chunk_rows=8) as w:
        w.write_rows(np.arange(20, 40), values[20:])  # two calls, the second out of order
        w.write_rows(np.array([5, 3, 4, 0, 1, 2, *range(6, 20)]), values[[5, 3, 4, 0, 1, 2, *range(6, 20)]])
    assert has_obsm(store, "X_test") and obsm_shape(store, "X_test") == (40, 3)
    assert np.array_equal(read_obsm(store, "X_test"), values)
    rows = np.array([39, 0, 17, 17])
    assert np.array_equal(read_obsm(store, "X_test", rows=rows), values[rows])
    assert np.array_equal(ad.read_zarr(store).obsm["X_test"], values)  # published where AnnData looks


def test_obs_columns_read_back_as_values_and_codes(store):
    labels = np.array(["a", "b", "c", "a"] * 10)
    codes = np.searchsorted(["a", "b", "c"], labels)
    with ObsColumnWriter(store, 40, {"pred": ["a", "b", "c"], "score": "float32"}, chunk_rows=8) as w:
        w.write_rows(np.arange(40)[::-1], {"pred": codes[::-1], "score": np.linspace(0, 1, 40)[::-1]})
    assert np.array_equal(read_obs_codes(store, "pred"), codes)
    assert list(read_obs_column(store, "pred")) == list(labels)
    assert np.allclose(read_obs_column(store, "score"), np.linspace(0, 1, 40))
    obs = ad.read_zarr(store).obs
    assert list(obs["pred"]) == list(labels) and "score" in obs.columns


def test_missing_results_are_errors_naming_store_and_element(store, tmp_path):
    assert not has_obsm(store, "nope") and obsm_shape(store, "nope") is None
    assert obsm_shape(tmp_path / "absent.zarr", "X") is None
    with pytest.raises(StoreFormatError, match=r"s\.zarr has no obsm/nope"):
        read_obsm(store, "nope")
    with pytest.raises(StoreFormatError, match="has no obs/nope"):
        read_obs_column(store, "nope")
    with pytest.raises(StoreFormatError, match="obs/n_counts is not a categorical column"):
        read_obs_codes(store, "n_counts")
    with pytest.raises(StoreFormatError, match="absent.zarr"):
        read_obsm(tmp_path / "absent.zarr", "X")


def test_error_in_with_block_aborts_a_fresh_writer_and_keeps_a_resumable_one(store):
    with pytest.raises(RuntimeError, match="boom"):
        with ObsmWriter(store, "fresh", 40, 2) as w:
            w.write_rows(np.arange(10), np.ones((10, 2)))
            raise RuntimeError("boom")
    assert not w.tmp_path.exists() and not has_obsm(store, "fresh")
    with pytest.raises(StoreFormatError, match="was aborted"):
        w.commit()

    with pytest.raises(RuntimeError, match="boom"):
        with ObsColumnWriter(store, 40, {"kept": "float32"}, resume=True) as c:
            c.write_rows(np.arange(10), {"kept": np.ones(10)})
            raise RuntimeError("boom")
    assert all(p.exists() for p in c.tmp_paths())  # left for the next run to resume
    again = ObsColumnWriter(store, 40, {"kept": "float32"}, resume=True)
    assert again.resumed
    again.abort()
    assert not any(p.exists() for p in again.tmp_paths())


def test_commit_refuses_unwritten_rows_and_keeps_published_results(store):
    with ObsmWriter(store, "X_test", 40, 1) as w:
        w.write_rows(np.arange(40), np.zeros((40, 1)))
    partial = ObsmWriter(store, "X_test", 40, 1)
    partial.write_rows(np.arange(39), np.ones((39, 1)))
    with pytest.raises(StoreFormatError, match=r"refusing to publish obsm/X_test .* 1 of 40 rows .*cell 39"):
        partial.commit()
    assert np.array_equal(read_obsm(store, "X_test"), np.zeros((40, 1)))
