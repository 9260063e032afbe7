"""Tests of loaders.store_writer and loaders.protein_panels: layout, incremental appends, atomicity, panels."""

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import zarr

from loaders.errors import StoreExistsError, StoreFormatError
from loaders.protein_panels import ProteinPanelDetector
from loaders.store_layout import FORMAT_VERSION, PANEL_OBS_COLUMN, StoreLayoutConfig
from loaders.store_writer import ZarrStoreWriter

SMALL = StoreLayoutConfig(chunk_cells=8, min_chunk_elements=16)


def _write(path, d, blocks=(0, 7, 20, 21, 60), **kwargs):
    with ZarrStoreWriter(path, d.genes, d.proteins, layout=SMALL, **kwargs) as w:
        for a, b in zip(blocks[:-1], blocks[1:]):
            w.append(d.rna[a:b], d.protein[a:b], d.obs.iloc[a:b])
    return w


def test_uneven_blocks_round_trip_through_anndata(tmp_path, cite):
    d = cite.make_cite()
    path = tmp_path / "s.zarr"
    _write(path, d, source_file="in.h5ad")
    a = ad.read_zarr(path)
    assert sp.issparse(a.X) and a.X.dtype == np.float32
    assert np.array_equal(a.X.toarray(), d.rna.toarray())
    assert np.array_equal(a.obsm["protein_expression"], d.protein)
    assert list(a.var_names) == d.genes and list(a.uns["protein_names"]) == d.proteins
    assert list(a.obs_names) == list(d.obs.index)
    pd.testing.assert_series_equal(a.obs["cell_type"], d.obs["cell_type"], check_categorical=False)
    assert isinstance(a.obs["batch"].dtype, pd.CategoricalDtype)
    assert np.array_equal(a.obs["n_counts"], d.obs["n_counts"])
    meta = a.uns["streamtotal"]
    assert meta["format_version"] == FORMAT_VERSION and meta["n_cells"] == 60 and meta["source_file"] == "in.h5ad"
    assert meta["protein_panels"].shape == (1, 5) and meta["protein_panels"].all()
    assert (a.obs[PANEL_OBS_COLUMN] == 0).all()


def test_integer_counts_are_stored_as_int32_and_read_back_as_the_same_float32_counts(tmp_path, cite):
    from loaders.zarr_source import ZarrSource

    d = cite.make_cite()
    path = tmp_path / "s.zarr"
    _write(path, d, integer_counts=True)
    assert zarr.open_group(str(path), mode="r")["X/data"].dtype == np.int32
    a = ad.read_zarr(path)
    assert a.X.dtype == np.int32 and np.array_equal(a.X.toarray(), d.rna.toarray())
    rows = ZarrSource(path).read(np.array([0, 5, 6, 30, 59]))
    assert rows.rna.dtype == np.float32
    assert np.array_equal(rows.rna.toarray(), d.rna[[0, 5, 6, 30, 59]].toarray())


@pytest.mark.parametrize("value", [2.5, -3.0, 2.0**31, np.nan])
def test_integer_store_refuses_a_value_int32_would_change_naming_cell_and_gene(tmp_path, cite, value):
    d = cite.make_cite(n=10)
    rna = d.rna.astype(np.float64).tocsr()
    rna.data[4] = value
    row = int(np.searchsorted(rna.indptr, 4, side="right") - 1)
    gene = d.genes[rna.indices[4]]
    w = ZarrStoreWriter(tmp_path / "s.zarr", d.genes, d.proteins, layout=SMALL, integer_counts=True)
    with pytest.raises(StoreFormatError, match=f"cell {row}, gene '{gene}' is not an integer"):
        w.append(rna, d.protein, d.obs)
    w.abort()
    assert not (tmp_path / "s.zarr").exists()


def test_chunks_follow_the_layout_and_metadata_is_consolidated(tmp_path, cite):
    d = cite.make_cite()
    path = tmp_path / "s.zarr"
    _write(path, d)
    g = zarr.open_group(str(path), mode="r")
    # The nnz chunk is sized from the first appended block (rows 0..6).
    assert g["X/data"].chunks[0] == SMALL.nnz_chunk(d.rna[:7].nnz / 7) == g["X/indices"].chunks[0]
    assert g["obsm/protein_expression"].chunks == (SMALL.row_chunk(5), 5)
    assert g["X/indptr"].dtype == np.int64 and g["X/indices"].dtype == np.int32
    assert (path / ".zmetadata").exists()


def test_string_obs_columns_become_categoricals_and_keep_missing(tmp_path, cite):
    d = cite.make_cite(n=10)
    d.obs["donor"] = ["d1", None] * 5
    path = tmp_path / "s.zarr"
    _write(path, d, blocks=(0, 10))
    donor = ad.read_zarr(path).obs["donor"]
    assert isinstance(donor.dtype, pd.CategoricalDtype) and donor.isna().sum() == 5


