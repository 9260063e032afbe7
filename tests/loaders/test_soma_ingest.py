"""Tests of the TileDB-SOMA ingest (loaders.ingest.soma_ingest, soma_writer): new Experiments, appends of
further studies (union var, panels, refusals), interrupted appends, invalid counts, 10x input."""

import os

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import tiledbsoma

from loaders.errors import InvalidCountsError, StoreExistsError, StoreFormatError
from loaders.ingest.soma_ingest import ingest_soma
from loaders.soma_layout import METADATA_KEY, SomaMetadata
from loaders.soma_source import SomaSource, open_soma_sources


def _second_study(cite):
    """Study 2: a new gene and a new protein, lacks P4 and G11; its own obs columns (no n_counts)."""
    d = cite.make_cite(n=31, seed=5)
    d.genes = [g if g != "G11" else "G_new" for g in d.genes]
    d.proteins = [p if p != "P4" else "CD_new" for p in d.proteins]
    d.obs = d.obs.drop(columns=["n_counts"])
    d.obs.index = [f"s2_{i}" for i in range(31)]
    return d


def _metadata(uri) -> SomaMetadata:
    with tiledbsoma.Experiment.open(str(uri)) as exp:
        return SomaMetadata.from_json(exp.metadata[METADATA_KEY], str(uri))


def test_new_experiment_reports_and_is_atomic(tmp_path, cite):
    d = cite.make_cite(n=50)
    cite.write_h5ad(tmp_path / "a.h5ad", d)
    out = tmp_path / "out" / "a.soma"
    report = ingest_soma(tmp_path / "a.h5ad", out, batch_key="batch", block_cells=16, progress=False)
    assert (report.n_cells, report.n_genes, report.n_proteins, report.n_panels) == (50, 12, 5, 2)
    assert report.missing_proteins == {"b2": ["P0", "P1"]} and "cell_type" in report.label_columns
    assert sorted(os.listdir(out.parent)) == ["a.soma"]  # no temporary directory left
    meta = _metadata(out)
    assert [s["name"] for s in meta.studies] == ["a"] and meta.studies[0]["n_cells"] == 50
    with pytest.raises(StoreExistsError, match="append=True"):
        ingest_soma(tmp_path / "a.h5ad", out, progress=False)
    # overwrite replaces; a failing ingest leaves neither a target nor a temporary directory.
    ingest_soma(tmp_path / "a.h5ad", out, overwrite=True, study_name="again", progress=False)
    assert set(SomaSource(out).obs_column("_study")) == {"again"}
    bad = cite.make_cite(n=20)
    bad.rna = bad.rna.tolil()
    bad.rna[17, 2] = 0.5
    bad.rna = sp.csr_matrix(bad.rna)
    cite.write_h5ad(tmp_path / "bad.h5ad", bad)
    with pytest.raises(InvalidCountsError, match=r"cell 'cell17'.*gene 'G2'"):
        ingest_soma(tmp_path / "bad.h5ad", tmp_path / "out" / "bad.soma", block_cells=8, progress=False)
    assert sorted(os.listdir(out.parent)) == ["a.soma"]


