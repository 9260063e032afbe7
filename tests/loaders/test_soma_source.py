"""Tests of loaders.soma_source: reads, names, obs and panels of ingested Experiments, value_filter, the same
batches as ZarrSource through Collection + StreamLoader, foreign Experiments, errors and pickling."""

import pickle

import anndata as ad
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import scipy.sparse as sp
import tiledbsoma
import tiledbsoma.io
import torch

from loaders.collection import Collection
from loaders.errors import InvalidCountsError, InvalidIdsError, StoreFormatError
from loaders.ingest import ingest
from loaders.ingest.soma_ingest import ingest_soma
from loaders.soma_source import SomaSource, open_soma_sources
from loaders.source import Source
from loaders.stream import StreamConfig
from loaders.stream_loader import StreamLoader
from loaders.zarr_source import ZarrSource

pytestmark = [
    pytest.mark.filterwarnings("ignore:Writing zarr v2 data will no longer be the default"),
    pytest.mark.filterwarnings("ignore:Consolidated metadata is currently not part"),
]


_STUDY: dict = {}


@pytest.fixture
def study(cite, tmp_path_factory):
    """One simulated study (97 cells; batch b2 lacks P0 and P1) ingested as SOMA (blocks of 13) and zarr,
    built once per module (the tests only read it)."""
    if not _STUDY:
        tmp = tmp_path_factory.mktemp("soma")
        d = cite.make_cite(n=97)
        cite.write_h5ad(tmp / "pbmc.h5ad", d)
        ingest_soma(tmp / "pbmc.h5ad", tmp / "pbmc.soma", batch_key="batch", block_cells=13, progress=False)
        ingest(tmp / "pbmc.h5ad", tmp / "pbmc.zarr", batch_key="batch", block_cells=13, progress=False)
        _STUDY["value"] = (d, tmp)
    return _STUDY["value"]


def _assert_reads(src, rna, protein, cite, seed=0, n_reads=6):
    rng = np.random.default_rng(seed)
    for _ in range(n_reads):
        ids = cite.sorted_ids_with_runs(rng, src.n_obs)
        rows = src.read(ids)
        assert sp.isspmatrix_csr(rows.rna) and rows.rna.dtype == np.float32 and rows.protein.dtype == np.float32
        assert rows.rna.has_sorted_indices
        assert np.array_equal(rows.rna.toarray(), rna[ids].toarray())
        assert np.array_equal(rows.protein, protein[ids])


def test_ingested_experiment_round_trips(study, cite):
    d, tmp = study
    src = SomaSource(tmp / "pbmc.soma")
    assert isinstance(src, Source) and src.location == str(tmp / "pbmc.soma")
    assert (src.name, src.n_obs, list(src.gene_names), list(src.protein_names)) == ("pbmc", 97, d.genes, d.proteins)
    _assert_reads(src, d.rna, d.protein, cite)
    for ids in (np.arange(97), np.array([0]), np.array([96]), np.array([3]), np.array([0, 96]), np.arange(40, 60)):
        rows = src.read(ids)
        assert np.array_equal(rows.rna.toarray(), d.rna[ids].toarray())
        assert np.array_equal(rows.protein, d.protein[ids])
    empty = src.read(np.array([], dtype=np.int64))
    assert empty.rna.shape == (0, 12) and empty.protein.shape == (0, 5)
    rows = src.read(np.array([1, 2]))
    rows.protein[0, 0] = -1  # outputs must be writable
    rows.rna.data[:] = 0
    with pytest.raises(InvalidIdsError):
        src.read(np.array([5, 2]))
    # obs: strings with missing as "", numbers as numbers; names; the internal panel column hidden.
    assert src.obs_columns == ["batch", "cell_type", "n_counts", "_study"]
    assert list(src.obs_column("batch")) == list(d.obs["batch"].astype(str))
    expected = d.obs["cell_type"].astype(object).where(d.obs["cell_type"].notna(), "").astype(str)
    assert list(src.obs_column("cell_type")) == list(expected)
    assert np.array_equal(src.obs_column("n_counts"), d.obs["n_counts"].to_numpy())
    assert set(src.obs_column("_study")) == {"pbmc"}
    assert list(src.obs_names()) == list(d.obs.index)
    # panels: b2 did not measure P0, P1.
    assert src.protein_panels.tolist() == [[True] * 5, [False, False, True, True, True]]
    assert np.array_equal(src.protein_panel_codes(), (d.obs["batch"] == "b2").to_numpy().astype(int))


