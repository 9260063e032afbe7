"""Differential expression ("change" mode): statistics against direct computations, planted truth, CLI."""

import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch

from streamtotal.cli.main import main
from streamtotal.cli.simulate_cmd import write_simulation
from streamtotal.config import DataConfig, RunConfig, TrainConfig
from streamtotal.errors import ConfigError, SelectionError
from streamtotal.inference import de_statistics as st
from streamtotal.inference.differential import DEOptions, DifferentialExpression
from streamtotal.inference.posterior import decode, draw_posterior
from streamtotal.model.config import ModelConfig
from streamtotal.simulate import CiteSimulator, SimulationConfig
from streamtotal.training.trainer import Trainer

PLANTED_GENES = [f"GENE{i:05d}" for i in range(8)]  # 0-3 up in type_0, 4-7 up in type_1
PLANTED_PROTEINS = ["PROT000", "PROT001"]  # foreground in type_0 only / type_1 only


# ---------------------------------------------------------------------------------------------- pure statistics


def test_fdr_calls_equal_a_direct_computation():
    rng = np.random.default_rng(0)
    for p in (rng.random(50), np.r_[np.ones(5), rng.random(20) * 0.5], np.full(4, 0.5), np.ones(3)):
        for target in (0.01, 0.05, 0.2):
            ranked = np.sort(p)[::-1]
            k = max([0] + [n for n in range(1, p.size + 1) if np.mean(1 - ranked[:n]) <= target])
            expected = np.zeros(p.size, bool)
            expected[np.argsort(-p, kind="stable")[:k]] = True
            np.testing.assert_array_equal(st.fdr_calls(p, target), expected)
    assert st.fdr_calls(np.array([0.99, 0.97, 0.5, 0.9]), 0.05).tolist() == [True, True, False, True]
    with pytest.raises(ConfigError):
        st.fdr_calls(np.array([0.5]), 1.5)


def test_bayes_factor_and_change_statistics_formulas():
    p = np.array([0.0, 0.25, 0.5, 0.9, 1.0])
    np.testing.assert_allclose(st.bayes_factor(p[1:4]), np.log(p[1:4] / (1 - p[1:4])), rtol=1e-6)
    ends = st.bayes_factor(p)[[0, -1]]
    np.testing.assert_allclose(ends, [np.log(1e-8), -np.log(1e-8)], rtol=1e-6)
    lfc = np.array([[0.1, -1.0], [0.3, -0.2], [-0.5, 2.0], [0.0, 0.26]], dtype=np.float32)
    # "three" (scvi-tools' default) reads the more likely direction, "two" sums both directions.
    stats = st.change_statistics(lfc, 0.25)
    up, down = (lfc >= 0.25).mean(0), (lfc <= -0.25).mean(0)
    np.testing.assert_allclose(stats["proba_de"], np.maximum(up, down))
    np.testing.assert_allclose(stats["proba_de"], [0.25, 0.5])
    two = st.change_statistics(lfc, 0.25, test_mode="two")
    np.testing.assert_allclose(two["proba_de"], [0.5, 0.75])
    summary = lfc * 1.5
    described = st.change_statistics(lfc, 0.25, summary_lfc=summary)
    np.testing.assert_allclose(described["lfc_mean"], summary.mean(0), rtol=1e-6)
    np.testing.assert_allclose(described["proba_de"], stats["proba_de"])
    with pytest.raises(ConfigError, match="test_mode"):
        st.change_statistics(lfc, 0.25, test_mode="one")
    np.testing.assert_allclose(stats["lfc_median"], np.median(lfc, 0), rtol=1e-6)
    np.testing.assert_allclose(stats["lfc_std"], lfc.std(0), rtol=1e-5)


def test_pairs_use_every_sample_evenly():
    i, j = st.pair_indices(7, 3, np.random.default_rng(1))
    assert i.size == j.size == 7 and sorted(i) == list(range(7))
    assert sorted(np.bincount(j, minlength=3)) == [2, 2, 3]


