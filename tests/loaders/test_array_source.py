"""Tests of loaders.array_source: construction checks, reads, AnnData import."""

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from loaders.array_source import ArraySource
from loaders.errors import InvalidCountsError, InvalidIdsError, StoreFormatError
from loaders.source import Source


def _data(n=20, g=6, t=3, seed=0):
    rng = np.random.default_rng(seed)
    rna = sp.random(n, g, density=0.4, format="csr", random_state=seed, dtype=np.float32)
    rna.data = np.ceil(rna.data * 10)
    protein = rng.poisson(5, size=(n, t)).astype(np.float32)
    return rna, protein, [f"g{i}" for i in range(g)], [f"p{i}" for i in range(t)]


def test_reads_rows_of_ids():
    rna, protein, genes, prots = _data()
    src = ArraySource("s1", rna, protein, genes, prots, obs={"batch": np.array(["a", "b"] * 10)})
    assert isinstance(src, Source)
    ids = np.array([1, 4, 5, 19])
    rows = src.read(ids)
    assert rows.rna.dtype == np.float32 and sp.isspmatrix_csr(rows.rna)
    assert np.array_equal(rows.rna.toarray(), rna.toarray()[ids])
    assert np.array_equal(rows.protein, protein[ids])
    assert src.n_obs == 20 and src.obs_columns == ["batch"]
    assert src.protein_panels.shape == (1, 3) and src.protein_panels.all()
    assert np.array_equal(src.protein_panel_codes(), np.zeros(20))
    assert src.read(np.array([], dtype=np.int64)).rna.shape == (0, 6)


def test_refuses_bad_ids():
    src = ArraySource("s1", *_data())
    with pytest.raises(InvalidIdsError, match="sorted"):
        src.read(np.array([3, 1]))
    with pytest.raises(InvalidIdsError, match=r"\[0, 20\)"):
        src.read(np.array([19, 20]))


def test_refuses_inconsistent_shapes_and_names():
    rna, protein, genes, prots = _data()
    with pytest.raises(StoreFormatError, match="gene_names has 5 entries"):
        ArraySource("s1", rna, protein, genes[:5], prots)
    with pytest.raises(StoreFormatError, match=r"duplicated: \['g0'\]"):
        ArraySource("s1", rna, protein, ["g0"] + genes[:-1], prots)
    with pytest.raises(StoreFormatError, match="protein must be"):
        ArraySource("s1", rna, protein[:5], genes, prots)
    with pytest.raises(StoreFormatError, match="obs column 'b'"):
        ArraySource("s1", rna, protein, genes, prots, obs={"b": np.zeros(3)})
    with pytest.raises(StoreFormatError, match="need protein_panel_codes"):
        ArraySource("s1", rna, protein, genes, prots, protein_panels=np.ones((2, 3), bool))
    with pytest.raises(StoreFormatError, match="columns are"):
        ArraySource("s1", rna, protein, genes, prots).obs_column("cell_type")


def test_refuses_invalid_counts_naming_study_cell_column():
    rna, protein, genes, prots = _data()
    bad = protein.copy()
    bad[7, 2] = -1
    with pytest.raises(InvalidCountsError, match=r"study 's1'.*cell 7, column 'p2'"):
        ArraySource("s1", rna, bad, genes, prots)
    dense = rna.toarray()
    dense[4, 3] = np.nan
    with pytest.raises(InvalidCountsError, match=r"study 's1'.*cell 4, column 'g3'"):
        ArraySource("s1", dense, protein, genes, prots)


def test_panels_per_cell():
    rna, protein, genes, prots = _data()
    panels = np.array([[True, True, True], [True, False, True]])
    codes = np.arange(20) % 2
    src = ArraySource("s1", rna, protein, genes, prots, protein_panels=panels, protein_panel_codes=codes)
    assert np.array_equal(src.protein_panels[src.protein_panel_codes()][:2], panels)


def test_from_anndata_dataframe_and_uns_names():
    rna, protein, genes, prots = _data()
    obs = pd.DataFrame({"cell_type": pd.Categorical(["T", "B"] * 10)}, index=[f"c{i}" for i in range(20)])
    adata = ad.AnnData(X=rna, obs=obs, var=pd.DataFrame(index=genes))
    adata.obsm["protein_expression"] = pd.DataFrame(protein, index=obs.index, columns=prots)
    src = ArraySource.from_anndata(adata, name="pbmc")
    assert list(src.protein_names) == prots and list(src.gene_names) == genes
    assert list(src.obs_column("cell_type")[:2]) == ["T", "B"]
    assert np.array_equal(src.read(np.arange(20)).protein, protein)

    adata.obsm["prot"] = protein
    with pytest.raises(StoreFormatError, match="uns\\['protein_names'\\] is missing"):
        ArraySource.from_anndata(adata, name="pbmc", protein_key="prot")
    adata.uns["protein_names"] = np.array(prots)
    assert list(ArraySource.from_anndata(adata, name="pbmc", protein_key="prot").protein_names) == prots
    with pytest.raises(StoreFormatError, match="obsm keys are"):
        ArraySource.from_anndata(adata, name="pbmc", protein_key="adt")


def test_cell_names_and_location_of_the_source_protocol():
    rna, protein, genes, prots = _data()
    plain = ArraySource("s1", rna, protein, genes, prots)
    assert plain.location is None and list(plain.obs_names()[:3]) == ["0", "1", "2"]
    named = ArraySource("s1", rna, protein, genes, prots, obs_names=[f"c{i}" for i in range(20)])
    assert list(named.obs_names()[-2:]) == ["c18", "c19"]
    with pytest.raises(StoreFormatError, match=r"study 's1': obs_names has shape \(3,\); expected \(20,\)"):
        ArraySource("s1", rna, protein, genes, prots, obs_names=["a", "b", "c"])
    adata = ad.AnnData(X=rna, obs=pd.DataFrame(index=[f"bc{i}" for i in range(20)]), var=pd.DataFrame(index=genes))
    adata.obsm["protein_expression"] = pd.DataFrame(protein, index=adata.obs_names, columns=prots)
    assert list(ArraySource.from_anndata(adata, name="pbmc").obs_names()[:2]) == ["bc0", "bc1"]