def test_value_filter_selects_cells_and_batches_hold_only_them(study, cite):
    d, tmp = study
    src = SomaSource(tmp / "pbmc.soma", name="b2_only", value_filter="batch == 'b2'")
    keep = np.flatnonzero(d.obs["batch"].to_numpy() == "b2")
    assert src.n_obs == keep.size and np.array_equal(src.soma_joinids, keep)
    assert set(src.obs_column("batch")) == {"b2"}
    assert list(src.obs_names()) == list(d.obs.index[keep])
    assert np.array_equal(src.protein_panel_codes(), np.ones(keep.size))
    _assert_reads(src, d.rna[keep], d.protein[keep], cite, seed=3)
    collection = Collection([src], batch_key="batch", labels_key="cell_type")
    loader = StreamLoader(collection, np.arange(src.n_obs), StreamConfig(batch_size=8, chunk_size=4, io_chunks=3))
    seen = []
    for batch in loader:
        local = batch.cell_id.numpy()
        seen.append(local)
        assert np.array_equal(batch.rna.numpy(), d.rna[keep[local]].toarray())
        assert np.array_equal(batch.protein.numpy(), d.protein[keep[local]])
        assert not batch.protein_mask[:, :2].any() and batch.protein_mask[:, 2:].all()
    assert np.array_equal(np.sort(np.concatenate(seen)), np.arange(keep.size))
    # Numeric filters and a filter matching nothing.
    assert SomaSource(tmp / "pbmc.soma", value_filter="n_counts > 10").n_obs == int((d.obs["n_counts"] > 10).sum())
    with pytest.raises(StoreFormatError, match="no cells match"):
        SomaSource(tmp / "pbmc.soma", value_filter="batch == 'nope'")
    with pytest.raises(StoreFormatError, match="value_filter"):
        SomaSource(tmp / "pbmc.soma", value_filter="tissue == 'blood'")


def test_soma_and_zarr_sources_yield_identical_batches(study):
    _, tmp = study
    cfg = StreamConfig(batch_size=16, chunk_size=8, io_chunks=3, seed=7)
    epochs = {}
    for kind, src in (("soma", SomaSource(tmp / "pbmc.soma")), ("zarr", ZarrSource(tmp / "pbmc.zarr"))):
        collection = Collection([src], batch_key="batch", labels_key="cell_type")
        loader = StreamLoader(collection, np.arange(collection.n_obs), cfg)
        for epoch in (0, 1):
            loader.set_epoch(epoch)
            epochs[kind, epoch] = list(loader)
    for epoch in (0, 1):
        soma, zarr = epochs["soma", epoch], epochs["zarr", epoch]
        assert len(soma) == len(zarr) > 1
        for x, y in zip(soma, zarr):
            for name in ("cell_id", "rna", "protein", "protein_mask", "batch", "label"):
                assert torch.equal(getattr(x, name), getattr(y, name)), (epoch, name)
    assert not torch.equal(epochs["soma", 0][0].cell_id, epochs["soma", 1][0].cell_id)


def test_pickles_and_reopens_in_forked_workers(study, cite):
    d, tmp = study
    src = SomaSource(tmp / "pbmc.soma", value_filter="batch == 'b1'", context={"sm.io_concurrency_level": "1"})
    clone = pickle.loads(pickle.dumps(src))
    assert (clone.name, clone.n_obs, clone.value_filter) == (src.name, src.n_obs, "batch == 'b1'")
    keep = np.flatnonzero(d.obs["batch"].to_numpy() == "b1")
    _assert_reads(clone, d.rna[keep], d.protein[keep], cite, n_reads=2)
    collection = Collection([SomaSource(tmp / "pbmc.soma")], batch_key="batch")
    cfg = StreamConfig(batch_size=16, chunk_size=8, io_chunks=2, num_workers=1, multiprocessing_context="fork")
    batches = list(StreamLoader(collection, np.arange(97), cfg))
    ids = np.concatenate([b.cell_id.numpy() for b in batches])
    assert np.array_equal(np.sort(ids), np.arange(97))
    rna = torch.cat([b.rna for b in batches]).numpy()
    assert np.array_equal(rna, d.rna[ids].toarray())