# ---------------------------------------------------------------------------------------------- a planted difference


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """Two cell types differing in 8 genes (4 up each way, normalisers equal so other genes have LFC exactly 0) and
    2 proteins (PROT002 foreground in both, PROT003 in neither); a tiny model trained on it."""
    root = tmp_path_factory.mktemp("planted")
    sim = CiteSimulator(SimulationConfig(n_cells=600, n_genes=40, n_proteins=4, n_cell_types=2, n_batches=1,
                                         n_missing_proteins=0, unlabeled_fraction=0.0, block_cells=600, seed=5))
    base = sim.truth.log_profile[0].copy()
    base[4:8] = base[0:4]
    profile = np.stack([base, base])
    profile[0, 0:4] += 2.5
    profile[1, 4:8] += 2.5
    markers = np.array([[1, 0, 1, 0], [0, 1, 1, 0]], dtype=bool)
    sim.truth = dataclasses.replace(sim.truth, log_profile=profile, protein_markers=markers,
                                    type_probs=np.array([0.5, 0.5]))
    store = root / "planted.zarr"
    write_simulation(sim, store, progress=False)
    config = RunConfig(
        data=DataConfig(stores=(str(store),), batch_key="batch"),
        model=ModelConfig(n_latent=4, n_hidden=32),
        train=TrainConfig(max_epochs=25, batch_size=64, lr=1e-2, kl_warmup_fraction=0.3, validation_fraction=0.0,
                          chunk_size=16, io_chunks=4, seed=1, progress=False, checkpoint_every_steps=100000),
    )
    torch.set_num_threads(1)
    Trainer(config, root / "run").fit()
    return root / "run", store


@pytest.fixture(scope="module")
def de(planted):
    run, store = planted
    return DifferentialExpression(run, store, batch_size=128, device="cpu", progress=False)


OPTS = DEOptions(cells_per_group=200, draws_per_cell=2)


