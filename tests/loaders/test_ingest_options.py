"""Tests of loaders.ingest.ingest_options: ``ingest`` and ``ingest_soma`` take one ``IngestOptions`` or its fields
as keyword arguments, alike."""

import anndata as ad
import numpy as np
import pytest

from loaders.ingest import IngestOptions, ingest
from loaders.ingest.soma_ingest import ingest_soma
from loaders.soma_source import SomaSource


def test_options_and_keyword_arguments_write_the_same_store(tmp_path, cite):
    d = cite.make_cite()
    cite.write_h5ad(tmp_path / "in.h5ad", d)
    options = IngestOptions(batch_key="batch", block_cells=16, progress=False)
    by_options = ingest(tmp_path / "in.h5ad", tmp_path / "a.zarr", options)
    by_keywords = ingest(tmp_path / "in.h5ad", tmp_path / "b.zarr", batch_key="batch", block_cells=16,
                         progress=False)
    assert by_options.missing_proteins == by_keywords.missing_proteins == {"b2": ["P0", "P1"]}
    a, b = ad.read_zarr(tmp_path / "a.zarr"), ad.read_zarr(tmp_path / "b.zarr")
    assert np.array_equal(a.X.toarray(), b.X.toarray()) and a.uns["streamtotal"]["n_cells"] == 60
    # A keyword argument replaces that field of the options: here the existing store may be replaced.
    ingest(tmp_path / "in.h5ad", tmp_path / "a.zarr", options, overwrite=True)
    assert options.overwrite is False


def test_ingest_soma_takes_the_same_options(tmp_path, cite):
    d = cite.make_cite()
    cite.write_h5ad(tmp_path / "in.h5ad", d)
    report = ingest_soma(tmp_path / "in.h5ad", tmp_path / "e.soma",
                         IngestOptions(batch_key="batch", block_cells=7, progress=False), study_name="one")
    assert report.n_cells == 60 and report.missing_proteins == {"b2": ["P0", "P1"]}
    assert SomaSource(tmp_path / "e.soma").n_obs == 60


def test_unknown_option_and_bad_block_size_are_refused(tmp_path):
    with pytest.raises(TypeError, match=r"ingest\(\) got unexpected keyword arguments \['batch'\]"):
        ingest(tmp_path / "in.h5ad", tmp_path / "s.zarr", batch="batch")
    with pytest.raises(TypeError, match=r"ingest_soma\(\) got unexpected keyword arguments \['blocks'\]"):
        ingest_soma(tmp_path / "in.h5ad", tmp_path / "s.soma", blocks=3)
    with pytest.raises(ValueError, match="block_cells must be >= 1, got 0"):
        IngestOptions(block_cells=0)
    assert not any(tmp_path.iterdir())
