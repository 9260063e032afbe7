"""Tests of loaders.h5ad_source: backed h5ad/h5mu reads equal the input and the ZarrSource of the same data."""

import pickle

import h5py
import numpy as np
import pytest
import scipy.sparse as sp

from loaders.errors import InvalidCountsError, InvalidIdsError, StoreFormatError
from loaders.h5ad_source import H5adSource
from loaders.ingest import ingest
from loaders.source import Source
from loaders.zarr_source import ZarrSource


def _assert_reads(src, d, cite, seed=0, n_reads=6):
    rng = np.random.default_rng(seed)
    for _ in range(n_reads):
        ids = cite.sorted_ids_with_runs(rng, len(d.obs))
        rows = src.read(ids)
        assert sp.isspmatrix_csr(rows.rna) and rows.rna.dtype == np.float32 and rows.protein.dtype == np.float32
        assert np.array_equal(rows.rna.toarray(), d.rna[ids].toarray())
        assert np.array_equal(rows.protein, d.protein[ids])


def test_h5ad_source_equals_zarr_source_on_the_same_data(tmp_path, cite):
    d = cite.make_cite(n=90)
    cite.write_h5ad(tmp_path / "pbmc.h5ad", d)
    ingest(tmp_path / "pbmc.h5ad", tmp_path / "pbmc.zarr", progress=False)
    h5, zs = H5adSource(tmp_path / "pbmc.h5ad"), ZarrSource(tmp_path / "pbmc.zarr")
    assert isinstance(h5, Source) and h5.location == str(tmp_path / "pbmc.h5ad")
    assert (h5.name, h5.n_obs) == (zs.name, zs.n_obs) == ("pbmc", 90)
    assert list(h5.gene_names) == list(zs.gene_names) and list(h5.protein_names) == list(zs.protein_names)
    assert h5.obs_columns == zs.obs_columns
    for col in h5.obs_columns:
        assert np.array_equal(h5.obs_column(col), zs.obs_column(col))
    assert np.array_equal(h5.protein_panel_codes(), zs.protein_panel_codes())
    assert np.array_equal(h5.protein_panels, zs.protein_panels)
    rng = np.random.default_rng(3)
    for _ in range(6):
        ids = cite.sorted_ids_with_runs(rng, 90)
        a, b = h5.read(ids), zs.read(ids)
        assert (a.rna != b.rna).nnz == 0 and np.array_equal(a.protein, b.protein)
    _assert_reads(h5, d, cite)


def test_dense_x_protein_dataframe_and_counts_layer(tmp_path, cite):
    d = cite.make_cite()
    a = cite.to_anndata(d, dense_x=True, protein_as_df=True)
    a.layers["counts"] = a.X.copy()
    a.X = a.X * 0.5
    a.write_h5ad(tmp_path / "x.h5ad", compression="gzip")
    src = H5adSource(tmp_path / "x.h5ad", rna_layer="counts")
    assert list(src.protein_names) == d.proteins
    _assert_reads(src, d, cite)


def test_h5mu_file(tmp_path, cite):
    d = cite.make_cite()
    cite.to_mudata(d).write_h5mu(tmp_path / "m.h5mu")
    src = H5adSource(tmp_path / "m.h5mu")
    assert src.obs_columns == ["batch", "n_counts", "cell_type"]
    _assert_reads(src, d, cite)


def test_errors(tmp_path, cite):
    d = cite.make_cite(n=20)
    d.protein[7, 3] = np.nan
    a = cite.to_anndata(d)
    a.write_h5ad(tmp_path / "bad.h5ad")
    src = H5adSource(tmp_path / "bad.h5ad")
    with pytest.raises(InvalidCountsError, match="'bad'.*'cell7' \\(index 7\\).*protein 'P3'.*NaN"):
        src.read(np.array([6, 7]))
    with pytest.raises(InvalidIdsError):
        src.read(np.array([5, 4]))
    with pytest.raises(StoreFormatError, match="no obs column 'x'"):
        src.obs_column("x")
    a.obsm["adt"] = a.obsm.pop("protein_expression")
    a.write_h5ad(tmp_path / "other.h5ad")
    with pytest.raises(StoreFormatError, match=r"no protein matrix at obsm/protein_expression.*\['adt'\]"):
        H5adSource(tmp_path / "other.h5ad")
    with pytest.raises(StoreFormatError, match="cannot open"):
        H5adSource(tmp_path / "missing.h5ad")


def test_csc_x_refused_with_advice(tmp_path, cite):
    a = cite.to_anndata(cite.make_cite(n=10))
    a.X = sp.csc_matrix(a.X)
    a.write_h5ad(tmp_path / "csc.h5ad")
    with pytest.raises(StoreFormatError, match="CSC.*tocsr"):
        H5adSource(tmp_path / "csc.h5ad")


def test_pickle_and_reopen_after_close(tmp_path, cite):
    d = cite.make_cite(n=30)
    cite.write_h5ad(tmp_path / "s.h5ad", d)
    src = H5adSource(tmp_path / "s.h5ad")
    clone = pickle.loads(pickle.dumps(src))
    _assert_reads(clone, d, cite, n_reads=2)
    src.close()
    _assert_reads(src, d, cite, n_reads=2)  # reads re-open the file
    with h5py.File(tmp_path / "s.h5ad", "r") as f:  # and no handle blocks other readers
        assert "X" in f


def test_concurrent_reads_after_close_are_correct(tmp_path, cite):
    d = cite.make_cite(n=40)
    cite.write_h5ad(tmp_path / "s.h5ad", d)
    cite.assert_concurrent_reads_after_close(H5adSource(tmp_path / "s.h5ad"), d.rna, d.protein)
