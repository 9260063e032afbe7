"""The evaluation report: folder contents, metric ranges, the heat map's numbers, metric sanity, errors, the CLI.

kBET per label is left out here: its diffusion neighbours compile pynndescent (about a minute per process).
"""

import csv
import json

import numpy as np
import pytest

from streamtotal.cli.main import main
from streamtotal.errors import ConfigError
from streamtotal.inference.evaluate import evaluate, stratified_sample
from streamtotal.inference.expression import ExpressionOptions, StorePosterior
from streamtotal.inference.protein_imputation_report import IMPUTE_SAMPLES
from streamtotal.inference.integration_metrics import BIO_METRICS, integration_metrics

QUICK = ["isolated_labels", "nmi_ari_cluster_labels_kmeans", "silhouette_label", "clisi_knn", "bras", "ilisi_knn",
         "graph_connectivity", "pcr_comparison"]
N_CELLS = 150


@pytest.fixture(scope="module")
def report_dir(trained_run, small_store, tmp_path_factory):
    """One report written through the CLI (the exit code is part of what is tested)."""
    out = tmp_path_factory.mktemp("evaluation") / "report"
    rc = main(["evaluate", str(trained_run), str(small_store), "--labels-key", "cell_type", "--out", str(out),
               "--cells", str(N_CELLS), "--seed", "2", "--metrics", ",".join(QUICK), "--device", "cpu",
               "--no-progress"])
    assert rc == 0
    return out


def _sampled_cells(report_dir):
    """The report's sampled cells (``cells.csv``): global ids and labels."""
    with open(report_dir / "cells.csv") as f:
        rows = list(csv.DictReader(f))
    return np.array([int(r["cell_id"]) for r in rows]), np.array([r["label"] for r in rows])


