"""Tests of loaders.zarr_source: ingested, plain AnnData and MuData zarr stores; direct and zarr read paths."""

import pickle

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

from loaders.errors import InvalidCountsError, InvalidIdsError, StoreFormatError
from loaders.source import Source
from loaders.store_layout import StoreLayoutConfig
from loaders.store_writer import ZarrStoreWriter
from loaders.zarr_source import ZarrSource

pytestmark = [
    # anndata/zarr announce their next defaults when tests write plain AnnData zarr stores.
    pytest.mark.filterwarnings("ignore:Writing zarr v2 data will no longer be the default"),
    pytest.mark.filterwarnings("ignore:zarr v3 autosharding"),
    pytest.mark.filterwarnings("ignore:Consolidated metadata is currently not part"),
]

SMALL = StoreLayoutConfig(chunk_cells=4, min_chunk_elements=8)


def _store(path, d, **kwargs):
    """A store with tiny chunks, so reads cross many chunk boundaries."""
    with ZarrStoreWriter(path, d.genes, d.proteins, layout=SMALL, **kwargs) as w:
        for a in range(0, len(d.obs), 13):
            w.append(d.rna[a : a + 13], d.protein[a : a + 13], d.obs.iloc[a : a + 13])
    return path


def _assert_reads(src, d, cite, seed=0, n_reads=8):
    rng = np.random.default_rng(seed)
    for _ in range(n_reads):
        ids = cite.sorted_ids_with_runs(rng, len(d.obs))
        rows = src.read(ids)
        assert sp.isspmatrix_csr(rows.rna) and rows.rna.dtype == np.float32 and rows.protein.dtype == np.float32
        assert np.array_equal(rows.rna.toarray(), d.rna[ids].toarray())
        assert np.array_equal(rows.protein, d.protein[ids])


def test_reads_equal_input_rows_for_runs_gaps_and_edges(tmp_path, cite):
    d = cite.make_cite(n=97)
    src = ZarrSource(_store(tmp_path / "pbmc.zarr", d))
    assert isinstance(src, Source) and src.location == str(tmp_path / "pbmc.zarr")
    assert (src.name, src.n_obs, list(src.gene_names), list(src.protein_names)) == ("pbmc", 97, d.genes, d.proteins)
    _assert_reads(src, d, cite)
    for ids in (np.arange(97), np.array([0]), np.array([96]), np.array([3]), np.array([0, 96]), np.arange(40, 60)):
        rows = src.read(ids)
        assert np.array_equal(rows.rna.toarray(), d.rna[ids].toarray())
        assert np.array_equal(rows.protein, d.protein[ids])
    empty = src.read(np.array([], dtype=np.int64))
    assert empty.rna.shape == (0, 12) and empty.protein.shape == (0, 5)
    rows = src.read(np.array([1, 2]))
    rows.protein[0, 0] = -1  # outputs must be writable (torch.from_numpy, in-place shuffles)
    rows.rna.data[:] = 0


def test_direct_and_zarr_reads_agree_with_absent_chunks(tmp_path, cite):
    d = cite.make_cite(n=80)
    d.protein[8:40] = 0  # whole chunks equal to the fill value: zarr does not write them
    path = _store(tmp_path / "s.zarr", d)
    chunk_rows = SMALL.row_chunk(5)
    assert not (path / "obsm" / "protein_expression" / f"{16 // chunk_rows}.0").exists()
    direct, via_zarr = ZarrSource(path), ZarrSource(path, direct_local_reads=False)
    assert direct._rna.direct and direct._protein.direct and not via_zarr._rna.direct
    _assert_reads(direct, d, cite, seed=1)
    _assert_reads(via_zarr, d, cite, seed=1)


def test_file_url_goes_through_fsspec(tmp_path, cite):
    d = cite.make_cite(n=30)
    path = _store(tmp_path / "s.zarr", d)
    src = ZarrSource(f"file://{path}")
    assert not src._rna.direct
    _assert_reads(src, d, cite, n_reads=2)


def test_obs_columns_panels_and_names(tmp_path, cite):
    d = cite.make_cite()
    src = ZarrSource(_store(tmp_path / "s.zarr", d, panel_key="batch"))
    assert src.obs_columns == ["batch", "cell_type", "n_counts"]
    cell_type = src.obs_column("cell_type")
    assert cell_type[5] == "" and list(cell_type[:5]) == list(d.obs["cell_type"].astype(str)[:5])
    assert np.array_equal(src.obs_column("n_counts"), d.obs["n_counts"])
    assert list(src.obs_names()) == list(d.obs.index)
    assert src.protein_panels.shape == (2, 5)
    assert np.array_equal(src.protein_panel_codes(), (np.arange(60) >= 30).astype(int))
    with pytest.raises(StoreFormatError, match=r"no obs column 'donor'.*\['batch', 'cell_type', 'n_counts'\]"):
        src.obs_column("donor")


