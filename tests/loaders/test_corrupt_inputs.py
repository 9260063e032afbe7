"""Nothing read is silently wrong: lost or truncated chunk files of a store, corrupt CSR structure in an h5ad or a 10x
file, and temporaries of killed ingests (issue 14, items 2 and 3)."""

import os
import subprocess
import sys
import textwrap

import h5py
import numpy as np
import pytest
import zarr

from loaders import Collection, H5adSource, StreamConfig, StreamLoader, ZarrSource
from loaders.errors import StoreFormatError
from loaders.ingest import ingest
from loaders.store_layout import StoreLayoutConfig

SMALL = StoreLayoutConfig(chunk_cells=4, min_chunk_elements=8)
"""Tiny chunks: a store of 60 cells has many data/indices chunks, so one can be lost in the middle."""


@pytest.fixture
def store(tmp_path, cite):
    """A store ingested from a real h5ad, with many small X/data and X/indices chunks."""
    d = cite.make_cite(n=60)
    cite.write_h5ad(tmp_path / "study.h5ad", d)
    path = tmp_path / "study.zarr"
    ingest(tmp_path / "study.h5ad", path, batch_key="batch", layout=SMALL, progress=False)
    assert len([p for p in (path / "X" / "data").iterdir() if p.name.isdigit()]) > 4
    return path


def _epoch(source):
    """One epoch of the loader that training consumes."""
    collection = Collection([source], batch_key="batch", labels_key="cell_type")
    loader = StreamLoader(collection, np.arange(collection.n_obs), StreamConfig(batch_size=16, chunk_size=4,
                                                                                io_chunks=3, seed=0))
    loader.set_epoch(0)
    return list(loader)


@pytest.mark.parametrize("array", ["data", "indices"])
@pytest.mark.parametrize("direct", [True, False], ids=["direct", "zarr"])
def test_a_lost_csr_chunk_is_an_error_naming_it_not_zeros(store, array, direct):
    (store / "X" / array / "3").unlink()
    source = ZarrSource(store, direct_local_reads=direct)
    chunk = str(store / "X" / array / "3") if direct else f"X/{array}/3"
    with pytest.raises(StoreFormatError, match="missing") as err:
        source.read(np.arange(60))
    assert chunk in str(err.value) and str(store) in str(err.value)
    with pytest.raises(StoreFormatError, match="missing") as err:
        _epoch(source)
    assert chunk in str(err.value)
    # Cells whose entries lie in other chunks are still read.
    assert source.read(np.array([0, 1])).rna.shape == (2, 12)


