"""The TileDB-SOMA backend through streamtotal: ingest --format soma (and --append), training from an Experiment
with a value filter, and the same Experiment read from S3 (a real moto server on 127.0.0.1)."""

import numpy as np
import pytest
import torch

pytest.importorskip("tiledbsoma")

from loaders import Collection, StreamConfig, StreamLoader  # noqa: E402
from streamtotal.cli.main import main  # noqa: E402
from streamtotal.config import DataConfig  # noqa: E402
from streamtotal.data import open_source  # noqa: E402
from streamtotal.simulate import CiteSimulator, SimulationConfig  # noqa: E402


@pytest.fixture(scope="module")
def h5ads(tmp_path_factory):
    root = tmp_path_factory.mktemp("soma")
    paths = []
    for seed in (1, 2):
        sim = CiteSimulator(SimulationConfig(n_cells=300, n_genes=40, n_proteins=6, n_batches=2,
                                             n_missing_proteins=1, n_cell_types=3, seed=seed))
        adata = sim.to_anndata()
        adata.obs_names = [f"s{seed}_{n}" for n in adata.obs_names]
        path = root / f"study{seed}.h5ad"
        adata.write_h5ad(path)
        paths.append(path)
    return paths


def _batches(source):
    collection = Collection([source], batch_key="batch")
    loader = StreamLoader(collection, np.arange(collection.n_obs), StreamConfig(batch_size=32, chunk_size=8,
                                                                                io_chunks=2, seed=4))
    loader.set_epoch(1)
    return list(loader)


def test_ingest_soma_append_and_train_with_a_value_filter(h5ads, tmp_path):
    soma = tmp_path / "atlas.soma"
    assert main(["ingest", str(h5ads[0]), "--out", str(soma), "--format", "soma", "--batch-key", "batch",
                 "--no-progress"]) == 0
    assert main(["ingest", str(h5ads[1]), "--out", str(soma), "--format", "soma", "--append", "--batch-key",
                 "batch", "--study-name", "study2", "--no-progress"]) == 0
    source = open_source(str(soma))
    assert source.n_obs == 600
    only = open_source(str(soma), data=DataConfig(soma_value_filter="batch == 'batch_1'"))
    assert 0 < only.n_obs < 600 and set(only.obs_column("batch")) == {"batch_1"}

    config = tmp_path / "run.toml"
    config.write_text("[data]\nsoma_value_filter = \"batch == 'batch_1'\"\n[model]\nn_latent = 3\nn_hidden = 16\n"
                      "[train]\nmax_epochs = 1\nbatch_size = 64\nprogress = false\n")
    run = tmp_path / "run"
    assert main(["train", str(soma), "--out", str(run), "--batch-key", "batch", "--config", str(config)]) == 0
    import json

    registry = json.loads((run / "registry.json").read_text())
    # The Experiment holds two ingested studies: they open as two Sources, so batches are study-prefixed.
    assert registry["study_names"] == ["study1", "study2"]
    assert registry["batch_categories"] == ["study1/batch_1", "study2/batch_1"]


def test_zarr_append_flags_are_refused_clearly(h5ads, tmp_path, capsys):
    assert main(["ingest", str(h5ads[0]), "--out", str(tmp_path / "x.zarr"), "--append", "--no-progress"]) == 2
    assert "--format soma" in capsys.readouterr().err


def test_soma_experiment_on_s3_reads_like_local(h5ads, tmp_path, s3_server, monkeypatch):
    soma = tmp_path / "one.soma"
    assert main(["ingest", str(h5ads[0]), "--out", str(soma), "--format", "soma", "--batch-key", "batch",
                 "--no-progress"]) == 0
    fs = s3_server.filesystem()
    fs.mkdir("soma-bucket")
    fs.put(str(soma), "soma-bucket/one.soma", recursive=True)
    s3_server.set_environment(monkeypatch)
    local, remote = open_source(str(soma)), open_source("s3://soma-bucket/one.soma")
    assert remote.n_obs == local.n_obs == 300
    np.testing.assert_array_equal(remote.gene_names, local.gene_names)
    for a, b in zip(_batches(local), _batches(remote)):
        for field in ("rna", "protein", "protein_mask", "batch", "cell_id"):
            assert torch.equal(getattr(a, field), getattr(b, field)), field


def test_appended_study_with_fewer_genes_lists_only_its_genes(tmp_path):
    sim = CiteSimulator(SimulationConfig(n_cells=200, n_genes=30, n_proteins=5, n_batches=2, n_missing_proteins=0,
                                         seed=7))
    full = sim.to_anndata()
    full.write_h5ad(tmp_path / "a.h5ad")
    fewer = CiteSimulator(SimulationConfig(n_cells=150, n_genes=30, n_proteins=5, n_batches=2,
                                           n_missing_proteins=0, seed=8)).to_anndata()[:, 10:].copy()
    fewer.obs_names = [f"b{i}" for i in range(fewer.n_obs)]
    fewer.write_h5ad(tmp_path / "b.h5ad")
    soma = tmp_path / "two.soma"
    assert main(["ingest", str(tmp_path / "a.h5ad"), "--out", str(soma), "--format", "soma", "--no-progress"]) == 0
    assert main(["ingest", str(tmp_path / "b.h5ad"), "--out", str(soma), "--format", "soma", "--append",
                 "--study-name", "b", "--no-progress"]) == 0
    from streamtotal.data import open_collection

    collection = open_collection(DataConfig(stores=(str(soma),)))
    names = [s.name for s in collection.sources]
    assert len(names) == 2 and names[1] == "b"
    assert len(collection.sources[0].gene_names) == 30 and len(collection.sources[1].gene_names) == 20
    assert list(collection.registry.gene_names) == list(full.var_names[10:])  # inner join: the shared genes
    rows = collection.read(np.arange(200, 350))  # study b's cells, read through the Experiment
    np.testing.assert_array_equal(rows.rna.numpy(), fewer.X.toarray())