def test_folder_holds_a_page_that_opens_every_figure(report_dir):
    names = {p.name for p in report_dir.iterdir()}
    assert {"index.html", "metrics.json", "umap.png", "training_curves.png", "protein_foreground.png",
            "protein_imputation.png", "cells.csv"} <= names
    assert not [p for p in report_dir.parent.iterdir() if p.name.startswith(".")]  # temp folder renamed away
    page = (report_dir / "index.html").read_text()
    metrics = json.loads((report_dir / "metrics.json").read_text())
    for name in metrics["figures"].values():
        assert (report_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f'href="{name}"' in page
    assert page.count("data:image/png;base64,") == len(metrics["figures"]) == 4
    assert "imputed against measured" in page
    assert "http://" not in page and "https://" not in page


def test_metrics_are_scib_aggregates_in_range(report_dir):
    metrics = json.loads((report_dir / "metrics.json").read_text())
    scib = metrics["scib"]
    assert set(scib["bio_conservation"]) == {"isolated_labels", "nmi_ari_cluster_labels_kmeans_nmi",
                                              "nmi_ari_cluster_labels_kmeans_ari", "silhouette_label", "clisi_knn"}
    assert set(scib["batch_correction"]) == {"bras", "ilisi_knn", "graph_connectivity", "pcr_comparison"}
    values = [*scib["bio_conservation"].values(), *scib["batch_correction"].values(), *scib["aggregate"].values()]
    assert all(v is not None and -1e-6 <= v <= 1 + 1e-6 for v in values), values
    agg = scib["aggregate"]
    assert agg["bio_conservation"] == pytest.approx(np.mean(list(scib["bio_conservation"].values())))
    assert agg["batch_correction"] == pytest.approx(np.mean(list(scib["batch_correction"].values())))
    assert agg["total"] == pytest.approx(0.6 * agg["bio_conservation"] + 0.4 * agg["batch_correction"])
    # The unlabeled category is never sampled; the sample is stratified over the three labels.
    assert metrics["n_cells"] == N_CELLS == sum(metrics["cells_per_label"].values())
    assert set(metrics["cells_per_label"]) == {"type_0", "type_1", "type_2"}
    with open(report_dir / "cells.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == N_CELLS and "unlabeled" not in {r["label"] for r in rows}


def test_heat_map_is_the_mean_foreground_probability_per_label(report_dir, trained, small_store):
    metrics = json.loads((report_dir / "metrics.json").read_text())
    heat = metrics["protein_foreground"]
    ids, labels = _sampled_cells(report_dir)
    post = StorePosterior(trained, small_store, batch_size=64, device="cpu", progress=False)
    fg = post.protein_foreground_probability(ids)
    expected = np.stack([fg[labels == name].mean(axis=0) for name in heat["labels"]])
    assert np.asarray(heat["mean"]).shape == (3, len(trained.registry.protein_names)) == expected.shape
    assert heat["proteins"] == list(trained.registry.protein_names)
    np.testing.assert_allclose(np.asarray(heat["mean"]), expected, rtol=1e-5, atol=1e-6)
    # The sampled labels are the store's own labels of those cells.
    stored = np.asarray(post.collection.sources[0].obs_column("cell_type")).astype(str)
    assert (stored[ids] == labels).all()


def test_imputed_against_measured_is_the_direct_computation(report_dir, trained, small_store):
    """The store's last batch lacks two proteins: per label, their measured counts in the other batch are set
    beside the model's imputed values in this one, each recomputed here from the posterior and the counts."""
    metrics = json.loads((report_dir / "metrics.json").read_text())
    section = metrics["protein_imputation"]
    ids, labels = _sampled_cells(report_dir)
    # Draws are a function of the batch size (blocks of store rows): the report's default, 1024.
    post = StorePosterior(trained, small_store, batch_size=1024, device="cpu", progress=False)
    measured = post.collection.protein_mask(ids)
    partial = np.flatnonzero(measured.any(0) & ~measured.all(0))
    names = [trained.registry.protein_names[j] for j in partial]
    assert len(names) == 2 and list(section["proteins"]) == names
    counts = post.collection.read_aligned(ids).protein
    batches = np.asarray(trained.registry.batch_categories)[np.asarray(post.collection.batch_codes)[ids]]
    for j, name in zip(partial, names):
        info = section["proteins"][name]
        have = measured[:, j]
        measuring = sorted(set(batches[have]))
        assert info["decoded_as"] == measuring and set(info["imputed_in_batches"]) == set(batches[~have])
        assert sum(info["measured_in"].values()) == have.sum() and sum(info["imputed_in"].values()) == (~have).sum()
        opts = ExpressionOptions(n_samples=IMPUTE_SAMPLES, seed=2, include_protein_background=True,
                                 transform_batch=measuring, proteins=(name,))
        lack = np.flatnonzero(~have)
        result = post.compute(["protein", "protein_std"], ids[lack], opts)
        imputed, spread = result.values["protein"][:, 0], result.values["protein_std"][:, 0]
        assert np.isfinite(imputed).all() and (spread > 0).all()  # every imputed value carries its uncertainty
        xs, ys = [], []
        for label, v in info["per_label"].items():
            m, i = have & (labels == label), labels[lack] == label
            assert v["n_measured"] == m.sum() and v["n_imputed"] == i.sum()
            if m.any():
                assert v["measured_mean_log1p"] == pytest.approx(np.log1p(counts[m, j]).mean(), rel=1e-6)
            if i.any():
                assert v["imputed_mean_log1p"] == pytest.approx(np.log1p(imputed[i]).mean(), rel=1e-4)
                assert v["imputed_mean_spread"] == pytest.approx(spread[i].mean(), rel=1e-4)
            if m.sum() >= 5 and i.sum() >= 5:
                xs.append(v["measured_mean_log1p"])
                ys.append(v["imputed_mean_log1p"])
        expected_r = np.corrcoef(xs, ys)[0, 1] if len(xs) >= 3 else None
        assert info["pearson_over_labels"] == (pytest.approx(expected_r) if expected_r is not None else None)
        assert info["mean_relative_spread"] == pytest.approx(np.mean(spread / imputed), rel=1e-4)


def test_label_separated_latent_scores_higher_bio_conservation_than_noise():
    rng = np.random.default_rng(0)
    labels = np.repeat(["a", "b", "c"], N_CELLS // 3)  # shapes as in the report: the jitted metrics are reused
    batches = np.tile(["x", "y"], N_CELLS // 2)
    centres = np.eye(4)[[0, 1, 2]] * 10.0
    separated = centres[np.searchsorted(["a", "b", "c"], labels)] + rng.normal(scale=0.3, size=(N_CELLS, 4))
    noise = rng.normal(size=(N_CELLS, 4))
    good = integration_metrics(separated, labels, batches, metrics=BIO_METRICS)
    bad = integration_metrics(noise, labels, batches, metrics=BIO_METRICS)
    assert good["aggregate"]["bio_conservation"] > 0.9 > 0.6 > bad["aggregate"]["bio_conservation"]
    assert good["bio_conservation"]["nmi_ari_cluster_labels_kmeans_ari"] == pytest.approx(1.0)
    assert good["aggregate"]["batch_correction"] is None and good["aggregate"]["total"] is None


def test_stratified_sample_keeps_rare_labels_and_skips_unlabeled():
    codes = np.concatenate([np.full(5000, 0), np.full(30, 1), np.full(965, 2), np.full(4000, -1)])
    ids = stratified_sample(codes, 1000, seed=1)
    assert ids.size == 1000 and (np.diff(ids) > 0).all() and (codes[ids] >= 0).all()
    per = np.bincount(codes[ids], minlength=3)
    assert per[1] == 30  # every cell of the rare label
    # Beyond the 50 each label keeps, cells go in proportion to what the labels have left.
    assert (per[0] - 50) / (per[2] - 50) == pytest.approx((5000 - 50) / (965 - 50), rel=0.02)
    np.testing.assert_array_equal(stratified_sample(codes, 1000, seed=1), ids)
    assert stratified_sample(codes, 10**6).size == 5995


def test_unknown_columns_and_metrics_fail_clearly(trained_run, small_store, tmp_path):
    with pytest.raises(ConfigError, match="no_such_column.*cell_type"):
        evaluate(trained_run, small_store, labels_key="no_such_column", out_dir=tmp_path / "r", device="cpu",
                 progress=False)
    with pytest.raises(ConfigError, match="--batch-key"):
        evaluate(trained_run, small_store, labels_key="cell_type", batch_key="nope", out_dir=tmp_path / "r",
                 device="cpu", progress=False)
    with pytest.raises(ConfigError, match="unknown scib metrics"):
        evaluate(trained_run, small_store, labels_key="cell_type", metrics=["nmi"], out_dir=tmp_path / "r")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "precious.txt").write_text("x")
    assert main(["evaluate", str(trained_run), str(small_store), "--labels-key", "cell_type", "--out",
                 str(tmp_path / "taken"), "--no-progress"]) == 2
    assert not (tmp_path / "r").exists()