def test_append_registers_new_genes_and_proteins_and_masks_panels(tmp_path, cite):
    d1, d2 = cite.make_cite(n=40), _second_study(cite)
    cite.write_h5ad(tmp_path / "s1.h5ad", d1)
    cite.write_h5ad(tmp_path / "s2.h5ad", d2)
    uri = tmp_path / "atlas.soma"
    ingest_soma(tmp_path / "s1.h5ad", uri, batch_key="batch", block_cells=16, progress=False)
    report = ingest_soma(tmp_path / "s2.h5ad", uri, append=True, batch_key="batch", block_cells=7, progress=False)
    assert any("registered 1 new genes and 1 new proteins" in n and "40..70" in n for n in report.notes)

    whole = SomaSource(uri)
    assert whole.n_obs == 71
    assert list(whole.gene_names) == d1.genes + ["G_new"]
    assert list(whole.protein_names) == d1.proteins + ["CD_new"]
    # Study 1 cells: the new gene is absent (zero) and the new protein masked; study 2 cells: G11 zero, P4 masked.
    rows = whole.read(np.arange(71))
    g2 = [d1.genes.index(g) if g in d1.genes else 12 for g in d2.genes]
    p2 = [d1.proteins.index(p) if p in d1.proteins else 5 for p in d2.proteins]
    expected_rna = np.zeros((71, 13), np.float32)
    expected_rna[:40, :12] = d1.rna.toarray()
    expected_rna[40:, g2] = d2.rna.toarray()
    expected_protein = np.zeros((71, 6), np.float32)
    expected_protein[:40, :5] = d1.protein
    expected_protein[40:, p2] = d2.protein
    assert np.array_equal(rows.rna.toarray(), expected_rna) and np.array_equal(rows.protein, expected_protein)
    masks = whole.protein_panels[whole.protein_panel_codes()]
    b2_1, b2_2 = d1.obs["batch"].to_numpy() == "b2", d2.obs["batch"].to_numpy() == "b2"
    assert not masks[:40, 5].any() and masks[:40][~b2_1, :5].all() and not masks[:40][b2_1, :2].any()
    assert not masks[40:, 4].any() and masks[40:][~b2_2][:, [0, 1, 2, 3, 5]].all()
    assert not masks[40:][b2_2][:, :2].any()
    # obs: the second study lacks n_counts (missing), both carry _study; one Source per study.
    assert np.isnan(whole.obs_column("n_counts")[40:]).all()
    sources = open_soma_sources(uri, "_study")
    assert [(s.name, s.n_obs) for s in sources] == [("s1", 40), ("s2", 31)]
    # A one-study Source lists only the genes its study measured (var order), not the Experiment's union.
    var = d1.genes + ["G_new"]
    assert list(sources[0].gene_names) == d1.genes
    s2 = sources[1]
    measured = [g for g in var if g in d2.genes]
    assert list(s2.gene_names) == measured
    ids = cite.sorted_ids_with_runs(np.random.default_rng(0), 31)
    assert np.array_equal(s2.read(ids).rna.toarray(), expected_rna[40 + ids][:, [var.index(g) for g in measured]])
    assert list(s2.obs_names()) == list(d2.obs.index)


def test_append_refuses_what_it_cannot_take(tmp_path, cite):
    d1 = cite.make_cite(n=20)
    cite.write_h5ad(tmp_path / "s1.h5ad", d1)
    uri = tmp_path / "e.soma"
    ingest_soma(tmp_path / "s1.h5ad", uri, progress=False)
    with pytest.raises(StoreFormatError, match="study named 's1' is already"):
        ingest_soma(tmp_path / "s1.h5ad", uri, append=True, progress=False)
    with pytest.raises(StoreFormatError, match=r"measurements 'RNA'/'prot'.*asked for 'RNA'/'ADT'"):
        ingest_soma(tmp_path / "s1.h5ad", uri, append=True, study_name="x", protein_measurement="ADT", progress=False)
    extra = cite.make_cite(n=10, seed=3)
    extra.obs["tissue"] = "blood"
    cite.write_h5ad(tmp_path / "extra.h5ad", extra)
    with pytest.raises(StoreFormatError, match=r"obs columns \['tissue'\] are not in the Experiment"):
        ingest_soma(tmp_path / "extra.h5ad", uri, append=True, progress=False)
    ingest_soma(tmp_path / "extra.h5ad", uri, append=True, drop_new_obs_columns=True, progress=False)
    assert SomaSource(uri).n_obs == 30 and "tissue" not in SomaSource(uri).obs_columns
    wrong_type = cite.make_cite(n=10, seed=4)
    wrong_type.obs["n_counts"] = ["many"] * 10
    cite.write_h5ad(tmp_path / "wrong.h5ad", wrong_type)
    with pytest.raises(StoreFormatError, match=r"obs column 'n_counts'.*int64"):
        ingest_soma(tmp_path / "wrong.h5ad", uri, append=True, progress=False)
    with pytest.raises(StoreFormatError, match="no TileDB-SOMA Experiment to append to"):
        ingest_soma(tmp_path / "s1.h5ad", tmp_path / "absent.soma", append=True, progress=False)
    foreign = str(tmp_path / "foreign.soma")
    tiledbsoma.Experiment.create(foreign).close()
    with pytest.raises(StoreFormatError, match="written by streamtotal"):
        ingest_soma(tmp_path / "s1.h5ad", foreign, append=True, study_name="y", progress=False)
    assert SomaSource(uri).n_obs == 30  # nothing above changed the Experiment


