"""``streamtotal evaluate``: an evaluation report of a trained model on a labelled sample of a store.

    OUT/
      index.html                   opens everything below (PNGs embedded; no external assets)
      metrics.json                 scib metrics, their aggregates, the heat map's numbers, what was sampled
      umap.png                     UMAP of the sampled cells' latent, coloured by label and by batch
      training_curves.png          from RUN/metrics.jsonl (absent when the run has none)
      protein_foreground.png       mean foreground probability per label x protein
      protein_imputation.png       per label, imputed against measured, for proteins some panels lack (absent
                                   when every sampled cell's panel has the same proteins)
      cells.csv                    the sampled cells: global id, label, batch, UMAP coordinates

Only the sampled cells are read (stratified by label, ``n_cells`` in all): the latent and foreground
probabilities are streamed through ``StorePosterior``, and the unintegrated baseline of ``pcr_comparison``
is a PCA of the sampled cells' log-normalised RNA. Per-cell label and batch columns are read whole (one
value per cell, like the Collection's own codes). The folder is written under a temporary name and renamed
onto ``OUT`` when complete.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Sequence

import numpy as np

from loaders.atomic_files import write_directory_atomically
from loaders.covariates import batch_codes as factorize_batches
from loaders.covariates import label_codes
from loaders.object_store import as_path, refuse_url
from streamtotal.errors import ConfigError
from streamtotal.inference.integration_metrics import check_metrics, import_scib_metrics, integration_metrics

_MIN_PER_LABEL = 50  # rare labels keep this many cells (or all they have), so isolated labels can be scored
_PCA_COMPONENTS = 50  # scanpy's default, as the Benchmarker's unintegrated baseline
_READ_CELLS = 4096  # cells per RNA read for the baseline PCA


@dataclass
class EvaluationReport:
    """What ``evaluate`` wrote.

    Attributes:
        out_dir: the report folder.
        index_html: its ``index.html``.
        metrics: the content of ``metrics.json``.
        figures: caption -> PNG path.
        cell_ids: the sampled global cell ids (sorted).
    """

    out_dir: Path
    index_html: Path
    metrics: dict
    figures: dict[str, Path]
    cell_ids: np.ndarray


def evaluate(
    run_dir: str | Path,
    store: str | Path,
    *,
    labels_key: str,
    batch_key: str | None = None,
    out_dir: str | Path | None = None,
    n_cells: int = 20000,
    seed: int = 0,
    unlabeled_category: str | None = "unlabeled",
    metrics: Sequence[str] | None = None,
    batch_size: int = 1024,
    device: str = "auto",
    progress: bool = True,
) -> EvaluationReport:
    """Scores the model of ``run_dir`` on a labelled sample of ``store`` and writes a report folder.

    Args:
        run_dir: a training run directory.
        store: the store to evaluate on (aligned onto the model's registry; its batches must be the model's).
        labels_key: obs column of the cell labels used by the bio-conservation metrics and the heat map.
        batch_key: obs column of the batches used by the batch-correction metrics; None = the model's batches.
        out_dir: the report folder (replaced if it holds a previous report); None = ``RUN_DIR/evaluation``.
        n_cells: labelled cells to sample, stratified by label (proportional, rare labels keep up to 50).
        seed: seed of the sample and of the UMAP.
        unlabeled_category: label value excluded from the sample (with missing values).
        metrics: scib metric names (see ``integration_metrics.ALL_METRICS``); None = the Benchmarker's defaults.
        batch_size: cells per forward pass.
        device: "auto", "cpu" or "cuda[:N]".
        progress: show progress bars.

    Returns:
        An EvaluationReport.

    Raises:
        ConfigError: unknown ``labels_key`` / ``batch_key``, too few labelled cells or labels, bad arguments,
            or ``out_dir`` exists and is not a previous report.
        RunDirError: the run has no model.
    """
    from streamtotal.inference.evaluation_page import plot_foreground_heatmap, write_index_html
    from streamtotal.inference.expression import StorePosterior
    from streamtotal.inference.protein_imputation_report import (imputed_against_measured,
                                                                 plot_imputed_against_measured)
    from streamtotal.plots import plot_training_curves, plot_umap, umap_coordinates

    if isinstance(n_cells, bool) or int(n_cells) != n_cells or n_cells < 20:
        raise ConfigError(f"n_cells must be an integer >= 20; got {n_cells!r}")
    chosen = check_metrics(metrics)
    import_scib_metrics()  # fail before streaming anything when it is missing
    run_dir = as_path(run_dir)  # a run on s3:// is read from there; the report folder must be local
    refuse_url(run_dir if out_dir is None else out_dir, "the evaluation report (plots and tables)",
               "give a local report folder (CLI: --out DIR)")
    out_dir = Path(out_dir) if out_dir is not None else run_dir / "evaluation"
    _check_out_dir(out_dir)

    post = StorePosterior(run_dir, store, batch_size=batch_size, device=device, progress=progress)
    collection = post.collection
    label_code, label_names = _labels(collection, labels_key, unlabeled_category)
    batch_code, batch_names = _batches(collection, batch_key, post.registry)
    ids = stratified_sample(label_code, int(n_cells), seed)
    if ids.size < 20:
        raise ConfigError(f"{store}: only {ids.size} cells have a {labels_key!r} label (not "
                          f"{unlabeled_category!r}); the metrics need at least 20")
    labels = np.asarray(label_names)[label_code[ids]]
    batches = np.asarray(batch_names)[batch_code[ids]]

    latent = post.latent(ids)
    foreground = post.protein_foreground_probability(ids)
    several_batches = len(np.unique(batches)) > 1
    x_pre = unintegrated_pca(collection, ids, seed) if "pcr_comparison" in chosen and several_batches else None
    scib = integration_metrics(latent, labels, batches, x_pre=x_pre, metrics=chosen)
    present = [name for name in label_names if (labels == name).any()]
    heat = np.stack([foreground[labels == name].mean(axis=0) for name in present])
    imputation = imputed_against_measured(post, ids, labels, seed)

    report: dict = {}
    figures: dict[str, str] = {}

    def write(tmp: Path) -> None:
        nonlocal report, figures
        coords = umap_coordinates(latent, seed=seed)
        figures = {"UMAP of the latent, by label and by batch": "umap.png"}
        plot_umap(coords, {f"label ({labels_key})": labels, f"batch ({batch_key or 'model batches'})": batches},
                  tmp / "umap.png", title=f"latent of {ids.size} sampled cells")
        metrics_jsonl = run_dir / "metrics.jsonl"
        if metrics_jsonl.is_file():
            plot_training_curves(metrics_jsonl, tmp / "training_curves.png")
            figures["training curves"] = "training_curves.png"
        plot_foreground_heatmap(heat, present, post.registry.protein_names, tmp / "protein_foreground.png")
        figures["protein foreground probability per label"] = "protein_foreground.png"
        if imputation is not None:
            plot_imputed_against_measured(imputation, tmp / "protein_imputation.png")
            figures["imputed against measured protein, per label"] = "protein_imputation.png"
        _write_cells(tmp / "cells.csv", ids, labels, batches, coords)
        report = {
            "run_dir": str(run_dir), "store": str(store), "labels_key": labels_key, "batch_key": batch_key,
            "unlabeled_category": unlabeled_category, "seed": int(seed), "n_obs": int(collection.n_obs),
            "n_labeled_cells": int((label_code >= 0).sum()), "n_cells": int(ids.size),
            "cells_per_label": {name: int((labels == name).sum()) for name in present},
            "cells_per_batch": {str(b): int((batches == b).sum()) for b in np.unique(batches)},
            "scib_metrics_version": version("scib-metrics"),
            "scib": scib,
            "protein_foreground": {"labels": present, "proteins": list(post.registry.protein_names),
                                   "mean": heat.astype(float).tolist(),
                                   "note": "mean of 1 - pi over the sampled cells of each label; proteins a "
                                           "study did not measure are the model's values"},
            "protein_imputation": imputation,
            "figures": dict(figures),
        }
        (tmp / "metrics.json").write_text(json.dumps(report, indent=1))
        write_index_html(tmp, report, figures)

    write_directory_atomically(out_dir, write)  # a previous report is replaced only by a complete one
    return EvaluationReport(out_dir=out_dir, index_html=out_dir / "index.html", metrics=report,
                            figures={caption: out_dir / name for caption, name in figures.items()}, cell_ids=ids)


def stratified_sample(label_code: np.ndarray, n_cells: int, seed: int = 0) -> np.ndarray:
    """Labelled cells (code >= 0) sampled per label: every label keeps ``min(its cells, 50)`` (less when
    ``n_cells`` is too small for that), the rest is shared in proportion to the labels' remaining cells.

    Returns:
        Sorted global ids; every labelled cell when there are no more than ``n_cells``.
    """
    label_code = np.asarray(label_code)
    labelled = np.flatnonzero(label_code >= 0)
    if labelled.size <= n_cells:
        return labelled.astype(np.int64)
    rng = np.random.default_rng(seed)
    order = labelled[np.argsort(label_code[labelled], kind="stable")]
    cats, starts, counts = np.unique(label_code[order], return_index=True, return_counts=True)
    base = np.minimum(counts, max(1, min(_MIN_PER_LABEL, n_cells // len(cats))))
    rest = n_cells - int(base.sum())
    room = counts - base
    share = rest * room / room.sum() if rest > 0 else np.zeros(len(cats))
    quota = base + np.floor(share).astype(np.int64)
    left = n_cells - int(quota.sum())
    if left > 0:  # largest remainders; each has a fractional part, so one more cell still fits
        quota[np.argsort(-(share - np.floor(share)), kind="stable")[:left]] += 1
    picked = [rng.choice(order[s:s + c], size=int(q), replace=False) for s, c, q in zip(starts, counts, quota)]
    return np.sort(np.concatenate(picked)).astype(np.int64)


def unintegrated_pca(collection, ids: np.ndarray, seed: int = 0) -> np.ndarray:
    """PCA (up to 50 components) of the cells' log1p counts-per-10k RNA: the Benchmarker's unintegrated baseline.

    Reads the cells in sorted chunks; the matrix stays sparse (PCA centres implicitly).

    Returns:
        ``[len(ids), n_components]`` in the order of ``ids`` (sorted ids expected).
    """
    import scipy.sparse as sp
    from sklearn.decomposition import PCA

    parts = []
    for start in range(0, len(ids), _READ_CELLS):
        rna = collection.read_aligned(np.asarray(ids[start:start + _READ_CELLS])).rna.astype(np.float32)
        totals = np.asarray(rna.sum(axis=1)).ravel()
        scale = np.divide(1e4, totals, out=np.zeros_like(totals), where=totals > 0)
        rna = sp.diags(scale) @ rna
        rna.data = np.log1p(rna.data)
        parts.append(sp.csr_matrix(rna))
    x = sp.vstack(parts, format="csr")
    n_comps = max(1, min(_PCA_COMPONENTS, x.shape[0] - 1, x.shape[1] - 1))
    return PCA(n_components=n_comps, svd_solver="arpack", random_state=seed).fit_transform(x).astype(np.float32)


# ---------------------------------------------------------------------- helpers


def _labels(collection, labels_key: str, unlabeled: str | None) -> tuple[np.ndarray, list[str]]:
    _require_column(collection, labels_key, "--labels-key")
    return label_codes(collection.sources, labels_key, unlabeled, None)


def _batches(collection, batch_key: str | None, registry) -> tuple[np.ndarray, list[str]]:
    if batch_key is None:
        return np.asarray(collection.batch_codes), list(registry.batch_categories)
    _require_column(collection, batch_key, "--batch-key")
    return factorize_batches(collection.sources, batch_key, len(collection.sources) > 1, None, True)


def _require_column(collection, key: str, flag: str) -> None:
    if not any(key in source.obs_columns for source in collection.sources):
        columns = sorted({c for s in collection.sources for c in s.obs_columns if not c.startswith("_")})
        raise ConfigError(f"no study has an obs column {key!r} ({flag}); columns are {columns}")


def _check_out_dir(out_dir: Path) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or (any(out_dir.iterdir())
                                                      and not (out_dir / "metrics.json").is_file())):
        raise ConfigError(f"{out_dir} exists and is not a previous evaluation report; choose another --out")


def _write_cells(path: Path, ids: np.ndarray, labels: np.ndarray, batches: np.ndarray, coords: np.ndarray) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["cell_id", "label", "batch", "umap_1", "umap_2"])
        for i, label, batch, (x, y) in zip(ids.tolist(), labels.tolist(), batches.tolist(), coords.tolist()):
            writer.writerow([i, label, batch, f"{x:.4f}", f"{y:.4f}"])