def test_bad_ids_refused(tmp_path, cite):
    src = ZarrSource(_store(tmp_path / "s.zarr", cite.make_cite(n=20)))
    for ids in (np.array([3, 2]), np.array([1, 1]), np.array([0, 20]), np.array([-1, 3]), np.array([0.5])):
        with pytest.raises(InvalidIdsError):
            src.read(ids)


def test_nan_and_negative_counts_refused_at_read(tmp_path, cite):
    d = cite.make_cite(n=40)
    dense = d.rna.toarray()
    dense[17, 6] = np.nan
    d.rna = sp.csr_matrix(dense)
    d.protein[30, 2] = -4  # the writer does not validate: ingest does
    src = ZarrSource(_store(tmp_path / "study1.zarr", d))
    with pytest.raises(InvalidCountsError) as err:
        src.read(np.array([2, 16, 17, 18]))
    for part in ("'study1'", "'cell17' (index 17)", "gene 'G6'", "NaN"):
        assert part in str(err.value)
    with pytest.raises(InvalidCountsError, match="'cell30'.*protein 'P2'.*negative"):
        src.read(np.array([29, 30]))
    src.read(np.array([2, 16, 18]))
    ZarrSource(tmp_path / "study1.zarr", validate=False).read(np.array([17, 30]))


def test_mudata_zarr_store(tmp_path, cite):
    d = cite.make_cite()
    for sparse_protein in (False, True):
        path = tmp_path / f"m{int(sparse_protein)}.zarr"
        cite.to_mudata(d, protein_sparse=sparse_protein).write_zarr(path)
        src = ZarrSource(path)
        assert list(src.gene_names) == d.genes and list(src.protein_names) == d.proteins
        assert src.obs_columns == ["batch", "n_counts", "cell_type"]
        assert list(src.obs_column("batch")) == list(d.obs["batch"].astype(str))
        assert src.obs_column("cell_type")[5] == ""
        assert src.protein_panels.tolist() == [[True] * 5]
        assert np.array_equal(src.protein_panel_codes(), np.zeros(60))
        _assert_reads(src, d, cite)
    with pytest.raises(StoreFormatError, match=r"no modality 'adt'.*\['prot', 'rna'\]"):
        ZarrSource(path, protein_modality="adt")


def test_plain_anndata_zarr_stores(tmp_path, cite):
    d = cite.make_cite()
    cite.to_anndata(d).write_zarr(tmp_path / "a.zarr")
    _assert_reads(ZarrSource(tmp_path / "a.zarr"), d, cite)
    cite.to_anndata(d, protein_as_df=True, dense_x=True).write_zarr(tmp_path / "df.zarr")
    src = ZarrSource(tmp_path / "df.zarr")
    assert list(src.protein_names) == d.proteins
    _assert_reads(src, d, cite)


def test_zarr_format_3_store_read_through_zarr(tmp_path, cite):
    d = cite.make_cite()
    with ad.settings.override(zarr_write_format=3):
        cite.to_anndata(d).write_zarr(tmp_path / "v3.zarr")
    src = ZarrSource(tmp_path / "v3.zarr")
    assert not src._rna.direct
    _assert_reads(src, d, cite)


def test_missing_protein_matrix_and_store(tmp_path, cite):
    a = cite.to_anndata(cite.make_cite(n=10))
    a.obsm["X_pca"] = a.obsm.pop("protein_expression")
    a.write_zarr(tmp_path / "a.zarr")
    with pytest.raises(StoreFormatError, match=r"'a'.*no protein matrix at obsm/protein_expression.*\['X_pca'\]"):
        ZarrSource(tmp_path / "a.zarr")
    with pytest.raises(StoreFormatError, match="cannot open"):
        ZarrSource(tmp_path / "missing.zarr")


def test_protein_names_needed_for_a_bare_obsm_array(tmp_path, cite):
    a = cite.to_anndata(cite.make_cite(n=10))
    del a.uns["protein_names"]
    a.write_zarr(tmp_path / "a.zarr")
    with pytest.raises(StoreFormatError, match="protein names are unknown"):
        ZarrSource(tmp_path / "a.zarr")
    assert list(ZarrSource(tmp_path / "a.zarr", protein_names=list("ABCDE")).protein_names) == list("ABCDE")


def test_pickles_by_reopening(tmp_path, cite):
    d = cite.make_cite(n=30)
    src = ZarrSource(_store(tmp_path / "s.zarr", d), name="custom")
    clone = pickle.loads(pickle.dumps(src))
    assert clone.name == "custom"
    _assert_reads(clone, d, cite, n_reads=2)


def _read_in_child(src, ids, queue):
    rows = src.read(ids)
    queue.put((rows.rna.toarray(), rows.protein))