def test_training_on_a_store_with_a_lost_chunk_exits_2_naming_the_chunk(store, tmp_path):
    (store / "X" / "data" / "5").unlink()
    proc = subprocess.run(
        [sys.executable, "-m", "streamtotal", "train", str(store), "--out", str(tmp_path / "run"), "--batch-key",
         "batch", "--epochs", "1", "--batch-size", "16", "--device", "cpu", "--no-progress"],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 2, proc.stderr
    assert f"chunk file {store / 'X' / 'data' / '5'}" in proc.stderr and "missing" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_lost_indptr_chunk_is_refused_when_the_store_is_opened(tmp_path, cite):
    d = cite.make_cite(n=60)
    cite.write_h5ad(tmp_path / "study.h5ad", d)
    path = tmp_path / "study.zarr"
    ingest(tmp_path / "study.h5ad", path, layout=StoreLayoutConfig(indptr_chunk=16), progress=False)
    # Chunk 0 of indptr holds zeros for the first cells only if they are empty: zarr would read it so, silently.
    (path / "X" / "indptr" / "0").unlink()
    with pytest.raises(StoreFormatError, match=r"chunk 'X/indptr/0' is missing"):
        ZarrSource(path)


def test_ingest_writes_every_csr_chunk_even_one_of_only_the_fill_value(tmp_path, cite):
    """One gene: every column index is 0, zarr's fill value; those chunks are written all the same, so that a reader
    can tell a lost chunk from zeros."""
    d = cite.make_cite(n=60, n_genes=1)
    cite.write_h5ad(tmp_path / "study.h5ad", d)
    path = tmp_path / "study.zarr"
    ingest(tmp_path / "study.h5ad", path, layout=SMALL, progress=False)
    indices = zarr.open_array(str(path / "X" / "indices"), mode="r")
    assert indices.nchunks > 1 and indices.nchunks_initialized == indices.nchunks and not indices[...].any()
    assert np.array_equal(ZarrSource(path).read(np.arange(60)).rna.toarray(), d.rna.toarray())


def test_absent_protein_chunks_of_an_unmeasured_panel_still_read_as_zeros(tmp_path, cite):
    """Dense arrays keep zarr's rule: a chunk holding only zeros is not written and reads as zeros."""
    d = cite.make_cite(n=64)
    d.protein[:] = 0
    cite.write_h5ad(tmp_path / "study.h5ad", d)
    path = tmp_path / "study.zarr"
    ingest(tmp_path / "study.h5ad", path, layout=SMALL, progress=False)
    assert not [p for p in (path / "obsm" / "protein_expression").iterdir() if p.name[0].isdigit()]
    rows = ZarrSource(path).read(np.arange(64))
    assert np.array_equal(rows.protein, d.protein) and np.array_equal(rows.rna.toarray(), d.rna.toarray())


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "zarr"])
def test_a_truncated_chunk_is_an_error_naming_the_file(store, direct):
    chunk = store / "X" / "data" / "2"
    chunk.write_bytes(chunk.read_bytes()[:-7])
    source = ZarrSource(store, direct_local_reads=direct)
    with pytest.raises(StoreFormatError, match="truncated or corrupt") as err:
        source.read(np.arange(60))
    assert (str(chunk) if direct else "chunk 'X/data/2'") in str(err.value) and str(store) in str(err.value)


def test_an_uncompressed_chunk_cut_short_is_an_error_not_missing_rows(tmp_path, cite):
    d = cite.make_cite(n=60)
    cite.write_h5ad(tmp_path / "study.h5ad", d)
    path = tmp_path / "study.zarr"
    ingest(tmp_path / "study.h5ad", path, layout=StoreLayoutConfig(chunk_cells=4, min_chunk_elements=8, codec=None),
           progress=False)
    chunk = path / "X" / "indices" / "1"
    chunk.write_bytes(chunk.read_bytes()[:8])
    with pytest.raises(StoreFormatError, match="fewer than") as err:
        ZarrSource(path).read(np.arange(60))
    assert str(chunk) in str(err.value)


def test_a_lost_chunk_on_object_storage_is_an_error_naming_it(store, s3_server):
    fs = s3_server.filesystem()
    bucket = f"bucket-{store.parent.name.lower().replace('_', '-')[-40:]}"
    fs.mkdir(bucket)
    fs.put(str(store), f"{bucket}/study.zarr", recursive=True)
    fs.rm(f"{bucket}/study.zarr/X/indices/3")
    source = ZarrSource(f"s3://{bucket}/study.zarr", storage_options=s3_server.storage_options())
    with pytest.raises(StoreFormatError, match=r"chunk 'X/indices/3' is missing") as err:
        source.read(np.arange(60))
    assert f"s3://{bucket}/study.zarr" in str(err.value)


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "zarr"])
@pytest.mark.parametrize("bad", [-1, 12, 2**31 - 1])
def test_out_of_range_column_indices_in_a_store_are_an_error_naming_the_row(store, direct, bad):
    """A store written before ingest checked its input (or damaged since) must not index out of bounds."""
    indices = zarr.open_array(str(store / "X" / "indices"), mode="r+")
    indptr = zarr.open_array(str(store / "X" / "indptr"), mode="r")[...]
    entry = int(indptr[40]) + 1
    indices[entry] = bad
    row = int(np.searchsorted(indptr, entry, side="right") - 1)
    source = ZarrSource(store, direct_local_reads=direct)
    pattern = rf"X/indices: column index {bad} at row {row} \(entry {entry}\) is outside \[0, 12\)"
    with pytest.raises(StoreFormatError, match=pattern):
        source.read(np.arange(60))
    with pytest.raises(StoreFormatError, match=pattern):
        source.read(np.array([row]))
    assert source.read(np.array([0, row + 1])).rna.shape == (2, 12)


