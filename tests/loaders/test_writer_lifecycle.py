"""Tests of loaders.writer_lifecycle through both store writers (zarr and TileDB-SOMA): a failed close leaves
nothing, a closed or aborted writer refuses more blocks, and a close removes what killed writes left behind."""

import os

import pytest

from loaders.errors import StoreFormatError
from loaders.ingest.soma_writer import SomaExperimentWriter
from loaders.store_writer import ZarrStoreWriter


def _zarr_writer(path, d):
    return ZarrStoreWriter(path, d.genes, d.proteins)


def _soma_writer(path, d):
    return SomaExperimentWriter(path, d.genes, d.proteins, d.obs, study_name="s1")


def _append(writer, d, stop):
    if isinstance(writer, ZarrStoreWriter):
        writer.append(d.rna[:stop], d.protein[:stop], d.obs.iloc[:stop])
    else:
        writer.append(d.rna[:stop], d.protein[:stop])


WRITERS = pytest.mark.parametrize("make, name", [(_zarr_writer, "s.zarr"), (_soma_writer, "s.soma")],
                                  ids=["zarr", "soma"])


@WRITERS
def test_a_failed_close_aborts_and_the_writer_refuses_more_blocks(tmp_path, cite, make, name):
    d = cite.make_cite(n=10)
    w = make(tmp_path / name, d)
    if isinstance(w, SomaExperimentWriter):
        _append(w, d, 4)  # fewer cells than obs lists: close refuses
        expected = "4 cells written for 10 rows of obs"
    else:
        expected = "no cells were written"
    with pytest.raises(StoreFormatError, match=expected):
        w.close()
    assert os.listdir(tmp_path) == []
    with pytest.raises(RuntimeError, match=f"{type(w).__name__} for .*{name} is aborted"):
        _append(w, d, 1)


@WRITERS
def test_close_publishes_removes_stale_temporaries_and_a_later_abort_keeps_the_output(tmp_path, cite, make, name):
    d = cite.make_cite(n=10)
    stale = tmp_path / f".{name}.tmp-killedwriter"  # left by a kill -9: nobody holds its lock
    stale.mkdir()
    (stale / "partial").write_text("x")
    with make(tmp_path / name, d) as w:
        _append(w, d, 10)
    assert sorted(os.listdir(tmp_path)) == [name]
    w.abort()
    assert sorted(os.listdir(tmp_path)) == [name] and os.listdir(tmp_path / name)
    with pytest.raises(RuntimeError, match="is closed"):
        _append(w, d, 1)