def test_reads_in_a_forked_worker_after_reading_in_the_parent(tmp_path, cite):
    """DataLoader workers fork after the parent has used the source (and zarr's event loop)."""
    import multiprocessing as mp

    d = cite.make_cite(n=40)
    for direct in (True, False):
        src = ZarrSource(_store(tmp_path / f"s{direct}.zarr", d), direct_local_reads=direct)
        src.read(np.arange(5))
        ctx = mp.get_context("fork")
        queue = ctx.Queue()
        ids = np.array([1, 2, 3, 20, 39])
        proc = ctx.Process(target=_read_in_child, args=(src, ids, queue))
        proc.start()
        rna, protein = queue.get(timeout=60)
        proc.join(timeout=60)
        assert proc.exitcode == 0
        assert np.array_equal(rna, d.rna[ids].toarray()) and np.array_equal(protein, d.protein[ids])


def test_reads_of_scattered_ids_are_split_into_bounded_rounds_with_identical_results(tmp_path, cite, monkeypatch):
    import loaders.zarr_source as zarr_source

    d = cite.make_cite(n=97)
    src = ZarrSource(_store(tmp_path / "s.zarr", d))
    rounds = []
    real = ZarrSource._read_runs
    monkeypatch.setattr(ZarrSource, "_read_runs", lambda self, *a: rounds.append(len(a[0])) or real(self, *a))
    # a few chunks of 4 cells per round: the chunk bytes of both matrices, ~20 cells of RNA and protein
    monkeypatch.setattr(zarr_source, "READ_BUDGET_BYTES", 20 * (src._rna.bytes_per_cell + src._protein.bytes_per_cell))
    _assert_reads(src, d, cite, seed=3)
    assert max(rounds) < 97 and len(rounds) > 8  # several bounded rounds, not one pass over everything
    ids = np.arange(0, 97, 7)
    assert np.array_equal(src.read(ids).rna.toarray(), d.rna[ids].toarray())


@pytest.mark.parametrize("hint", [1, 3000, 10_000, 20_000])
def test_chunk_files_are_read_whole_whatever_the_size_hint(tmp_path, hint):
    from loaders.zarr_chunk_reader import _read_file

    payload = np.random.default_rng(0).bytes(10_000)
    (tmp_path / "0").write_bytes(payload)
    assert _read_file(str(tmp_path / "0"), hint) == payload
    with pytest.raises(FileNotFoundError):
        _read_file(str(tmp_path / "1"), hint)


def test_local_chunk_reader_matches_zarr_for_sorted_unsorted_empty_and_fill_value_ranges(tmp_path):
    import zarr
    from numcodecs import Blosc

    from loaders.row_runs import joined_parts
    from loaders.zarr_chunk_reader import LocalChunkReader

    values = np.arange(1, 1001, dtype=np.int32)
    values[200:400] = 0  # chunks 2 and 3 hold only the fill value: zarr does not write them
    arr = zarr.create_array(str(tmp_path / "a"), shape=values.shape, chunks=(100,), dtype="int32", zarr_format=2,
                            compressors=Blosc("lz4", 5, 1), fill_value=0)
    arr[...] = values
    assert not (tmp_path / "a" / "2").exists()
    reader = LocalChunkReader.for_array(zarr.open_array(str(tmp_path / "a"), mode="r"))
    assert reader is not None
    cases = [
        (np.array([0, 150, 350, 990]), np.array([120, 160, 420, 1000])),  # sorted, across chunks, fill chunks
        (np.array([500, 10]), np.array([650, 20])),  # unsorted: the chunk-by-chunk path
        (np.array([100, 300]), np.array([100, 300])),  # empty ranges
    ]
    for starts, stops in cases:
        parts = reader.read_ranges(starts, stops)
        for part, a, b in zip(parts, starts, stops):
            assert np.array_equal(part, values[a:b])
    sorted_parts = reader.read_ranges(*cases[0])
    joined = joined_parts(sorted_parts)
    assert joined is not None and np.shares_memory(joined, sorted_parts[0])
    assert np.array_equal(joined, np.concatenate(sorted_parts))
    assert joined_parts([values[0:10], values[20:30]]) is None  # not consecutive
    assert joined_parts([values[0:10].copy(), values[10:20]]) is None  # not views of one array


@pytest.mark.skipif(not hasattr(__import__("os"), "getpriority"), reason="thread nice values are Linux-only")
def test_local_reads_leave_the_calling_threads_priority_alone(tmp_path, cite):
    # Reads run in the thread that asks: with inline reading (and at the first validation) that is the training
    # thread, which must keep its priority; only reader threads lower themselves.
    import os
    import threading

    d = cite.make_cite(n=40)
    src = ZarrSource(_store(tmp_path / "s.zarr", d))
    seen = {}

    def read():
        tid = threading.get_native_id()
        before = os.getpriority(os.PRIO_PROCESS, tid)
        rows = src.read(np.array([0, 3, 17, 39]))
        seen["nice"] = (before, os.getpriority(os.PRIO_PROCESS, tid))
        seen["rna"] = rows.rna.toarray()

    thread = threading.Thread(target=read)  # a fresh thread, so the test process's own threads are untouched
    thread.start()
    thread.join()
    assert seen["nice"][1] == seen["nice"][0]
    assert np.array_equal(seen["rna"], d.rna[[0, 3, 17, 39]].toarray())