def test_missing_measurement_layer_and_columns_name_what_exists(study, tmp_path):
    _, tmp = study
    uri = tmp / "pbmc.soma"
    with pytest.raises(StoreFormatError, match=r"no measurement 'ADT'.*\['RNA', 'prot'\]"):
        SomaSource(uri, protein_measurement="ADT")
    with pytest.raises(StoreFormatError, match=r"no measurement 'rna'.*\['RNA', 'prot'\]"):
        SomaSource(uri, rna_measurement="rna")
    with pytest.raises(StoreFormatError, match=r"no X layer 'counts'.*\['data'\]"):
        SomaSource(uri, x_layer="counts")
    with pytest.raises(StoreFormatError, match=r"no X layer 'raw'.*\['data'\]"):
        SomaSource(uri, protein_x_layer="raw")
    with pytest.raises(StoreFormatError, match=r"no column 'feature_name'.*var_id"):
        SomaSource(uri, var_column="feature_name")
    with pytest.raises(StoreFormatError, match=r"no obs column 'tissue'.*'cell_type'"):
        SomaSource(uri).obs_column("tissue")
    with pytest.raises(StoreFormatError, match="cannot open a TileDB-SOMA Experiment"):
        SomaSource(tmp_path / "absent.soma")


def test_reads_experiments_written_by_tiledbsoma_io(tmp_path, cite):
    """A foreign Experiment: no streamtotal metadata (one all-True panel), proteins as their own measurement,
    X as float64 and var names in a non-default column."""
    d = cite.make_cite(n=40, seed=2)
    obs = d.obs.copy()
    rna = ad.AnnData(d.rna.astype(np.float64), obs=obs, var=pd.DataFrame(index=d.genes))
    prot = ad.AnnData(sp.csr_matrix(d.protein), obs=obs, var=pd.DataFrame(index=d.proteins))
    uri = str(tmp_path / "foreign")
    tiledbsoma.io.from_anndata(uri, rna, measurement_name="RNA", var_id_name="gene")
    tiledbsoma.io.from_anndata(uri, prot, measurement_name="ADT", var_id_name="gene", ingest_mode="resume")
    with pytest.raises(StoreFormatError, match=r"no measurement 'prot'.*\['ADT', 'RNA'\]"):
        SomaSource(uri, var_column="gene")
    src = SomaSource(uri, protein_measurement="ADT", var_column="gene")
    assert list(src.gene_names) == d.genes and list(src.protein_names) == d.proteins
    assert src.protein_panels.tolist() == [[True] * 5] and not src.protein_panel_codes().any()
    _assert_reads(src, d.rna, d.protein, cite, n_reads=3)
    assert list(src.obs_names()) == list(d.obs.index)
    assert "batch" in src.obs_columns


def test_invalid_counts_name_study_cell_and_gene(tmp_path):
    uri = str(tmp_path / "bad.soma")
    with tiledbsoma.Experiment.create(uri) as exp:
        schema = pa.schema([("soma_joinid", pa.int64()), ("obs_id", pa.large_string())])
        exp.add_new_dataframe("obs", schema=schema, domain=[(0, 2)]).write(
            pa.table({"soma_joinid": np.arange(3), "obs_id": ["a", "b", "c"]})
        )
        ms = exp.add_new_collection("ms")
        for name, n_var, values in (("RNA", 2, [1.0, -2.0]), ("prot", 1, [3.0, 4.0])):
            m = ms.add_new_collection(name, tiledbsoma.Measurement)
            var_schema = pa.schema([("soma_joinid", pa.int64()), ("var_id", pa.large_string())])
            m.add_new_dataframe("var", schema=var_schema, domain=[(0, n_var - 1)]).write(
                pa.table({"soma_joinid": np.arange(n_var), "var_id": [f"{name}{i}" for i in range(n_var)]})
            )
            x = m.add_new_collection("X").add_new_sparse_ndarray("data", type=pa.float32(), shape=(3, n_var))
            x.write(pa.table({"soma_dim_0": np.array([0, 2]), "soma_dim_1": np.array([0, n_var - 1]),
                              "soma_data": np.array(values, dtype=np.float32)}))
    src = SomaSource(uri)
    rows = src.read(np.array([0, 1]))
    assert rows.rna.toarray().tolist() == [[1, 0], [0, 0]] and rows.protein.tolist() == [[3], [0]]
    with pytest.raises(InvalidCountsError, match=r"study 'bad'.*cell 'c'.*gene 'RNA1'"):
        src.read(np.array([1, 2]))


def test_open_soma_sources_splits_by_study(study):
    _, tmp = study
    sources = open_soma_sources(tmp / "pbmc.soma", "batch")
    assert [(s.name, s.n_obs) for s in sources] == [("b1", 48), ("b2", 49)]


def test_concurrent_reads_after_close_are_correct(study, cite):
    d, tmp = study
    cite.assert_concurrent_reads_after_close(SomaSource(tmp / "pbmc.soma"), d.rna, d.protein)