def test_planted_markers_are_found_and_random_halves_give_nothing(de):
    df = de.compare_groups("true_cell_type", "type_0", "type_1", OPTS)
    planted = df[(df.modality == "rna") & df.index.isin(PLANTED_GENES)
                 | (df.modality == "protein") & df.index.isin(PLANTED_PROTEINS)]
    assert len(planted) == 10
    assert planted["is_de_fdr"].all() and (planted["proba_de"] >= 0.95).all()
    assert set(df.index[:10]) == set(PLANTED_GENES + PLANTED_PROTEINS)  # the top 10 Bayes factors
    up = ["GENE00000", "GENE00001", "GENE00002", "GENE00003", "PROT000"]
    assert (np.sign(planted["lfc_mean"]) == np.where(planted.index.isin(up), 1, -1)).all()
    null_genes = df[(df.modality == "rna") & ~df.index.isin(PLANTED_GENES)]
    assert null_genes["lfc_mean"].abs().max() < 0.5 * planted["lfc_mean"].abs().min()
    assert null_genes["proba_de"].mean() < 0.9 < planted["proba_de"].min()
    assert list(df["bayes_factor"]) == sorted(df["bayes_factor"], reverse=True)
    assert df.attrs["n_group1"] + df.attrs["n_group2"] == 600 and df.attrs["n_sampled1"] == 200
    # Two random halves of one type: (almost) nothing is called.
    ids = de.group_ids("true_cell_type", "type_0")
    np.random.default_rng(0).shuffle(ids)
    null = de.compare_cells(ids[: ids.size // 2], ids[ids.size // 2:], OPTS)
    assert null["is_de_fdr"].sum() <= 1
    assert null["lfc_mean"].abs().max() < 0.3


def test_lfc_samples_are_log2_ratios_of_directly_drawn_expression(de):
    post = de.post
    ids1, ids2 = np.arange(0, 40), np.arange(300, 330)  # each within one batch of 128
    opts = DEOptions(draws_per_cell=3, genes=("GENE00002", "GENE00005"), seed=3)
    s1, s2 = de.sample_group(ids1, opts, seed=11), de.sample_group(ids2, opts, seed=12)

    @torch.no_grad()
    def direct(ids, seed):
        batch = post.collection.read(ids)
        draws = draw_posterior(post.model, batch, 3, sample=True, generator=torch.Generator().manual_seed(seed))
        gen = decode(post.model, draws, batch.batch)
        cells_first = lambda v: v.reshape(3, len(ids), -1).transpose(0, 1).reshape(3 * len(ids), -1).numpy()
        return cells_first(gen.rna_scale[:, [2, 5]]), cells_first(gen.denoised_protein)

    rna1, prot1 = direct(ids1, 11)
    rna2, prot2 = direct(ids2, 12)
    np.testing.assert_allclose(s1.expression["rna"], rna1, rtol=1e-5)
    np.testing.assert_allclose(s2.expression["protein"], prot2, rtol=1e-5)
    i, j = st.pair_indices(120, 90, np.random.default_rng(5))
    df = de.frame(s1, s2, opts, pairs=(i, j))
    for m, e1, e2, pc, names in (("rna", rna1, rna2, 1e-5, ["GENE00002", "GENE00005"]),
                                 ("protein", prot1, prot2, 0.1, list(post.registry.protein_names))):
        lfc = np.log2(e1[i] + pc) - np.log2(e2[j] + pc)
        described = np.log2(e1[i] + 1e-3 * pc) - np.log2(e2[j] + 1e-3 * pc)  # scvi-tools' reduced pseudocount
        got = df[df.modality == m].loc[names]
        three = np.maximum((lfc >= 0.25).mean(0), (lfc <= -0.25).mean(0))
        np.testing.assert_allclose(got["proba_de"], three, atol=1.5 / i.size)
        np.testing.assert_allclose(got["lfc_mean"], described.mean(0), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(got["lfc_median"], np.median(described, 0), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(got["norm_mean1"], e1.mean(0), rtol=1e-5)
    # Raw statistics of the sampled cells, directly.
    counts = post.collection.read(ids1).rna.numpy()[:, [2, 5]]
    got = df[df.modality == "rna"].loc[["GENE00002", "GENE00005"]]
    np.testing.assert_allclose(got["raw_mean1"], counts.mean(0), rtol=1e-6)
    np.testing.assert_allclose(got["nonzero_frac1"], (counts > 0).mean(0), rtol=1e-6)


def test_deterministic_one_vs_rest_and_clear_errors(de):
    opts = DEOptions(cells_per_group=50, draws_per_cell=1, modality="protein", seed=2)
    a = de.compare_groups("true_cell_type", "type_1", None, opts)
    pd.testing.assert_frame_equal(a, de.compare_groups("true_cell_type", "type_1", options=opts))
    assert (a.modality == "protein").all() and len(a) == 4 and (a.group2 == "rest").all()
    both = de.one_vs_rest("true_cell_type", opts)
    assert list(both) == ["type_0", "type_1"]
    pd.testing.assert_frame_equal(both["type_1"], a)
    with pytest.raises(SelectionError, match="'type_0' \\(") as err:
        de.compare_groups("true_cell_type", "type_9")
    assert "type_1" in str(err.value)
    with pytest.raises(SelectionError, match="columns are"):
        de.compare_groups("no_such_column", "x")
    with pytest.raises(SelectionError, match="no cells"):
        de.compare_cells(np.array([], dtype=np.int64), np.arange(5))
    with pytest.raises(SelectionError, match="no rest"):
        de.compare_cells(np.arange(600))
    with pytest.raises(SelectionError, match="both"):
        de.compare_groups("true_cell_type", "type_0", "type_0")
    with pytest.raises(ConfigError, match="modality"):
        DEOptions(modality="atac")


def test_cli_writes_one_csv_per_comparison(planted, tmp_path, capsys):
    run, store = planted
    out = tmp_path / "a_vs_b.csv"
    common = ["--cells-per-group", "60", "--draws-per-cell", "1", "--no-progress", "--device", "cpu"]
    assert main(["de", str(run), str(store), "--groupby", "true_cell_type", "--group1", "type_0", "--group2",
                 "type_1", "--out", str(out), *common]) == 0
    df = pd.read_csv(out, index_col=0)
    assert len(df) == 44 and set(df.modality) == {"rna", "protein"} and "is_de_fdr" in df
    assert "type_0 vs type_1" in capsys.readouterr().out
    assert main(["de", str(run), str(store), "--groupby", "true_cell_type", "--modality", "rna",
                 "--out", str(tmp_path / "all"), *common]) == 0
    files = sorted(p.name for p in (tmp_path / "all").iterdir())
    assert files == ["de_true_cell_type_type_0_vs_rest.csv", "de_true_cell_type_type_1_vs_rest.csv"]
    assert main(["de", str(run), str(store), "--groupby", "true_cell_type", "--group1", "nope", *common]) == 2
    assert "values (cells)" in capsys.readouterr().err
