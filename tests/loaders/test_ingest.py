"""Tests of loaders.ingest: every input format round-trips exactly; bad inputs fail clearly and atomically."""

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from loaders.errors import InvalidCountsError, StoreExistsError, StoreFormatError
from loaders.ingest import detect_format, ingest
from loaders.store_layout import PANEL_OBS_COLUMN
from loaders.zarr_source import ZarrSource


def _assert_store_equals(path, d, cite, obs_columns=("batch", "cell_type", "n_counts")):
    """The store holds exactly d's counts, names and obs; columns are compared by name (a 10x file may
    interleave genes and antibodies, and the store keeps the file's order)."""
    a = ad.read_zarr(path)
    gene_pos = [list(a.var_names).index(g) for g in d.genes]
    prot_pos = [list(a.uns["protein_names"]).index(p) for p in d.proteins]
    assert sorted(a.var_names) == sorted(d.genes) and len(a.uns["protein_names"]) == len(d.proteins)
    assert np.array_equal(a.X.toarray()[:, gene_pos], d.rna.toarray())
    assert np.array_equal(a.obsm["protein_expression"][:, prot_pos], d.protein)
    assert list(a.obs_names) == list(d.obs.index)
    for col in obs_columns:
        assert np.array_equal(a.obs[col].astype(object).fillna("<na>"), d.obs[col].astype(object).fillna("<na>"))
    src = ZarrSource(path)
    rng = np.random.default_rng(0)
    for _ in range(5):
        ids = cite.sorted_ids_with_runs(rng, len(d.obs))
        rows = src.read(ids)
        assert np.array_equal(rows.rna.toarray()[:, gene_pos], d.rna[ids].toarray())
        assert np.array_equal(rows.protein[:, prot_pos], d.protein[ids])
    return a


def test_h5ad_round_trip_with_batch_panels_and_report(tmp_path, cite):
    d = cite.make_cite()
    cite.write_h5ad(tmp_path / "in.h5ad", d)
    report = ingest(tmp_path / "in.h5ad", tmp_path / "s.zarr", batch_key="batch", block_cells=16, progress=False)
    _assert_store_equals(tmp_path / "s.zarr", d, cite)
    assert (report.n_cells, report.n_genes, report.n_proteins) == (60, 12, 5)
    assert report.input_format == "h5ad" and report.batches == {"b1": 30, "b2": 30}
    assert report.missing_proteins == {"b2": ["P0", "P1"]} and report.n_panels == 2
    assert report.label_columns["cell_type"].n_missing == 1 and report.label_columns["cell_type"].n_categories == 3
    text = str(report)
    assert "60 cells x 12 genes, 5 proteins" in text and "b2: not measured: P0, P1" in text
    src = ZarrSource(tmp_path / "s.zarr")
    assert src.protein_panels.tolist() == [[True] * 5, [False, False, True, True, True]]
    assert np.array_equal(src.protein_panel_codes(), (np.arange(60) >= 30).astype(int))


def test_h5ad_dense_x_counts_layer_and_protein_dataframe(tmp_path, cite):
    d = cite.make_cite()
    a = cite.to_anndata(d, protein_as_df=True, dense_x=True)
    a.layers["counts"] = a.X.copy()
    a.X = np.log1p(a.X) + 0.5  # normalised values in X: must not be what gets ingested
    a.write_h5ad(tmp_path / "in.h5ad")
    ingest(tmp_path / "in.h5ad", tmp_path / "s.zarr", rna_layer="counts", block_cells=7, progress=False)
    _assert_store_equals(tmp_path / "s.zarr", d, cite)
    with pytest.raises(InvalidCountsError, match="not an integer"):
        ingest(tmp_path / "in.h5ad", tmp_path / "t.zarr", progress=False)
    with pytest.raises(StoreFormatError, match=r"rna_layer 'raw'.*\['counts'\]"):
        ingest(tmp_path / "in.h5ad", tmp_path / "t.zarr", rna_layer="raw", progress=False)


