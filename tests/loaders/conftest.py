"""Fixtures of the loaders tests.

``cite``: builders of small real CITE-seq inputs (h5ad, h5mu, MuData zarr, 10x feature-barcode h5) for the
store tests. Each writes the same ``CiteData`` in its format's real layout, so a test can compare what a
reader returns with the arrays it started from. (They live here, not in a helper module, because the
suite runs with ``--import-mode=importlib``, where test files cannot import their siblings.)
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from types import SimpleNamespace

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp


@dataclass
class CiteData:
    rna: sp.csr_matrix
    protein: np.ndarray
    obs: pd.DataFrame
    genes: list[str]
    proteins: list[str]


def make_cite(n: int = 60, n_genes: int = 12, n_proteins: int = 5, seed: int = 0) -> CiteData:
    """Integer counts; batch "b2" measured neither P0 nor P1 (all zero there); some empty RNA rows."""
    rng = np.random.default_rng(seed)
    dense = rng.poisson(1.0, (n, n_genes)) * (rng.random((n, n_genes)) < 0.4)
    dense[3] = 0  # an empty row
    rna = sp.csr_matrix(dense.astype(np.float32))
    protein = (rng.poisson(20, (n, n_proteins)) + 1).astype(np.float32)
    batch = np.where(np.arange(n) < n // 2, "b1", "b2")
    protein[batch == "b2", :2] = 0
    cell_type = pd.Categorical(rng.choice(["T", "B", "NK"], n))
    cell_type[5] = np.nan
    obs = pd.DataFrame(
        {
            "batch": pd.Categorical(batch),
            "cell_type": cell_type,
            "n_counts": dense.sum(1).astype(np.int64),
        },
        index=[f"cell{i}" for i in range(n)],
    )
    return CiteData(rna, protein, obs, [f"G{i}" for i in range(n_genes)], [f"P{i}" for i in range(n_proteins)])


def to_anndata(d: CiteData, *, protein_as_df: bool = False, dense_x: bool = False) -> ad.AnnData:
    protein = pd.DataFrame(d.protein, index=d.obs.index, columns=d.proteins) if protein_as_df else d.protein
    a = ad.AnnData(
        d.rna.toarray() if dense_x else d.rna.copy(),
        obs=d.obs.copy(),
        var=pd.DataFrame(index=d.genes),
        obsm={"protein_expression": protein},
    )
    if not protein_as_df:
        a.uns["protein_names"] = np.array(d.proteins, dtype=object)
    return a


def write_h5ad(path, d: CiteData, **kwargs) -> None:
    to_anndata(d, **kwargs).write_h5ad(path)


def to_mudata(d: CiteData, *, protein_sparse: bool = False):
    import mudata as md

    md.set_options(pull_on_update=False)
    rna = ad.AnnData(d.rna.copy(), obs=d.obs[["cell_type"]].copy(), var=pd.DataFrame(index=d.genes))
    prot_x = sp.csr_matrix(d.protein) if protein_sparse else d.protein.copy()
    prot = ad.AnnData(prot_x, obs=pd.DataFrame(index=d.obs.index), var=pd.DataFrame(index=d.proteins))
    m = md.MuData({"rna": rna, "prot": prot})
    m.obs["batch"] = d.obs["batch"].to_numpy()
    m.obs["n_counts"] = d.obs["n_counts"].to_numpy()
    return m


def write_tenx_h5(path, d: CiteData, *, with_proteins: bool = True, extra_crispr: bool = True) -> np.ndarray:
    """Writes the Cell Ranger >= 3 layout; features are shuffled so genes and antibodies interleave.

    Returns:
        The feature order used (indexes into genes + proteins [+ the CRISPR guide]).
    """
    parts = [d.rna.toarray()] + ([d.protein] if with_proteins else [])
    names = list(d.genes) + (list(d.proteins) if with_proteins else [])
    types = ["Gene Expression"] * len(d.genes) + (["Antibody Capture"] * len(d.proteins) if with_proteins else [])
    if extra_crispr:
        parts.append(np.ones((d.rna.shape[0], 1), np.float32))
        names.append("guide1")
        types.append("CRISPR Guide Capture")
    full = np.hstack(parts)
    order = np.random.default_rng(1).permutation(full.shape[1])
    full = full[:, order]
    csc = sp.csc_matrix(full.T.astype(np.int32))  # features x barcodes, one column per barcode
    with h5py.File(path, "w") as f:
        m = f.create_group("matrix")
        m.create_dataset("barcodes", data=np.array([s.encode() for s in d.obs.index], dtype="S"))
        m.create_dataset("data", data=csc.data.astype(np.int32), compression="gzip")
        m.create_dataset("indices", data=csc.indices.astype(np.int64), compression="gzip")
        m.create_dataset("indptr", data=csc.indptr.astype(np.int64))
        m.create_dataset("shape", data=np.array(csc.shape, dtype=np.int32))
        feats = m.create_group("features")
        names_o = [names[i] for i in order]
        types_o = [types[i] for i in order]
        feats.create_dataset("name", data=np.array([s.encode() for s in names_o], dtype="S"))
        feats.create_dataset("id", data=np.array([f"ENSG{i:05d}".encode() for i in order], dtype="S"))
        feats.create_dataset("feature_type", data=np.array([s.encode() for s in types_o], dtype="S"))
        feats.create_dataset("genome", data=np.array([b"GRCh38"] * len(order), dtype="S"))
        feats.create_dataset("_all_tag_keys", data=np.array([b"genome"], dtype="S"))
        f.attrs["library_ids"] = np.array([b"lib1"], dtype="S")
        f.attrs["chemistry_description"] = b"Single Cell 3' v3"
    return order


def sorted_ids_with_runs(rng: np.random.Generator, n: int) -> np.ndarray:
    """Sorted unique ids mixing contiguous runs, gaps and single cells."""
    ids = set(rng.choice(n, size=max(1, n // 6), replace=False).tolist())
    for start in rng.choice(n, size=3, replace=False):
        ids.update(range(int(start), min(n, int(start) + int(rng.integers(2, 12)))))
    return np.array(sorted(ids), dtype=np.int64)


def assert_concurrent_reads_after_close(src, rna, protein, seed: int = 4) -> None:
    """Closes ``src``, reads 8 id sets on 4 threads at once, and checks every read against ``rna`` / ``protein``:
    every reader thread finds the handles stale, as in a freshly forked DataLoader worker."""
    src.close()
    rng = np.random.default_rng(seed)
    reads = [sorted_ids_with_runs(rng, src.n_obs) for _ in range(8)]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(src.read, reads))
    for ids, rows in zip(reads, results):
        assert np.array_equal(rows.rna.toarray(), rna[ids].toarray())
        assert np.array_equal(rows.protein, protein[ids])


@pytest.fixture
def cite():
    """Builders of small CITE-seq inputs: ``cite.make_cite()``, ``cite.write_h5ad(path, d)``, ..."""
    return SimpleNamespace(
        CiteData=CiteData, make_cite=make_cite, to_anndata=to_anndata, write_h5ad=write_h5ad,
        to_mudata=to_mudata, write_tenx_h5=write_tenx_h5, sorted_ids_with_runs=sorted_ids_with_runs,
        assert_concurrent_reads_after_close=assert_concurrent_reads_after_close,
    )