def test_panels_detected_per_batch_key(tmp_path, cite):
    d = cite.make_cite()
    path = tmp_path / "s.zarr"
    w = _write(path, d, panel_key="batch")
    assert w.panels.missing_by_group(d.proteins) == {"b2": ["P0", "P1"]}
    a = ad.read_zarr(path)
    panels = a.uns["streamtotal"]["protein_panels"]
    assert panels.tolist() == [[True] * 5, [False, False, True, True, True]]
    codes = a.obs[PANEL_OBS_COLUMN].to_numpy()
    assert (codes[:30] == 0).all() and (codes[30:] == 1).all()
    assert a.uns["streamtotal"]["panel_key"] == "batch"


def test_explicit_panels_override_and_are_checked(tmp_path, cite):
    d = cite.make_cite(n=10)
    w = ZarrStoreWriter(tmp_path / "s.zarr", d.genes, d.proteins, layout=SMALL)
    w.append(d.rna, d.protein, d.obs)
    with pytest.raises(StoreFormatError, match="protein_panels"):
        w.close(protein_panels=np.ones((2, 4), bool), panel_codes=np.zeros(10))
    assert not (tmp_path / "s.zarr").exists()

    w = ZarrStoreWriter(tmp_path / "s.zarr", d.genes, d.proteins, layout=SMALL)
    w.append(d.rna, d.protein, d.obs)
    panels = np.array([[True] * 5, [True, False, True, True, True]])
    w.close(protein_panels=panels, panel_codes=np.arange(10) % 2)
    a = ad.read_zarr(tmp_path / "s.zarr")
    assert np.array_equal(a.uns["streamtotal"]["protein_panels"], panels)
    assert np.array_equal(a.obs[PANEL_OBS_COLUMN], np.arange(10) % 2)


def test_bad_blocks_and_names_are_refused(tmp_path, cite):
    d = cite.make_cite(n=10)
    with pytest.raises(StoreFormatError, match="duplicate gene names.*'G1'"):
        ZarrStoreWriter(tmp_path / "a.zarr", ["G0", "G1", "G1"], d.proteins)
    w = ZarrStoreWriter(tmp_path / "a.zarr", d.genes, d.proteins, panel_key="donor")
    with pytest.raises(StoreFormatError, match="11 genes, expected 12"):
        w.append(d.rna[:, :11], d.protein, d.obs)
    with pytest.raises(StoreFormatError, match=r"protein block has shape \(10, 4\)"):
        w.append(d.rna, d.protein[:, :4], d.obs)
    with pytest.raises(StoreFormatError, match="panel key 'donor'.*batch"):
        w.append(d.rna, d.protein, d.obs)
    with pytest.raises(StoreFormatError, match="no cells"):
        w.close()
    assert list(tmp_path.iterdir()) == []


def test_exception_inside_with_leaves_nothing(tmp_path, cite):
    d = cite.make_cite(n=10)
    with pytest.raises(RuntimeError):
        with ZarrStoreWriter(tmp_path / "s.zarr", d.genes, d.proteins) as w:
            w.append(d.rna, d.protein, d.obs)
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_existing_target_kept_unless_overwrite_and_replaced_only_at_close(tmp_path, cite):
    d = cite.make_cite(n=10)
    path = tmp_path / "s.zarr"
    _write(path, d, blocks=(0, 10))
    with pytest.raises(StoreExistsError, match="overwrite=True"):
        ZarrStoreWriter(path, d.genes, d.proteins)
    d2 = cite.make_cite(n=12, seed=3)
    w = ZarrStoreWriter(path, d2.genes, d2.proteins, overwrite=True)
    w.append(d2.rna, d2.protein, d2.obs)
    assert ad.read_zarr(path).n_obs == 10  # old store still there until close
    w.close()
    assert ad.read_zarr(path).n_obs == 12
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.zarr"]


def test_panel_detector_sums_across_blocks():
    det = ProteinPanelDetector(3)
    det.update(["a", "b", "a"], np.array([[0, 1, 0], [0, 0, 0], [0, 2, 0]]))
    det.update(["b", "a", None], sp.csr_matrix(np.array([[0, 0, 4], [0, 0, 0], [1, 1, 1]])))
    res = det.result()
    assert list(res.group_names) == ["a", "b", "nan"]
    assert res.panels.tolist() == [[False, True, False], [False, False, True], [True, True, True]]
    assert res.cells_per_group.tolist() == [3, 2, 1]
    assert res.codes_for(["b", "a", None]).tolist() == [1, 0, 2]
    assert res.missing_by_group(["x", "y", "z"]) == {"a": ["x", "z"], "b": ["x", "y"]}


def test_groups_with_the_same_measured_set_share_a_panel():
    det = ProteinPanelDetector(2)
    det.update(["a", "b", "c"], np.array([[1, 1], [0, 3], [2, 2]]))
    res = det.result()
    assert len(res.panels) == 2 and res.panel_of_group.tolist() == [0, 1, 0]