def test_h5mu_round_trip(tmp_path, cite):
    d = cite.make_cite()
    cite.to_mudata(d).write_h5mu(tmp_path / "in.h5mu")
    report = ingest(tmp_path / "in.h5mu", tmp_path / "s.zarr", batch_key="batch", block_cells=25, progress=False)
    assert report.input_format == "h5mu" and report.missing_proteins == {"b2": ["P0", "P1"]}
    _assert_store_equals(tmp_path / "s.zarr", d, cite)


def test_tenx_h5_round_trip_with_interleaved_features(tmp_path, cite):
    d = cite.make_cite()
    cite.write_tenx_h5(tmp_path / "filtered_feature_bc_matrix.h5", d)
    report = ingest(tmp_path / "filtered_feature_bc_matrix.h5", tmp_path / "s.zarr", block_cells=9, progress=False)
    assert report.input_format == "10x_h5" and any("CRISPR" in n for n in report.notes)
    _assert_store_equals(tmp_path / "s.zarr", d, cite, obs_columns=())
    ingest(tmp_path / "filtered_feature_bc_matrix.h5", tmp_path / "ids.zarr", gene_name_field="id", progress=False)
    assert ZarrSource(tmp_path / "ids.zarr").gene_names[0].startswith("ENSG")


def test_tenx_without_antibody_capture_is_refused(tmp_path, cite):
    d = cite.make_cite(n=8)
    cite.write_tenx_h5(tmp_path / "rna_only.h5", d, with_proteins=False)
    with pytest.raises(StoreFormatError, match=r"rna_only.h5: no 'Antibody Capture'.*CRISPR Guide Capture"):
        ingest(tmp_path / "rna_only.h5", tmp_path / "s.zarr", progress=False)
    assert not (tmp_path / "s.zarr").exists()


@pytest.mark.parametrize(
    "modality, value, word, column",
    [
        ("rna", np.nan, "NaN", "gene 'G4'"),
        ("rna", -2.0, "negative", "gene 'G4'"),
        ("protein", 1.5, "not an integer", "protein 'P4'"),
    ],
)
def test_bad_counts_refused_naming_file_cell_and_column(tmp_path, cite, modality, value, word, column):
    d = cite.make_cite()
    if modality == "rna":
        dense = d.rna.toarray()
        dense[41, 4] = value
        d.rna = sp.csr_matrix(dense)
    else:
        d.protein[41, 4] = value
    cite.write_h5ad(tmp_path / "bad.h5ad", d)
    with pytest.raises(InvalidCountsError) as err:
        ingest(tmp_path / "bad.h5ad", tmp_path / "s.zarr", block_cells=16, progress=False)
    msg = str(err.value)
    for part in ("bad.h5ad", "'cell41' (index 41)", column, word):
        assert part in msg, (part, msg)
    assert list(tmp_path.iterdir()) == [tmp_path / "bad.h5ad"]  # no store, no temporary left behind


def test_non_integer_counts_accepted_with_flag(tmp_path, cite):
    d = cite.make_cite()
    d.rna.data = d.rna.data * 0.75
    cite.write_h5ad(tmp_path / "ambient.h5ad", d)
    with pytest.raises(InvalidCountsError, match="allow_non_integer=True"):
        ingest(tmp_path / "ambient.h5ad", tmp_path / "s.zarr", progress=False)
    ingest(tmp_path / "ambient.h5ad", tmp_path / "s.zarr", allow_non_integer=True, progress=False)
    _assert_store_equals(tmp_path / "s.zarr", d, cite)


def test_missing_protein_matrix_names_file_and_existing_keys(tmp_path, cite):
    a = cite.to_anndata(cite.make_cite(n=10))
    a.obsm["X_umap"] = np.zeros((10, 2))
    a.obsm["adt"] = a.obsm.pop("protein_expression")
    a.write_h5ad(tmp_path / "in.h5ad")
    expected = r"in.h5ad: no protein matrix at obsm/protein_expression.*\['X_umap', 'adt'\]"
    with pytest.raises(StoreFormatError, match=expected):
        ingest(tmp_path / "in.h5ad", tmp_path / "s.zarr", progress=False)
    ingest(tmp_path / "in.h5ad", tmp_path / "s.zarr", protein_key="adt", progress=False)


