"""kNN label transfer for totalVI references, and ``map --predict`` over several query stores."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import anndata as ad
import numpy as np
import pytest
import torch
import zarr

from loaders.store_writer import ZarrStoreWriter
from streamtotal.cli.main import main
from streamtotal.config import DataConfig, RunConfig, TrainConfig
from streamtotal.errors import ConfigError
from streamtotal.inference.knn_transfer import (KnnConfig, KnnLabelTransfer, ReferenceLatent, nearest_neighbours,
                                                reference_latent, sample_per_label)
from streamtotal.inference.labels import predict_labels_many
from streamtotal.model.config import ModelConfig
from streamtotal.simulate import CiteSimulator, SimulationConfig
from streamtotal.surgery.map_query import map_query
from streamtotal.training.run_dir import load_trained
from streamtotal.training.trainer import Trainer

# Well separated cell types: many marker genes, every type with its own marker proteins.
SIM = dict(n_genes=100, n_proteins=6, n_cell_types=3, n_batches=2, n_missing_proteins=0, unlabeled_fraction=0.2,
           seed=7)
LABELS = ["type_0", "type_1", "type_2"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _write_stores(base):
    """One simulation (one truth) dealt out block by block into a reference and two query stores, each with cells
    of both batches (batches are contiguous in the simulation)."""
    sim = CiteSimulator(SimulationConfig(n_cells=1050, block_cells=50, **SIM))
    owner = {0: "ref", 1: "ref", 2: "ref", 3: "ref", 4: "query_a", 5: "query_a", 6: "query_b"}  # 600 / 300 / 150
    writers = {name: ZarrStoreWriter(base / f"{name}.zarr", sim.gene_names, sim.protein_names, panel_key="batch",
                                     source_file="test") for name in ("ref", "query_a", "query_b")}
    for i, (rna, protein, obs) in enumerate(sim.blocks()):
        writers[owner[i % 7]].append(rna, protein, obs)
    for writer in writers.values():
        writer.close()
    return base / "ref.zarr", [base / "query_a.zarr", base / "query_b.zarr"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("knn")
    ref, queries = _write_stores(base)
    config = RunConfig(data=DataConfig(stores=(str(ref),), batch_key="batch"),  # no labels: a plain totalVI run
                       model=ModelConfig(n_latent=6, n_hidden=32),
                       train=TrainConfig(max_epochs=8, batch_size=64, chunk_size=16, io_chunks=4, seed=3,
                                         checkpoint_every_steps=1000, progress=False))
    run = base / "reference"
    Trainer(config, run).fit()
    return base, ref, queries, run


def test_exact_chunked_search_matches_brute_force_and_votes_are_a_distribution():
    gen = torch.Generator().manual_seed(0)
    ref, query = torch.randn(1000, 5, generator=gen), torch.randn(77, 5, generator=gen)
    dist, idx = nearest_neighbours(query, ref, k=15, chunk=128)  # 8 chunks: the running top-k is merged
    full = torch.cdist(query.double(), ref.double())
    want_d, want_i = full.topk(15, largest=False)
    assert torch.equal(idx, want_i)
    assert torch.allclose(dist.double(), want_d, atol=1e-4)
    assert nearest_neighbours(query, ref[:4], k=15)[1].shape == (77, 4)  # k capped at the reference size

    codes = torch.arange(1000) % 3
    transfer = KnnLabelTransfer(ReferenceLatent(ref, codes, ["a", "b", "c"], {}, "r"), k=15, reference_chunk=100)
    out = transfer(query)
    assert torch.allclose(out["probs"].sum(1), torch.ones(77), atol=1e-5)
    assert torch.equal(out["uncertainty"], 1 - out["probs"].max(1).values)
    # A query cell sitting on one reference cell, far from the rest, takes its label with certainty ~1.
    lone = torch.cat([ref, torch.full((1, 5), 50.0)])
    far = KnnLabelTransfer(ReferenceLatent(lone, torch.cat([codes, torch.tensor([2])]), ["a", "b", "c"], {}, "r"),
                           k=1)(torch.full((1, 5), 50.0))
    assert far["code"].item() == 2 and far["uncertainty"].item() == pytest.approx(0.0)
    # Far-away neighbours at equal-ish distances do not underflow into NaN.
    assert torch.isfinite(transfer(query * 1e3)["probs"]).all()


def test_sample_per_label_caps_each_label_skips_unlabeled_and_is_seeded():
    codes = np.array([0] * 50 + [1] * 5 + [-1] * 30 + [2] * 20)
    ids = sample_per_label(codes, 3, 10, seed=4)
    assert np.bincount(codes[ids]).tolist() == [10, 5, 10] and (codes[ids] >= 0).all()
    assert np.array_equal(ids, sample_per_label(codes, 3, 10, seed=4)) and np.all(np.diff(ids) > 0)
    assert not np.array_equal(ids, sample_per_label(codes, 3, 10, seed=5))


def test_map_predict_transfers_labels_by_knn_into_each_of_two_query_stores(setup, tmp_path):
    base, ref, queries, run = setup
    stores = [shutil.copytree(q, tmp_path / q.name) for q in queries]
    out = tmp_path / "mapped"
    assert main(["map", str(run), *map(str, stores), "--out", str(out), "--epochs", "3", "--batch-key", "batch",
                 "--predict", "--labels-key", "cell_type", "--knn-max-cells-per-label", "120", "--no-progress"]) == 0
    # Two query stores are two studies: their batch_0 / batch_1 are new batches, kept apart by study.
    report = json.loads((out / "alignment.json").read_text())
    assert report["new_batches"] == ["query_a/batch_0", "query_a/batch_1", "query_b/batch_0", "query_b/batch_1"]
    for store, n in zip(stores, (300, 150)):
        adata = ad.read_zarr(store)
        assert adata.n_obs == n and list(adata.obs["streamtotal_label"].cat.categories) == LABELS  # no "unlabeled"
        probs = adata.obsm["streamtotal_label_probs"]
        assert probs.shape == (n, 3) and np.allclose(probs.sum(1), 1, atol=1e-5)
        assert np.allclose(adata.obs["streamtotal_label_uncertainty"], 1 - probs.max(1), atol=1e-6)
        truth = adata.obs["cell_type"].astype(str).to_numpy()
        labelled = truth != "unlabeled"
        accuracy = (adata.obs["streamtotal_label"].astype(str).to_numpy()[labelled] == truth[labelled]).mean()
        assert accuracy > 0.8, f"{store.name}: kNN accuracy {accuracy:.2f} (chance 0.33)"

    # Deterministic: predicting again (the predict command reads the stores together, as map did) gives the same.
    assert main(["predict", str(out), *map(str, stores), "--prefix", "again", "--labels-key", "cell_type",
                 "--knn-max-cells-per-label", "120", "--no-progress"]) == 0
    for store in stores:
        adata = ad.read_zarr(store)
        assert np.array_equal(adata.obsm["again_label_probs"], adata.obsm["streamtotal_label_probs"])
        attrs = zarr.open_group(str(store / "obsm"), mode="r")["again_label_probs"].attrs["streamtotal"]
        assert attrs["method"] == "knn" and attrs["k"] == 15
        assert attrs["reference_cells_per_label"] == dict.fromkeys(LABELS, 120)  # capped, "unlabeled" excluded


def test_predict_needs_labels_or_a_writable_store_before_any_training(setup, tmp_path):
    base, ref, queries, run = setup
    with pytest.raises(ConfigError, match="--labels-key"):
        map_query(run, [queries[0]], tmp_path / "q", predict=True, epochs=1)
    assert not (tmp_path / "q").exists()  # refused before training
    adata = ad.read_zarr(queries[0])
    h5ad = tmp_path / "query.h5ad"
    adata.write_h5ad(h5ad)
    with pytest.raises(ConfigError, match="not a local AnnData Zarr"):
        map_query(run, [h5ad], tmp_path / "q", predict=True, knn=KnnConfig(labels_key="cell_type"), epochs=1)
    assert not (tmp_path / "q").exists()
    # A column without labels is refused with the column and the stores named.
    with pytest.raises(ConfigError, match="no_such_column"):
        predict_labels_many(run, [queries[0]], write_back=False, progress=False,
                            knn=KnnConfig(labels_key="no_such_column"))


def test_reference_latent_read_from_an_embedded_store_equals_encoding_it(setup, tmp_path):
    base, ref, queries, run = setup
    store = shutil.copytree(ref, tmp_path / "ref.zarr")
    assert main(["embed", str(run), str(store), "--no-progress"]) == 0  # obsm/X_streamtotal
    # The reference run's stores are what kNN samples from: point them at the embedded copy.
    trained = load_trained(run)
    trained = replace(trained, config=replace(trained.config, data=replace(trained.config.data, stores=(str(store),))))
    knn = KnnConfig(labels_key="cell_type", max_cells_per_label=50)
    read = reference_latent(trained, replace(knn, latent_key="X_streamtotal"))
    computed = reference_latent(trained, knn)
    assert torch.equal(read.codes, computed.codes) and read.cells_per_label == dict.fromkeys(LABELS, 50)
    assert torch.allclose(read.latent, computed.latent, atol=1e-5)
    with pytest.raises(ConfigError, match="obsm/missing_key"):
        reference_latent(trained, replace(knn, latent_key="missing_key"))
