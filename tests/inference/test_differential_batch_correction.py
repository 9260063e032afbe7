"""Differential expression with ``batch_correction`` (scvi-tools' meaning): each group's samples are decoded under
the chosen batches and pooled, and paired within a batch when both groups use the same batches."""

import logging

import numpy as np
import pandas as pd
import pytest
import torch

from streamtotal.cli.main import main
from streamtotal.cli.simulate_cmd import write_simulation
from streamtotal.config import DataConfig, RunConfig, TrainConfig
from streamtotal.errors import ConfigError, SelectionError
from streamtotal.inference.differential import DEOptions, DifferentialExpression, pair_samples
from streamtotal.inference.posterior import decode, draw_posterior
from streamtotal.model.config import ModelConfig
from streamtotal.simulate import CiteSimulator, SimulationConfig
from streamtotal.training.trainer import Trainer


@pytest.fixture(scope="module")
def three_batches(tmp_path_factory):
    """A tiny model trained on three batches (names ``batch_0`` .. ``batch_2``) of two cell types."""
    root = tmp_path_factory.mktemp("de-batches")
    sim = CiteSimulator(SimulationConfig(n_cells=300, n_genes=24, n_proteins=4, n_cell_types=2, n_batches=3,
                                         n_missing_proteins=0, unlabeled_fraction=0.0, block_cells=300, seed=7))
    store = root / "three.zarr"
    write_simulation(sim, store, progress=False)
    config = RunConfig(
        data=DataConfig(stores=(str(store),), batch_key="batch"),
        model=ModelConfig(n_latent=4, n_hidden=16),
        train=TrainConfig(max_epochs=3, batch_size=64, lr=1e-2, validation_fraction=0.0, chunk_size=16,
                          io_chunks=4, seed=1, progress=False, checkpoint_every_steps=100000),
    )
    torch.set_num_threads(1)
    Trainer(config, root / "run").fit()
    return root / "run", store


@pytest.fixture(scope="module")
def de(three_batches):
    run, store = three_batches
    return DifferentialExpression(run, store, batch_size=128, device="cpu", progress=False)


def _direct(de, ids, draws_n, seed, codes):
    """Samples drawn and decoded by hand: row ``c * draws_n + d`` (cell c, draw d) under ``codes[row % k]``."""
    post = de.post
    with torch.no_grad():
        batch = post.collection.read(ids)
        draws = draw_posterior(post.model, batch, draws_n, sample=True,
                               generator=torch.Generator().manual_seed(seed))
        # every draw decoded under every batch: [k, draws, cells, F]
        rna = torch.stack([decode(post.model, draws, torch.full_like(batch.batch, int(b))).rna_scale
                           .reshape(draws_n, len(ids), -1) for b in codes])
        protein = torch.stack([decode(post.model, draws, torch.full_like(batch.batch, int(b))).denoised_protein
                               .reshape(draws_n, len(ids), -1) for b in codes])
    rows = np.arange(len(ids) * draws_n)
    cell, draw, which = rows // draws_n, rows % draws_n, rows % len(codes)
    return rna[which, draw, cell].numpy(), protein[which, draw, cell].numpy(), np.asarray(codes)[which]