def test_interrupted_append_is_invisible_and_repaired_by_the_next(tmp_path, cite):
    d1 = cite.make_cite(n=30)
    cite.write_h5ad(tmp_path / "s1.h5ad", d1)
    uri = tmp_path / "e.soma"
    ingest_soma(tmp_path / "s1.h5ad", uri, progress=False)
    d2 = cite.make_cite(n=24, seed=9)
    good_rna = d2.rna.copy()
    d2.rna = d2.rna.tolil()
    d2.rna[20, 0] = -1.0  # the third block fails after two blocks were written
    d2.rna = sp.csr_matrix(d2.rna)
    cite.write_h5ad(tmp_path / "s2.h5ad", d2)
    with pytest.raises(InvalidCountsError):
        ingest_soma(tmp_path / "s2.h5ad", uri, append=True, block_cells=8, progress=False)
    src = SomaSource(uri)
    assert src.n_obs == 30 and set(src.obs_column("_study")) == {"s1"}
    assert np.array_equal(src.read(np.arange(30)).rna.toarray(), d1.rna.toarray())
    # The next append deletes the orphan rows and writes its own cells in their place.
    d3 = cite.make_cite(n=8, seed=11)
    cite.write_h5ad(tmp_path / "s3.h5ad", d3)
    ingest_soma(tmp_path / "s3.h5ad", uri, append=True, progress=False)
    src = SomaSource(uri)
    assert src.n_obs == 38
    rows = src.read(np.arange(38))
    assert np.array_equal(rows.rna.toarray()[30:], d3.rna.toarray())
    assert np.array_equal(rows.protein[30:], d3.protein)
    d2.rna = good_rna
    cite.write_h5ad(tmp_path / "s2.h5ad", d2)
    ingest_soma(tmp_path / "s2.h5ad", uri, append=True, progress=False)
    rows = SomaSource(uri).read(np.arange(38, 62))
    assert np.array_equal(rows.rna.toarray(), good_rna.toarray())
    meta = _metadata(uri)
    assert [(s["name"], s["first_joinid"]) for s in meta.studies] == [("s1", 0), ("s3", 30), ("s2", 38)]


def test_tenx_h5_input(tmp_path, cite):
    d = cite.make_cite(n=25)
    cite.write_tenx_h5(tmp_path / "run.h5", d)
    report = ingest_soma(tmp_path / "run.h5", tmp_path / "run.soma", progress=False)
    assert report.input_format == "10x_h5" and any("CRISPR" in n for n in report.notes)
    src = SomaSource(tmp_path / "run.soma")
    assert sorted(src.gene_names) == sorted(d.genes) and sorted(src.protein_names) == sorted(d.proteins)
    genes = [d.genes.index(g) for g in src.gene_names]  # the file's feature order
    proteins = [d.proteins.index(p) for p in src.protein_names]
    rows = src.read(np.arange(25))
    assert np.array_equal(rows.rna.toarray(), d.rna.toarray()[:, genes])
    assert np.array_equal(rows.protein, d.protein[:, proteins])
    assert list(src.obs_names()) == list(d.obs.index) and src.obs_columns == ["_study"]


def test_remote_uri_for_a_new_experiment_is_refused(tmp_path, cite):
    d = cite.make_cite(n=10)
    cite.write_h5ad(tmp_path / "a.h5ad", d)
    with pytest.raises(StoreFormatError, match="local paths"):
        ingest_soma(tmp_path / "a.h5ad", "s3://bucket/a.soma", progress=False)
    with pytest.raises(ValueError, match="exclude each other"):
        ingest_soma(tmp_path / "a.h5ad", tmp_path / "a.soma", append=True, overwrite=True, progress=False)


def test_obs_types_survive(tmp_path, cite):
    d = cite.make_cite(n=12)
    d.obs["flag"] = np.arange(12) % 2 == 0
    d.obs["score"] = np.linspace(0, 1, 12)
    d.obs["maybe"] = pd.array([1, None] * 6, dtype="Int64")
    cite.write_h5ad(tmp_path / "a.h5ad", d)
    ingest_soma(tmp_path / "a.h5ad", tmp_path / "a.soma", progress=False)
    src = SomaSource(tmp_path / "a.soma")
    assert src.obs_column("flag").tolist() == d.obs["flag"].tolist()
    assert np.allclose(src.obs_column("score"), d.obs["score"])
    maybe = src.obs_column("maybe")
    assert maybe[0] == 1 and np.isnan(maybe[1])
