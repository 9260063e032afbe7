"""Out-of-core data: the constructor takes store paths (several = several studies, each its own batch), query
stores map onto a reference, and totalANVI predictions are written into a store chunk by chunk."""

import shutil
from dataclasses import replace

import numpy as np
import pytest
import zarr

from streamtotal import TOTALANVI, TOTALVI
from streamtotal.simulate import CiteSimulator
from streamtotal.simulate_writer import write_simulation

from .conftest import FAST, SMALL, TINY


@pytest.fixture(scope="module")
def studies(tmp_path_factory):
    """Three small studies with the same genes and proteins (different seeds)."""
    root = tmp_path_factory.mktemp("api-studies")
    paths = []
    for seed in (11, 12, 13):
        path = root / f"study{seed}.zarr"
        write_simulation(CiteSimulator(replace(SMALL, n_cells=160, n_batches=1, n_missing_proteins=0, seed=seed)),
                         path, progress=False)
        paths.append(str(path))
    return paths


def test_several_stores_and_a_query_store(studies):
    reference = TOTALVI(studies[:2], **TINY)
    assert "320 cells from" in repr(reference)
    reference.train(max_epochs=2, **FAST)
    assert list(reference._trained.registry.batch_categories) == ["study11", "study12"]
    latent = reference.get_latent_representation()
    assert latent.shape == (320, 4)
    # One store of the two, aligned onto the model: its cells embed as within the pair.
    np.testing.assert_allclose(reference.get_latent_representation(studies[1]), latent[160:], atol=1e-5)

    query = TOTALVI.load_query_data(studies[2], reference)
    query.train(max_epochs=2, **FAST)
    assert list(query._trained.registry.batch_categories) == ["study11", "study12", "study13"]
    assert query.get_latent_representation().shape == (160, 4)


def test_totalanvi_on_a_store_writes_predictions(store, tmp_path):
    copy = tmp_path / "copy.zarr"
    shutil.copytree(store, copy)
    model = TOTALANVI(str(copy), batch_key="batch", labels_key="cell_type", **TINY)
    model.train(max_epochs=2, **FAST)
    predicted = model.predict()
    written = model.predict(write_to="api")
    assert written, "nothing was written"
    root = zarr.open_group(str(copy), mode="r", use_consolidated=False)
    probabilities = next(root[k.split("/", 1)[0]][k.split("/", 1)[1]] for k in written.values() if "prob" in k)
    labels = np.asarray(model._trained.registry.label_categories, dtype=object)
    assert (labels[probabilities[:].argmax(axis=1)] == predicted).all()
