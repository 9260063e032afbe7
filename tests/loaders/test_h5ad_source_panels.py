"""``H5adSource(protein_panels=, protein_panel_codes=)``: panels given by the caller replace the file's, survive
pickling (a worker re-opens the Source from its arguments) and are checked against the file's shape."""

import pickle

import numpy as np
import pytest

from loaders.collection import Collection
from loaders.errors import StoreFormatError
from loaders.h5ad_source import H5adSource


def test_given_panels_replace_the_files_and_survive_pickling(tmp_path, cite):
    d = cite.make_cite(n=30, n_proteins=5)
    cite.write_h5ad(tmp_path / "s.h5ad", d)
    plain = H5adSource(tmp_path / "s.h5ad")
    assert plain.protein_panels.shape == (1, 5) and (plain.protein_panel_codes() == 0).all()
    panels = np.array([[True] * 5, [False, False, True, True, True]])
    codes = np.arange(30) % 2
    src = H5adSource(tmp_path / "s.h5ad", protein_panels=panels, protein_panel_codes=codes)
    for source in (src, pickle.loads(pickle.dumps(src))):
        np.testing.assert_array_equal(source.protein_panels, panels)
        np.testing.assert_array_equal(source.protein_panel_codes(), codes)
    # The Collection masks the proteins a cell's panel lacks.
    batch = Collection([src]).read(np.array([0, 1, 2, 3]))
    mask = batch.protein_mask.numpy()
    assert mask[[0, 2]].all() and not mask[[1, 3]][:, :2].any() and mask[[1, 3]][:, 2:].all()
    one = H5adSource(tmp_path / "s.h5ad", protein_panels=[[True, False, True, True, True]])
    assert (one.protein_panel_codes() == 0).all() and one.protein_panels.tolist() == [[True, False, True, True, True]]


@pytest.mark.parametrize("panels, codes, message", [
    (None, np.zeros(30, dtype=int), "protein_panel_codes given without protein_panels"),
    (np.ones((1, 4), dtype=bool), None, "protein_panels must be \\[n_panels >= 1, n_proteins=5\\] bool; got shape"),
    (np.ones((2, 5), dtype=bool), None, "2 protein panels need protein_panel_codes"),
    (np.ones((2, 5), dtype=bool), np.zeros(29, dtype=int), "protein_panel_codes must be \\[n_obs=30\\] int"),
    (np.ones((2, 5), dtype=bool), np.full(30, 2), "protein_panel_codes must lie in \\[0, 2\\); got 2..2"),
])
def test_given_panels_that_do_not_fit_are_refused(tmp_path, cite, panels, codes, message):
    cite.write_h5ad(tmp_path / "s.h5ad", cite.make_cite(n=30, n_proteins=5))
    with pytest.raises(StoreFormatError, match=f"study 's' .*{message}"):
        H5adSource(tmp_path / "s.h5ad", protein_panels=panels, protein_panel_codes=codes)