def _overwrite_bytes(path, dataset: str, value: bytes, *, skip: int = 8) -> None:
    """Overwrites the stored bytes of an uncompressed HDF5 dataset in place (as a damaged disk or copy would)."""
    with h5py.File(path, "r") as f:
        ds = f[dataset]
        assert ds.compression is None
        offset = ds.id.get_offset() if ds.chunks is None else ds.id.get_chunk_info(0).byte_offset
        size = ds.size * ds.dtype.itemsize if ds.chunks is None else ds.id.get_chunk_info(0).size
    with open(path, "r+b") as fh:
        fh.seek(offset + skip)
        fh.write(value * ((size - skip) // len(value)))


@pytest.fixture
def corrupt_h5ad(tmp_path, cite):
    """A real h5ad whose X/indices is 0xFF bytes (read as -1) after its first two entries."""
    path = tmp_path / "corrupt.h5ad"
    cite.write_h5ad(path, cite.make_cite(n=60))
    _overwrite_bytes(path, "X/indices", b"\xff")
    with h5py.File(path, "r") as f:
        assert f["X/indices"][5] == -1
    return path


def test_ingest_of_an_h5ad_with_corrupt_indices_exits_2_naming_file_and_array(corrupt_h5ad, tmp_path):
    target = tmp_path / "out" / "study.zarr"
    proc = subprocess.run(
        [sys.executable, "-m", "streamtotal", "ingest", str(corrupt_h5ad), "--out", str(target), "--no-progress"],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 2, proc.stderr
    assert str(corrupt_h5ad) in proc.stderr and "X/indices" in proc.stderr and "column index -1" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not target.exists() and not [p.name for p in target.parent.iterdir() if p.name.startswith(".")]


def test_an_h5ad_with_corrupt_indices_opened_directly_is_a_clear_error(corrupt_h5ad):
    source = H5adSource(corrupt_h5ad)
    with pytest.raises(StoreFormatError, match=r"X/indices: column index -1 at row \d+ \(entry 2\)") as err:
        source.read(np.arange(60))
    assert str(corrupt_h5ad) in str(err.value)
    with pytest.raises(StoreFormatError, match="column index -1"):
        _epoch(source)


def test_an_h5ad_with_a_corrupt_compressed_chunk_is_a_clear_error(tmp_path, cite):
    path = tmp_path / "gzip.h5ad"
    cite.to_anndata(cite.make_cite(n=60)).write_h5ad(path, compression="gzip")
    with h5py.File(path, "r") as f:
        info = f["X/data"].id.get_chunk_info(0)
    with open(path, "r+b") as fh:
        fh.seek(info.byte_offset + 4)
        fh.write(b"\x13" * (info.size - 4))
    source = H5adSource(path)
    with pytest.raises(StoreFormatError, match=r"X/data cannot be read at \d+\.\.\d+ .*truncated or corrupt") as err:
        source.read(np.arange(60))
    assert str(path) in str(err.value)
    with pytest.raises(StoreFormatError, match="X/data cannot be read"):
        ingest(path, tmp_path / "out.zarr", progress=False)
    assert not (tmp_path / "out.zarr").exists()


def test_an_h5ad_with_a_corrupt_indptr_is_refused_when_opened_and_ingested(tmp_path, cite):
    path = tmp_path / "corrupt.h5ad"
    cite.write_h5ad(path, cite.make_cite(n=60))
    _overwrite_bytes(path, "X/indptr", b"\x00\x00\x00\x00\x00\x00\x00\x7f", skip=16)
    with pytest.raises(StoreFormatError, match="X/indptr") as err:
        H5adSource(path)
    assert str(path) in str(err.value)
    with pytest.raises(StoreFormatError, match="X/indptr"):
        ingest(path, tmp_path / "out.zarr", progress=False)
    assert not (tmp_path / "out.zarr").exists()


def test_a_10x_file_with_an_out_of_range_feature_index_is_refused(tmp_path, cite):
    path = tmp_path / "tenx.h5"
    cite.write_tenx_h5(path, cite.make_cite(n=30))
    with h5py.File(path, "r+") as f:
        indices = f["matrix/indices"][...]
        indices[7] = 10_000
        del f["matrix/indices"]
        f["matrix"].create_dataset("indices", data=indices)
    with pytest.raises(StoreFormatError, match=r"matrix/indices: column index 10000 at row \d+ \(entry 7\)"):
        ingest(path, tmp_path / "out.zarr", progress=False)
    assert not (tmp_path / "out.zarr").exists()


_WRITER = textwrap.dedent("""
    import os, signal, sys
    import numpy as np, scipy.sparse as sp
    from loaders.store_writer import ZarrStoreWriter
    w = ZarrStoreWriter(sys.argv[1], ["G0", "G1"], ["P0"], overwrite=True)
    w.append(sp.csr_matrix(np.ones((3, 2), np.float32)), np.ones((3, 1), np.float32))
    print("writing", flush=True)
    if sys.argv[2] == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    sys.stdin.readline()  # a live writer: holds its temporary until told to go on
    w.close()
""")


def _writer(target, mode):
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(target), mode], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    return proc


def _temporaries(folder, name):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(f".{name}.tmp-"))


def test_a_killed_ingests_temporary_is_removed_by_the_next_success_but_no_live_or_other_ones(tmp_path, cite):
    cite.write_h5ad(tmp_path / "study.h5ad", cite.make_cite(n=20))
    target = tmp_path / "study.zarr"
    killed = _writer(target, "kill")
    assert killed.wait(timeout=600) == -9
    stale = _temporaries(tmp_path, "study.zarr")
    assert len(stale) == 1
    live = _writer(target, "live")
    other = _writer(tmp_path / "other.zarr", "kill")
    assert other.wait(timeout=600) == -9
    both = _temporaries(tmp_path, "study.zarr")
    assert len(both) == 2
    try:
        ingest(tmp_path / "study.h5ad", target, progress=False)
        # The killed run's temporary is gone; the live writer's and another target's are left alone.
        assert _temporaries(tmp_path, "study.zarr") == [n for n in both if n not in stale]
        assert len(_temporaries(tmp_path, "other.zarr")) == 1
    finally:
        live.communicate("go\n", timeout=600)
    assert live.returncode == 0 and _temporaries(tmp_path, "study.zarr") == []
    assert os.path.isdir(target)


def test_a_killed_soma_ingests_temporary_is_removed_by_the_next_success(tmp_path, cite):
    from loaders.ingest.soma_ingest import ingest_soma

    cite.write_h5ad(tmp_path / "study.h5ad", cite.make_cite(n=20))
    out = tmp_path / "out" / "study.soma"
    # What a killed writer leaves: its temporary, written but no longer locked by any process.
    stale = tmp_path / "out" / ".study.soma.tmp-0123456789ab"
    (stale / "ms").mkdir(parents=True)
    (stale / "ms" / "half-written").write_bytes(b"\0" * 100)
    other = tmp_path / "out" / ".another.soma.tmp-0123456789ab"
    other.mkdir()
    ingest_soma(tmp_path / "study.h5ad", out, progress=False)
    assert sorted(os.listdir(out.parent)) == [other.name, "study.soma"]
