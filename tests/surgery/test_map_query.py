"""scArches surgery (``streamtotal map``): frozen means bit-identical, masked proteins stay out, exact resume."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import anndata as ad
import numpy as np
import pytest
import torch

from loaders.store_writer import ZarrStoreWriter
from streamtotal.cli.main import main
from streamtotal.config import DataConfig, RunConfig, TrainConfig
from streamtotal.errors import CheckpointError
from streamtotal.model.config import ModelConfig
from streamtotal.model.layers import Dropout
from streamtotal.simulate import CiteSimulator, SimulationConfig
from streamtotal.surgery.expand import batch_indexed, reference_parts
from streamtotal.surgery.freeze import FrozenBatchNorm1d, SurgeryConfig
from streamtotal.surgery.map_query import build_query_trainer
from streamtotal.training.checkpoint import list_checkpoints
from streamtotal.training.run_dir import load_trained
from streamtotal.training.trainer import Trainer

REF = SimulationConfig(n_cells=400, n_genes=40, n_proteins=6, n_cell_types=3, n_batches=2, n_missing_proteins=0,
                       block_cells=400, seed=1)
QUERY = SimulationConfig(n_cells=300, n_genes=40, n_proteins=6, n_cell_types=3, n_batches=2, n_missing_proteins=0,
                         block_cells=300, seed=2)
DROPPED_GENES = 5
QUERY_PROTEINS = ["PROT004", "PROT002", "PROT001", "PROT000"]  # a subset, in another order
EXTRA_PROTEIN = "CD_EXTRA"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _write(sim, path, genes_keep, protein_cols, gene_extra=0, protein_extra=None, batch_prefix=None):
    genes = list(sim.gene_names[genes_keep]) + [f"EXTRA{i}" for i in range(gene_extra)]
    proteins = list(sim.protein_names[protein_cols]) + ([protein_extra] if protein_extra else [])
    writer = ZarrStoreWriter(path, genes, proteins, panel_key="batch", source_file="test")
    rng = np.random.default_rng(0)
    for rna, protein, obs in sim.blocks():
        rna = rna[:, genes_keep]
        if gene_extra:
            import scipy.sparse as sp

            rna = sp.hstack([rna, sp.csr_matrix(rng.poisson(1.0, (rna.shape[0], gene_extra)).astype(np.float32))])
        protein = protein[:, protein_cols]
        if protein_extra:
            protein = np.hstack([protein, rng.poisson(5.0, (len(protein), 1)).astype(np.float32)])
        if batch_prefix:
            obs = obs.copy()
            obs["batch"] = obs["batch"].astype(str).str.replace("batch", batch_prefix).astype("category")
        writer.append(rna.tocsr(), protein, obs)
    writer.close()
    return path


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    base = tmp_path_factory.mktemp("surgery")
    ref_sim, query_sim = CiteSimulator(REF), CiteSimulator(QUERY)
    ref = _write(ref_sim, base / "ref.zarr", np.arange(REF.n_genes), np.arange(REF.n_proteins))
    proteins = [int(p[-3:]) for p in QUERY_PROTEINS]
    query = _write(query_sim, base / "query.zarr", np.arange(DROPPED_GENES, QUERY.n_genes), proteins, gene_extra=3,
                   protein_extra=EXTRA_PROTEIN, batch_prefix="query")
    return base, ref, query


@pytest.fixture(scope="module")
def reference_run(stores):
    base, ref, _ = stores
    config = RunConfig(
        data=DataConfig(stores=(str(ref),), batch_key="batch", labels_key="cell_type"),
        model=ModelConfig(n_latent=4, n_hidden=16, label_classifier=True, protein_dispersion="protein-batch",
                          adversarial_classifier=True),
        train=TrainConfig(max_epochs=2, batch_size=64, chunk_size=16, io_chunks=4, checkpoint_every_steps=3, seed=5,
                          progress=False, log_every_steps=2),
    )
    run = base / "reference"
    Trainer(config, run).fit()
    return run


def test_frozen_reference_is_bit_identical_and_only_new_batch_rows_train(stores, reference_run, tmp_path):
    _, _, query = stores
    with pytest.warns(UserWarning, match=EXTRA_PROTEIN):
        trainer, report = build_query_trainer(reference_run, [query], tmp_path / "q", epochs=2,
                                              train={"weight_decay": 1.0, "checkpoint_every_steps": 1000},
                                              verbose=False)
    # The alignment report (also in the run directory) names what was masked, dropped and added.
    assert json.loads((tmp_path / "q" / "alignment.json").read_text()) == report
    study = report["studies"][0]
    assert report["new_batches"] == ["query_0", "query_1"] and report["reference_batches"] == ["batch_0", "batch_1"]
    assert study["proteins_masked"] == ["PROT003", "PROT005"] and study["proteins_dropped"] == [EXTRA_PROTEIN]
    assert study["protein_order_differs"] and study["genes_missing_zero_filled"] == DROPPED_GENES
    assert study["genes_dropped"] == 3
    assert any(EXTRA_PROTEIN in w for w in report["warnings"])

    model = trainer.model
    n_ref = 2
    rows = batch_indexed(model)
    assert {"protein_log_theta", "background_prior_mean", "rna_head.cov_weight", "encoder.linears.0.cov_weight",
            "decoder_hidden.linears.0.cov_weight"} <= rows
    reference = load_trained(reference_run).model.state_dict()
    before = reference_parts(model, rows, n_ref)
    for name, value in before.items():  # the query model starts as the reference
        assert torch.equal(value, reference[name]), name
    new_before = {n: model.state_dict()[n][n_ref:].clone() for n in rows}

    modes = []
    model.register_forward_pre_hook(lambda m, a: modes.append(
        (m.training, [d.training for d in m.modules() if isinstance(d, Dropout)],
         [b.training for b in m.modules() if isinstance(b, torch.nn.BatchNorm1d)])))
    trainer.fit()

    after = reference_parts(model, rows, n_ref)
    for name, value in before.items():  # weights, biases, BN statistics, classifier, reference-batch rows
        assert torch.equal(value, after[name]), f"frozen {name} moved"
    for name in rows:
        assert not torch.equal(new_before[name], model.state_dict()[name][n_ref:]), f"new rows of {name} did not train"
    # Every frozen parameter is outside the optimiser and has no gradient.
    optimised = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        if name not in rows:
            assert not p.requires_grad and id(p) not in optimised and p.grad is None, name
        else:
            assert torch.count_nonzero(p.grad[:n_ref]) == 0, name
    # Train/eval set per module: dropout on in every training step, every (frozen) batch norm in eval.
    train_steps = [m for m in modes if m[0]]
    assert len(train_steps) == trainer.step
    assert all(all(d) and d for _, d, _ in train_steps)
    assert all(not any(b) for _, _, b in modes)
    assert all(isinstance(m, FrozenBatchNorm1d) for m in model.modules() if isinstance(m, torch.nn.BatchNorm1d))

    # Masked proteins do not enter the likelihood: whatever they hold, the loss is the same.
    batch = trainer.collection.read(np.arange(64))
    masked = [list(trainer.registry.protein_names).index(p) for p in ("PROT003", "PROT005")]
    assert not batch.protein_mask[:, masked].any() and batch.protein_mask.sum() == 64 * 4
    assert (batch.batch >= n_ref).all()
    wild = batch.protein.clone()
    wild[:, masked] = torch.rand(64, 2) * 1e6
    losses = []
    for protein in (batch.protein, wild):
        torch.manual_seed(0)
        losses.append(model(replace(batch, protein=protein)).neg_elbo)
    assert torch.equal(losses[0], losses[1])

    # The query run works like any run: model.pt with the expanded registry.
    loaded = load_trained(tmp_path / "q")
    assert loaded.registry.batch_categories == ("batch_0", "batch_1", "query_0", "query_1")
    assert loaded.registry.extra["surgery"]["recipe"] == {"unfrozen": "covariates", "new_batch_init": "random",
                                                          "dropout": True}


def test_killed_query_run_resumes_exactly_and_cli_predicts_into_the_store(stores, reference_run, tmp_path):
    _, _, query = stores
    store = tmp_path / "query.zarr"
    shutil.copytree(query, store)
    with pytest.warns(UserWarning):
        assert main(["map", str(reference_run), str(store), "--out", str(tmp_path / "full"), "--epochs", "2",
                     "--predict", "--no-progress"]) == 0
    full = load_trained(tmp_path / "full").model.state_dict()
    adata = ad.read_zarr(store)
    assert adata.obs["streamtotal_label"].notna().all()
    assert adata.obsm["streamtotal_label_probs"].shape == (QUERY.n_cells, 3)
    assert adata.obsm["streamtotal_latent"].shape == (QUERY.n_cells, 4)
    assert "streamtotal_label_uncertainty" in adata.obs

    with pytest.warns(UserWarning):
        killed, _ = build_query_trainer(reference_run, [store], tmp_path / "resumed", epochs=2, verbose=False)
    killed_at = killed.steps_per_epoch + 2
    killed.fit(stop_after_steps=killed_at)
    assert int(list_checkpoints(tmp_path / "resumed")[-1].stem.split("-")[1]) < killed_at
    with pytest.warns(UserWarning):
        resumed, _ = build_query_trainer(reference_run, [store], tmp_path / "resumed", epochs=2, resume=True,
                                         verbose=False)
    resumed.fit()
    for name, value in resumed.model.state_dict().items():
        assert torch.equal(value, full[name]), f"{name} differs after resume"
    with pytest.warns(UserWarning), pytest.raises(CheckpointError, match="surgery recipe"):
        build_query_trainer(reference_run, [store], tmp_path / "resumed", epochs=2, resume=True, verbose=False,
                            surgery=SurgeryConfig(unfrozen="all"))


def test_query_training_under_ddp_on_two_gloo_ranks_keeps_the_reference_frozen(stores, reference_run, tmp_path):
    import os
    import subprocess
    import sys

    _, _, query = stores
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "streamtotal",
           "map", str(reference_run), str(query), "--out", str(out), "--epochs", "1", "--no-progress", "--threads", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count('"new_batches"') == 1  # rank 0 reports, once
    ckpt = torch.load(list_checkpoints(out)[-1], weights_only=True)
    assert ckpt["world_size"] == 2
    reference = load_trained(reference_run).model.state_dict()
    mapped = load_trained(out).model
    rows = batch_indexed(mapped)
    for name, value in reference_parts(mapped, rows, 2).items():
        assert torch.equal(value, reference[name]), f"frozen {name} moved under DDP"


def _expanded(reference_run, query, surgery=SurgeryConfig()):
    from streamtotal.data import open_collection
    from streamtotal.surgery.expand import expand_reference
    from streamtotal.surgery.freeze import freeze

    reference = load_trained(reference_run)
    data = replace(reference.config.data, stores=(str(query),), labels_key=None)
    with pytest.warns(UserWarning):
        collection = open_collection(data, registry=reference.registry, allow_new_batches=True)
    model, rows = expand_reference(reference, collection.registry, new_batch_init=surgery.new_batch_init)
    return reference, collection, model, rows, freeze(model, rows, reference.registry.n_batch, surgery)


@pytest.mark.parametrize("one_batch", [False, True])
def test_expanded_model_maps_reference_batches_exactly_as_the_reference(stores, reference_run, tmp_path, one_batch):
    base, ref, query = stores
    if one_batch:  # one batch: the reference has no covariate weights; the query model gets a zero row for it
        config = RunConfig(data=DataConfig(stores=(str(ref),)),
                           model=ModelConfig(n_latent=4, n_hidden=16, latent_library=True,
                                             gene_dispersion="gene-batch"),
                           train=TrainConfig(max_epochs=1, batch_size=64, chunk_size=16, io_chunks=4, progress=False))
        reference_run = tmp_path / "one"
        Trainer(config, reference_run).fit()
    reference, collection, model, rows, _ = _expanded(reference_run, query, SurgeryConfig(new_batch_init="mean"))
    n_ref = reference.registry.n_batch
    assert model.n_batch == n_ref + (1 if one_batch else 2)
    from streamtotal.data import open_collection

    cells = open_collection(reference.config.data, registry=reference.registry).read(np.arange(50))
    model.eval()
    args = (cells.rna, cells.protein, cells.protein_mask, cells.batch)
    assert torch.equal(model.encode(*args), reference.model.encode(*args))
    z = reference.model.encode(*args)
    a = model.generative(z, cells.rna.sum(1).log(), cells.batch, sample_background=False)
    b = reference.model.generative(z, cells.rna.sum(1).log(), cells.batch, sample_background=False)
    assert torch.allclose(a.rna_logits, b.rna_logits, atol=1e-6) and torch.allclose(a.mix_logits, b.mix_logits,
                                                                                     atol=1e-6)


def test_recipes_choose_what_trains(stores, reference_run):
    _, _, query = stores
    for unfrozen in ("covariates+batchnorm", "all"):
        _, _, model, rows, freezing = _expanded(reference_run, query, SurgeryConfig(unfrozen=unfrozen))
        bns = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm1d)}
        encoder_bn = [n for n in bns if n.startswith(("encoder.", "decoder_hidden."))]
        assert encoder_bn and all(f"{n}.weight" in freezing.trainable for n in encoder_bn)
        assert not any(isinstance(bns[n], FrozenBatchNorm1d) for n in encoder_bn)
        classifier_bn = [n for n in bns if n.startswith("label_classifier.")]
        assert all(isinstance(bns[n], FrozenBatchNorm1d) == (unfrozen != "all") for n in classifier_bn)
        if unfrozen == "all":
            assert not freezing.partial and not freezing.frozen
        else:
            assert set(freezing.partial) == rows and "z_head.weight" in freezing.frozen


def test_query_with_too_few_reference_genes_is_refused(stores, reference_run, tmp_path):
    from loaders.errors import AlignmentError

    _, _, query = stores  # shares 35 of the reference's 40 genes
    with pytest.raises(AlignmentError, match="query"):
        build_query_trainer(reference_run, [query], tmp_path / "q", epochs=1, min_gene_overlap=0.95, verbose=False)


def test_query_onto_an_m2_totalanvi_reference_keeps_the_label_prior_frozen(stores, tmp_path):
    base, ref, query = stores
    config = RunConfig(
        data=DataConfig(stores=(str(ref),), batch_key="batch", labels_key="cell_type"),
        model=ModelConfig(n_latent=4, n_hidden=16, label_classifier=True, label_prior="m2"),
        train=TrainConfig(max_epochs=2, batch_size=64, chunk_size=16, io_chunks=4, checkpoint_every_steps=1000,
                          seed=5, progress=False),
    )
    Trainer(config, tmp_path / "ref").fit()
    with pytest.warns(UserWarning, match=EXTRA_PROTEIN):
        trainer, _ = build_query_trainer(tmp_path / "ref", [query], tmp_path / "q", epochs=1,
                                         train={"checkpoint_every_steps": 1000}, verbose=False)
    prior = {n: v.clone() for n, v in trainer.model.state_dict().items() if n.startswith("label_prior.")}
    assert any(n.endswith("running_mean") for n in prior)  # batch-norm statistics are part of what must not move
    trainer.fit()
    for name, value in prior.items():
        assert torch.equal(value, trainer.model.state_dict()[name]), f"frozen {name} moved"
    assert all(not p.requires_grad for n, p in trainer.model.named_parameters() if n.startswith("label_prior."))


@pytest.mark.parametrize("absent_genes", [None, "zero"])
def test_alignment_report_records_how_the_query_s_absent_genes_are_handled(stores, reference_run, tmp_path,
                                                                            absent_genes):
    _, _, query = stores  # lacks the reference's first DROPPED_GENES genes
    with pytest.warns(UserWarning, match=EXTRA_PROTEIN):
        trainer, report = build_query_trainer(reference_run, [query], tmp_path / "q", epochs=1, verbose=False,
                                              absent_genes=absent_genes)
    mode = absent_genes or "mask"  # the reference's [data] absent_genes, whose default is "mask"
    saved = json.loads((tmp_path / "q" / "alignment.json").read_text())
    assert saved == report and saved["absent_genes"]["mode"] == mode
    assert "likelihood" in saved["absent_genes"]["handling"]
    assert saved["studies"][0]["genes_missing_handling"] == mode
    assert trainer.config.data.absent_genes == mode  # so also in the query run's config.toml
    batch = trainer.collection.read(np.arange(32))
    if mode == "zero":
        assert batch.rna_mask is None
    else:
        assert not batch.rna_mask[:, :DROPPED_GENES].any() and batch.rna_mask[:, DROPPED_GENES:].all()


def test_in_memory_sources_map_as_their_store(stores, reference_run, tmp_path):
    """``build_query_trainer(sources=...)`` (the Python API's in-memory queries) aligns, reports and expands as
    the same data in a store does."""
    from loaders.array_source import ArraySource
    from loaders.zarr_source import ZarrSource
    from streamtotal.errors import ConfigError

    _, _, query = stores
    stored = ZarrSource(query)
    rows = stored.read(np.arange(stored.n_obs))
    in_memory = ArraySource(stored.name, rows.rna, rows.protein, stored.gene_names, stored.protein_names,
                            obs={c: stored.obs_column(c) for c in stored.obs_columns},
                            protein_panels=stored.protein_panels, protein_panel_codes=stored.protein_panel_codes())
    with pytest.warns(UserWarning, match=EXTRA_PROTEIN):
        from_store, store_report = build_query_trainer(reference_run, [query], tmp_path / "s", epochs=1,
                                                       verbose=False)
    with pytest.warns(UserWarning, match=EXTRA_PROTEIN):
        from_memory, report = build_query_trainer(reference_run, [], tmp_path / "m", epochs=1, verbose=False,
                                                  sources=[in_memory])
    assert json.loads((tmp_path / "m" / "alignment.json").read_text()) == report
    assert report["studies"] == store_report["studies"] and report["new_batches"] == ["query_0", "query_1"]
    assert from_memory.config.data.absent_genes == from_store.config.data.absent_genes
    ids = np.arange(0, 300, 7)
    a, b = from_memory.collection.read(ids), from_store.collection.read(ids)
    for field in ("rna", "protein", "protein_mask", "batch", "rna_mask"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field
    store_state = from_store.model.state_dict()
    for name, value in from_memory.model.state_dict().items():
        assert torch.equal(value, store_state[name]), name  # same priors, new rows and freezing
    with pytest.raises(ConfigError, match="one of them: got 1 stores and 1 sources"):
        build_query_trainer(reference_run, [query], tmp_path / "x", epochs=1, verbose=False, sources=[in_memory])