@pytest.mark.filterwarnings("ignore:Variable names are not unique")
def test_duplicate_names_refused_unless_made_unique(tmp_path, cite):
    d = cite.make_cite(n=10)
    d.genes[3] = d.genes[2]
    cite.write_h5ad(tmp_path / "in.h5ad", d)
    with pytest.raises(StoreFormatError, match="duplicate gene names.*'G2'.*make_names_unique"):
        ingest(tmp_path / "in.h5ad", tmp_path / "s.zarr", progress=False)
    ingest(tmp_path / "in.h5ad", tmp_path / "s.zarr", make_names_unique=True, progress=False)
    assert list(ZarrSource(tmp_path / "s.zarr").gene_names[2:4]) == ["G2", "G2-1"]


def test_empty_input_refused(tmp_path, cite):
    d = cite.make_cite(n=10)
    cite.to_anndata(d)[:0].copy().write_h5ad(tmp_path / "empty.h5ad")
    with pytest.raises(StoreFormatError, match="empty.h5ad: the input holds no cells"):
        ingest(tmp_path / "empty.h5ad", tmp_path / "s.zarr", progress=False)
    assert not (tmp_path / "s.zarr").exists()


def test_missing_batch_key_lists_columns(tmp_path, cite):
    cite.write_h5ad(tmp_path / "in.h5ad", cite.make_cite(n=10))
    with pytest.raises(StoreFormatError, match=r"batch_key 'donor'.*\['batch', 'cell_type', 'n_counts'\]"):
        ingest(tmp_path / "in.h5ad", tmp_path / "s.zarr", batch_key="donor", progress=False)


def test_existing_target_not_clobbered_unless_overwrite(tmp_path, cite):
    d = cite.make_cite()
    cite.write_h5ad(tmp_path / "in.h5ad", d)
    ingest(tmp_path / "in.h5ad", tmp_path / "s.zarr", progress=False)
    marker = tmp_path / "s.zarr" / "marker"
    marker.write_text("old")
    with pytest.raises(StoreExistsError, match="overwrite=True"):
        ingest(tmp_path / "in.h5ad", tmp_path / "s.zarr", progress=False)
    assert marker.exists()
    # A failing ingest with overwrite=True keeps the old store.
    bad = cite.make_cite()
    bad.protein[50, 0] = np.nan
    cite.write_h5ad(tmp_path / "bad.h5ad", bad)
    with pytest.raises(InvalidCountsError):
        ingest(tmp_path / "bad.h5ad", tmp_path / "s.zarr", overwrite=True, block_cells=8, progress=False)
    assert marker.exists()
    ingest(tmp_path / "in.h5ad", tmp_path / "s.zarr", overwrite=True, progress=False)
    assert not marker.exists()
    _assert_store_equals(tmp_path / "s.zarr", d, cite)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.h5ad", "in.h5ad", "s.zarr"]


def test_detect_format(tmp_path, cite):
    d = cite.make_cite(n=6)
    cite.write_h5ad(tmp_path / "a.h5ad", d)
    cite.to_mudata(d).write_h5mu(tmp_path / "b.h5mu")
    cite.write_tenx_h5(tmp_path / "c.h5", d)
    (tmp_path / "d.txt").write_text("x")
    assert [detect_format(tmp_path / n) for n in ("a.h5ad", "b.h5mu", "c.h5")] == ["h5ad", "h5mu", "10x_h5"]
    with pytest.raises(StoreFormatError, match="not an HDF5 file"):
        detect_format(tmp_path / "d.txt")
    with pytest.raises(StoreFormatError, match="not found"):
        detect_format(tmp_path / "nope.h5ad")


def test_obs_panel_column_is_written(tmp_path, cite):
    cite.write_h5ad(tmp_path / "in.h5ad", cite.make_cite())
    ingest(tmp_path / "in.h5ad", tmp_path / "s.zarr", batch_key="batch", progress=False)
    with h5py.File(tmp_path / "in.h5ad") as f:
        assert PANEL_OBS_COLUMN not in f["obs"]
    obs = ad.read_zarr(tmp_path / "s.zarr").obs
    assert obs[PANEL_OBS_COLUMN].tolist() == [0] * 30 + [1] * 30
    assert isinstance(obs["batch"].dtype, pd.CategoricalDtype)