def test_samples_are_decoded_under_each_batch_and_pooled(de):
    ids = np.arange(10, 50)  # one stream batch of 128 cells
    opts = DEOptions(draws_per_cell=3, batch_correction=True, seed=4)
    codes = de.transform_codes(opts, "batchid1")
    assert codes.tolist() == [0, 1, 2]  # None = every batch of the model
    sample = de.sample_group(ids, opts, seed=21, transform_batch=codes)
    rna, protein, batch = _direct(de, ids, 3, 21, codes)
    np.testing.assert_allclose(sample.expression["rna"], rna, rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(sample.expression["protein"], protein, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(sample.batch, batch)
    assert np.bincount(sample.batch).tolist() == [40, 40, 40]  # an equal share per batch
    # Decoding under another batch changes the samples (the model has batch effects to remove).
    own = de.sample_group(ids, DEOptions(draws_per_cell=3, seed=4), seed=21)
    assert own.batch is None and not np.allclose(own.expression["rna"], sample.expression["rna"])
    # More batches than samples: draws are raised so that every batch gets one.
    few = de.sample_group(np.array([5]), DEOptions(draws_per_cell=1, batch_correction=True), seed=2,
                          transform_batch=codes)
    assert few.batch.tolist() == [0, 1, 2] and few.expression["rna"].shape == (3, 24)
    rna, _, _ = _direct(de, np.array([5]), 3, 2, codes)
    np.testing.assert_allclose(few.expression["rna"], rna, rtol=1e-5, atol=1e-9)


def test_same_batches_pair_within_a_batch_and_the_frame_pools_them(de):
    opts = DEOptions(cells_per_group=40, draws_per_cell=2, batch_correction=True, batchid1=("batch_2", "batch_0"),
                     batchid2=("batch_0", "batch_2"), seed=6)
    codes1, codes2 = de.transform_codes(opts, "batchid1"), de.transform_codes(opts, "batchid2")
    assert codes1.tolist() == [2, 0] and codes2.tolist() == [0, 2]
    s1 = de.sample_group(np.arange(0, 30), opts, seed=1, transform_batch=codes1)
    s2 = de.sample_group(np.arange(200, 240), opts, seed=2, transform_batch=codes2)
    i, j = pair_samples(s1, s2, np.random.default_rng(0))
    assert (s1.batch[i] == s2.batch[j]).all()
    assert np.bincount(s1.batch[i], minlength=3).tolist() == [40, 0, 40]  # per batch: the larger group's count
    assert len(set(i.tolist())) == 60 and len(set(j.tolist())) == 80  # every sample used
    i, j = pair_samples(s1, s2, np.random.default_rng(0), n_pairs=101)
    assert i.size == 100 and (s1.batch[i] == s2.batch[j]).all()
    df = de.frame(s1, s2, opts, pairs=(i, j))
    e1, e2 = s1.expression["rna"], s2.expression["rna"]
    lfc = np.log2(e1[i] + 1e-8) - np.log2(e2[j] + 1e-8)  # described with the 1000x smaller pseudocount
    rna = df[df.modality == "rna"].loc[list(de.registry.gene_names)]
    np.testing.assert_allclose(rna["lfc_mean"], lfc.mean(0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(rna["norm_mean1"], e1.mean(0), rtol=1e-5)  # scvi-tools' scale1: the pooled mean
    assert df.attrs["batch_correction"] and df.attrs["batchid1"] == ["batch_0", "batch_2"]
    full = de.compare_cells(np.arange(0, 30), np.arange(200, 240), opts)
    assert full.attrs["n_pairs"] == 80 and full.attrs["batchid2"] == ["batch_0", "batch_2"]


def test_different_batches_pair_across_pools_and_overlap_warns(de, caplog):
    opts = DEOptions(cells_per_group=20, draws_per_cell=2, batch_correction=True, batchid1=("batch_0",),
                     batchid2=("batch_1",), seed=1)
    df = de.compare_groups("true_cell_type", "type_0", "type_1", opts)
    assert df.attrs["batchid1"] == ["batch_0"] and df.attrs["batchid2"] == ["batch_1"]
    assert df.attrs["n_pairs"] == 40
    overlapping = DEOptions(cells_per_group=20, draws_per_cell=2, batch_correction=True,
                            batchid1=("batch_0", "batch_1"), batchid2=("batch_1",))
    with caplog.at_level(logging.WARNING, logger="streamtotal"):
        de.compare_groups("true_cell_type", "type_0", "type_1", overlapping)
    assert "not trustworthy" in caplog.text
    # Deterministic given the seed.
    pd.testing.assert_frame_equal(df, de.compare_groups("true_cell_type", "type_0", "type_1", opts))


def test_batch_ids_need_batch_correction_and_known_names(de):
    with pytest.raises(ConfigError, match="batchid1=\\['batch_0'\\] needs batch_correction=True"):
        DEOptions(batchid1="batch_0")
    with pytest.raises(ConfigError, match="batchid2 is an empty list"):
        DEOptions(batch_correction=True, batchid2=[])
    with pytest.raises(SelectionError, match="batchid2 \\['batch_9'\\] not among the model's batches"):
        de.compare_groups("true_cell_type", "type_0", None,
                          DEOptions(batch_correction=True, batchid2=("batch_9",), cells_per_group=5))


def test_cli_batch_correction(three_batches, tmp_path, capsys):
    run, store = three_batches
    common = ["--groupby", "true_cell_type", "--group1", "type_0", "--cells-per-group", "30", "--draws-per-cell",
              "2", "--no-progress", "--device", "cpu", "--seed", "3"]
    out = tmp_path / "corrected.csv"
    assert main(["de", str(run), str(store), *common, "--batch-correction", "--batchid1", "batch_0", "--batchid1",
                 "batch_1", "--batchid2", "batch_0", "--batchid2", "batch_1", "--out", str(out)]) == 0
    written = pd.read_csv(out, index_col=0)
    direct = DifferentialExpression(run, store, batch_size=1024, device="cpu", progress=False).compare_groups(
        "true_cell_type", "type_0", None,
        DEOptions(cells_per_group=30, draws_per_cell=2, seed=3, batch_correction=True,
                  batchid1=("batch_0", "batch_1"), batchid2=("batch_0", "batch_1")))
    np.testing.assert_allclose(written["lfc_mean"].to_numpy(), direct["lfc_mean"].to_numpy(), rtol=1e-5)
    capsys.readouterr()
    assert main(["de", str(run), str(store), *common, "--batchid1", "batch_0", "--out", str(tmp_path / "x.csv")]) == 2
    assert "needs batch_correction=True" in capsys.readouterr().err
    assert not (tmp_path / "x.csv").exists()
