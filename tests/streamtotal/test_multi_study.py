"""Training on several studies at once: genes and proteins aligned by name, unmeasured proteins masked."""

import json

import anndata as ad
import numpy as np

from loaders.ingest import ingest
from streamtotal.config import DataConfig, RunConfig, TrainConfig
from streamtotal.inference.embed import embed
from streamtotal.model.config import ModelConfig
from streamtotal.simulate import CiteSimulator, SimulationConfig
from streamtotal.training.trainer import Trainer


def _study(tmp_path, name, seed, genes=None, proteins=None):
    sim = CiteSimulator(SimulationConfig(n_cells=300, n_genes=50, n_proteins=6, n_batches=2, n_missing_proteins=0,
                                         n_cell_types=3, seed=seed))
    adata = sim.to_anndata()
    if genes is not None:
        adata = adata[:, genes].copy()
    if proteins is not None:
        adata.obsm["protein_expression"] = adata.obsm["protein_expression"][proteins]
        adata.uns["protein_names"] = list(proteins)
    h5ad = tmp_path / f"{name}.h5ad"
    adata.write_h5ad(h5ad)
    store = tmp_path / f"{name}.zarr"
    ingest(h5ad, store, batch_key="batch", progress=False)
    return store, adata


def test_two_studies_with_different_genes_and_panels_train_and_embed(tmp_path):
    a_store, a = _study(tmp_path, "study_a", seed=1)
    # Study B: genes in another order with 10 missing, and only 4 of the 6 proteins, shuffled.
    genes_b = [f"GENE{i:05d}" for i in range(49, 9, -1)]
    b_store, b = _study(tmp_path, "study_b", seed=2, genes=genes_b, proteins=["PROT005", "PROT001", "PROT000", "PROT003"])
    config = RunConfig(data=DataConfig(stores=(str(a_store), str(b_store)), batch_key="batch"),
                       model=ModelConfig(n_latent=4, n_hidden=32),
                       train=TrainConfig(max_epochs=2, batch_size=64, progress=False))
    trainer = Trainer(config, tmp_path / "run")
    registry = trainer.registry
    assert list(registry.gene_names) == [f"GENE{i:05d}" for i in range(10, 50)]  # first study's order, shared genes
    assert list(registry.protein_names) == [f"PROT{i:03d}" for i in range(6)]
    assert registry.study_protein_masks.tolist() == [[True] * 6, [True, True, False, True, False, True]]
    assert len(registry.batch_categories) == 4  # study-prefixed batches never collide

    batch = trainer.collection.read(np.arange(trainer.collection.n_obs))
    in_b = np.arange(600) >= 300
    assert not batch.protein_mask[in_b][:, [2, 4]].any() and batch.protein_mask[~in_b].all()
    np.testing.assert_array_equal(batch.protein[in_b][:, 5].numpy(), b.obsm["protein_expression"]["PROT005"])
    np.testing.assert_array_equal(batch.rna[in_b][:, 0].numpy(), b[:, "GENE00010"].X.toarray().ravel())

    summary = trainer.fit()
    assert np.isfinite(summary.validation["neg_elbo"])
    saved = json.loads((tmp_path / "run" / "registry.json").read_text())
    assert saved["study_names"] == ["study_a", "study_b"]
    for store in (a_store, b_store):
        embed(tmp_path / "run", str(store), progress=False)
        latent = ad.read_zarr(store).obsm["X_streamtotal"]
        assert latent.shape == (300, 4) and np.isfinite(latent).all()
