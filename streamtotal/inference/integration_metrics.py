"""scib-metrics scores of an embedding: bio conservation, batch correction and their aggregates, as scib does.

The metric set and the aggregation follow ``scib_metrics.benchmark.Benchmarker``'s defaults (scib-metrics 0.5):
bio = mean of isolated labels, k-means NMI, k-means ARI, silhouette label and cLISI; batch = mean of BRAS,
iLISI, kBET per label, graph connectivity and PCR comparison; total = 0.6 bio + 0.4 batch. Neighbours are
computed once, exactly (scikit-learn), with 90 per cell and subset to 15 / 50 as the Benchmarker does, instead
of pynndescent (approximate, and a minute of numba compilation per process).

``kbet_per_label`` still builds diffusion neighbours with pynndescent inside scib-metrics: the first call in a
process spends about a minute compiling; leave it out of ``metrics`` for quick looks.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from streamtotal.errors import ConfigError

BIO_METRICS = ("isolated_labels", "nmi_ari_cluster_labels_kmeans", "silhouette_label", "clisi_knn")
"""Bio-conservation metrics (the Benchmarker's defaults; k-means NMI and ARI count as two)."""

BATCH_METRICS = ("bras", "ilisi_knn", "kbet_per_label", "graph_connectivity", "pcr_comparison")
"""Batch-correction metrics (the Benchmarker's defaults)."""

OPTIONAL_METRICS = ("silhouette_batch",)
"""Computed only when asked for (scib's original batch ASW, replaced by BRAS in scib-metrics 0.5)."""

ALL_METRICS = BIO_METRICS + BATCH_METRICS + OPTIONAL_METRICS
DEFAULT_METRICS = BIO_METRICS + BATCH_METRICS

_MAX_NEIGHBORS = 90  # the Benchmarker's largest neighbourhood (LISI)


def check_metrics(metrics: Sequence[str] | None) -> tuple[str, ...]:
    """Validates a metric selection; None means ``DEFAULT_METRICS``.

    Raises:
        ConfigError: an unknown metric name, or an empty selection.
    """
    if metrics is None:
        return DEFAULT_METRICS
    chosen = tuple(dict.fromkeys(str(m) for m in metrics))
    unknown = [m for m in chosen if m not in ALL_METRICS]
    if unknown or not chosen:
        raise ConfigError(f"unknown scib metrics {unknown or list(chosen)}; choose among {list(ALL_METRICS)}")
    return chosen


def integration_metrics(latent: np.ndarray, labels: np.ndarray, batches: np.ndarray | None = None, *,
                        x_pre: np.ndarray | None = None, metrics: Sequence[str] | None = None) -> dict:
    """scib-metrics scores of an embedding, grouped like the Benchmarker's results table.

    Args:
        latent: ``[n, d]`` embedding of labelled cells.
        labels: ``[n]`` cell labels (no unlabeled cells: drop them first); at least two distinct values.
        batches: ``[n]`` batch values; None or a single batch skips the batch-correction metrics.
        x_pre: ``[n, p]`` embedding of the unintegrated data (PCA of normalised RNA) for ``pcr_comparison``;
            None skips that metric.
        metrics: names among ``ALL_METRICS``; None = ``DEFAULT_METRICS``.

    Returns:
        ``{"bio_conservation": {name: value}, "batch_correction": {name: value}, "aggregate":
        {"bio_conservation", "batch_correction", "total"}, "skipped": {name: why}}``; values are floats in
        [0, 1] (higher is better) or None where a metric is undefined (e.g. kBET with every label in one batch).

    Raises:
        ConfigError: shapes disagree, fewer than two labels or too few cells, unknown metric names.
    """
    chosen = check_metrics(metrics)
    scib_metrics, NeighborsResults = import_scib_metrics()
    from sklearn.neighbors import NearestNeighbors

    latent = np.ascontiguousarray(latent, dtype=np.float32)
    labels = np.asarray(labels).astype(str)
    n = latent.shape[0]
    if latent.ndim != 2 or labels.shape != (n,):
        raise ConfigError(f"latent must be [n, d] and labels [n]; got {latent.shape} and {labels.shape}")
    if len(np.unique(labels)) < 2:
        raise ConfigError(f"scib metrics need at least two labels; got {np.unique(labels).tolist()}")
    if n < 20:
        raise ConfigError(f"scib metrics need at least 20 labelled cells; got {n}")
    skipped: dict[str, str] = {}
    if batches is not None:
        batches = np.asarray(batches).astype(str)
        if batches.shape != (n,):
            raise ConfigError(f"batches must be [{n}]; got {batches.shape}")
    single_batch = batches is None or len(np.unique(batches)) < 2
    if single_batch:
        batches = np.zeros(n, dtype=str) if batches is None else batches
        for m in chosen:
            if m in BATCH_METRICS + OPTIONAL_METRICS:
                skipped[m] = "one batch only"
    if x_pre is None and "pcr_comparison" in chosen and "pcr_comparison" not in skipped:
        skipped["pcr_comparison"] = "no unintegrated embedding given"

    k = min(_MAX_NEIGHBORS, n)
    distances, indices = NearestNeighbors(n_neighbors=k).fit(latent).kneighbors(latent)
    neighbors = NeighborsResults(indices=indices, distances=distances.astype(np.float32))

    def knn(m: int):
        return neighbors.subset_neighbors(min(m, k))

    calls = {
        "isolated_labels": lambda: scib_metrics.isolated_labels(latent, labels, batches),
        "nmi_ari_cluster_labels_kmeans": lambda: scib_metrics.nmi_ari_cluster_labels_kmeans(latent, labels),
        "silhouette_label": lambda: scib_metrics.silhouette_label(latent, labels),
        "clisi_knn": lambda: scib_metrics.clisi_knn(knn(90), labels),
        "bras": lambda: scib_metrics.bras(latent, labels, batches),
        "ilisi_knn": lambda: scib_metrics.ilisi_knn(knn(90), batches),
        "kbet_per_label": lambda: scib_metrics.kbet_per_label(knn(50), batches, labels),
        "graph_connectivity": lambda: scib_metrics.graph_connectivity(knn(15), labels),
        "pcr_comparison": lambda: scib_metrics.pcr_comparison(x_pre, latent, batches, categorical=True),
        "silhouette_batch": lambda: scib_metrics.silhouette_batch(latent, labels, batches),
    }
    bio: dict[str, float | None] = {}
    batch: dict[str, float | None] = {}
    for name in chosen:
        if name in skipped:
            continue
        value = calls[name]()
        group = bio if name in BIO_METRICS else batch
        if isinstance(value, dict):  # k-means gives NMI and ARI
            for part, v in value.items():
                group[f"{name}_{part}"] = _finite(v)
        else:
            group[name] = _finite(value)
    agg_bio = _mean([v for k_, v in bio.items()])
    agg_batch = _mean([v for k_, v in batch.items() if k_ in BATCH_METRICS])
    total = None if agg_bio is None or agg_batch is None else 0.6 * agg_bio + 0.4 * agg_batch
    return {"bio_conservation": bio, "batch_correction": batch,
            "aggregate": {"bio_conservation": agg_bio, "batch_correction": agg_batch, "total": total},
            "skipped": skipped}


def import_scib_metrics():
    """The ``scib_metrics`` module and its ``NeighborsResults`` (importing jax takes seconds).

    Raises:
        ConfigError: scib-metrics is not installed.
    """
    try:
        import scib_metrics
        from scib_metrics.nearest_neighbors import NeighborsResults
    except ImportError as e:
        raise ConfigError(f"the evaluation report needs scib-metrics ({e}); install it: "
                          "pip install 'streamtotal[evaluate]' (or pip install scib-metrics)") from e
    return scib_metrics, NeighborsResults


def _finite(value) -> float | None:
    value = float(np.asarray(value))
    return value if math.isfinite(value) else None


def _mean(values: list[float | None]) -> float | None:
    """Mean over defined values (the Benchmarker's groupby-mean skips NaN the same way)."""
    kept = [v for v in values if v is not None]
    return float(np.mean(kept)) if kept else None
