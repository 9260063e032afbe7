"""The evaluation report's imputed-against-measured section, for proteins that some studies did not measure.

When studies with different antibody panels are trained together, a protein that study B did not measure is
imputed for B's cells from the model. Nothing in B can check that value, but the studies that did measure the
protein can: the same cell type should carry about the same amount of it. So, per partially measured protein and
per label, the report sets the mean log1p of the *measured* counts (cells whose panel has the protein) beside the
mean log1p of the *imputed* values (cells whose panel lacks it), with the imputation's spread over posterior draws.

Imputed values are what ``denoise --what protein`` gives on unmeasured proteins, made comparable with counts:
background included and decoded as the batches that measured the protein (a batch that never measured it has no
trained background for it), the mean of ``IMPUTE_SAMPLES`` posterior draws; the spread is their standard deviation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

IMPUTE_SAMPLES = 25  # posterior draws per imputed cell: enough for a stable mean and spread, cheap on 20k cells
MIN_CELLS_PER_SIDE = 5  # a label enters the correlation only with this many measured and imputed cells
_READ_CELLS = 4096  # cells per read of the observed counts


def imputed_against_measured(post, ids: np.ndarray, labels: np.ndarray, seed: int = 0) -> dict | None:
    """Measured and imputed protein per label, for every protein measured in some sampled cells and not in others.

    Args:
        post: a ``StorePosterior``.
        ids: sorted global ids of the sampled cells.
        labels: ``[len(ids)]`` label names.
        seed: seed of the posterior draws.

    Returns:
        ``summarize`` of the proteins (see there), or None when every sampled cell measured the same proteins.
    """
    from streamtotal.inference.expression import ExpressionOptions

    collection, registry = post.collection, post.registry
    measured = collection.protein_mask(ids)
    partial = np.flatnonzero(measured.any(axis=0) & ~measured.all(axis=0))
    if partial.size == 0:
        return None
    observed = np.concatenate([collection.read_aligned(ids[s:s + _READ_CELLS]).protein[:, partial]
                               for s in range(0, len(ids), _READ_CELLS)])
    measured = measured[:, partial]
    batch_names = np.asarray(registry.batch_categories)[np.asarray(collection.batch_codes)[ids]]
    names = [registry.protein_names[j] for j in partial]

    # Proteins measured by the same batches are imputed in one pass, decoded as those batches.
    imputed = np.full(observed.shape, np.nan, dtype=np.float64)
    spread = np.full(observed.shape, np.nan, dtype=np.float64)
    decoded_as: dict[str, list[str]] = {}
    groups: dict[tuple[str, ...], list[int]] = {}
    for k in range(len(partial)):
        groups.setdefault(tuple(sorted(set(batch_names[measured[:, k]]))), []).append(k)
    for batches, columns in groups.items():
        rows = np.flatnonzero((~measured[:, columns]).any(axis=1))
        opts = ExpressionOptions(n_samples=IMPUTE_SAMPLES, seed=seed, include_protein_background=True,
                                 transform_batch=batches, proteins=tuple(names[k] for k in columns))
        result = post.compute(["protein", "protein_std"], ids[rows], opts)
        imputed[np.ix_(rows, columns)] = result.values["protein"]
        spread[np.ix_(rows, columns)] = result.values["protein_std"]
        for k in columns:
            decoded_as[names[k]] = list(batches)
    studies = np.asarray([collection.sources[s].name for s in collection.study_codes(ids)])
    return summarize(names, observed, measured, imputed, spread, labels, studies, batch_names, decoded_as)


def summarize(proteins: Sequence[str], observed: np.ndarray, measured: np.ndarray, imputed: np.ndarray,
              spread: np.ndarray, labels: np.ndarray, studies: np.ndarray, batches: np.ndarray,
              decoded_as: dict[str, list[str]]) -> dict:
    """Per protein: where it was measured and imputed, per-label means, their correlation, the relative spread.

    Args:
        proteins: the ``P`` protein names.
        observed: ``[n, P]`` observed counts (used where ``measured``).
        measured: ``[n, P]`` bool, True where the cell's panel has the protein.
        imputed: ``[n, P]`` imputed values (used where not ``measured``).
        spread: ``[n, P]`` their standard deviation over posterior draws.
        labels, studies, batches: ``[n]`` names per cell.
        decoded_as: protein -> the batches its imputed values were decoded as.

    Returns:
        ``{"samples": IMPUTE_SAMPLES, "min_cells_per_side": ..., "proteins": {name: {...}}}``; per protein:
        ``measured_in`` / ``imputed_in`` (study -> cells), ``decoded_as``, ``per_label`` (label -> mean log1p
        measured, mean log1p imputed, cells of each, mean spread of the imputed), ``pearson_over_labels`` (of
        the two means over labels with at least ``MIN_CELLS_PER_SIDE`` cells on each side; None with fewer than
        3 such labels) and ``mean_relative_spread`` (mean of spread / imputed over imputed cells).
    """
    out: dict = {"samples": IMPUTE_SAMPLES, "min_cells_per_side": MIN_CELLS_PER_SIDE, "proteins": {}}
    for k, name in enumerate(proteins):
        have, lack = measured[:, k], ~measured[:, k]
        per_label: dict[str, dict] = {}
        for label in np.unique(labels):
            on = labels == label
            m, i = have & on, lack & on
            per_label[str(label)] = {
                "n_measured": int(m.sum()), "n_imputed": int(i.sum()),
                "measured_mean_log1p": _mean(np.log1p(observed[m, k])),
                "imputed_mean_log1p": _mean(np.log1p(imputed[i, k])),
                "imputed_mean_spread": _mean(spread[i, k]),
            }
        both = [v for v in per_label.values()
                if v["n_measured"] >= MIN_CELLS_PER_SIDE and v["n_imputed"] >= MIN_CELLS_PER_SIDE]
        pearson = None
        if len(both) >= 3:
            x = np.array([v["measured_mean_log1p"] for v in both])
            y = np.array([v["imputed_mean_log1p"] for v in both])
            if x.std() > 0 and y.std() > 0:
                pearson = float(np.corrcoef(x, y)[0, 1])
        values = imputed[lack, k]
        relative = np.divide(spread[lack, k], values, out=np.full(values.shape, np.nan), where=values > 0)
        out["proteins"][name] = {
            "measured_in": _counts(studies[have]), "imputed_in": _counts(studies[lack]),
            "measured_in_batches": _counts(batches[have]), "imputed_in_batches": _counts(batches[lack]),
            "decoded_as": list(decoded_as.get(name, [])),
            "per_label": per_label, "pearson_over_labels": pearson,
            "mean_relative_spread": _mean(relative[np.isfinite(relative)]),
        }
    return out


def plot_imputed_against_measured(summary: dict, out_png: str | Path) -> Path:
    """One panel per protein: per label, mean log1p measured (x) against mean log1p imputed (y), with the spread.

    Error bars are the mean posterior spread of the imputed values, in log1p units at the label's mean.
    """
    proteins = summary["proteins"]
    n = len(proteins)
    cols = min(n, 4)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.4 * rows), squeeze=False)
    for ax, (name, info) in zip(axes.ravel(), proteins.items()):
        points = [(label, v) for label, v in info["per_label"].items()
                  if v["measured_mean_log1p"] is not None and v["imputed_mean_log1p"] is not None]
        x = np.array([v["measured_mean_log1p"] for _, v in points])
        y = np.array([v["imputed_mean_log1p"] for _, v in points])
        mean = np.expm1(y)
        err = np.log1p(mean + np.array([v["imputed_mean_spread"] or 0.0 for _, v in points])) - y
        ax.errorbar(x, y, yerr=err, fmt="o", ms=4, capsize=2)
        for (label, _), xi, yi in zip(points, x, y):
            ax.annotate(label, (xi, yi), fontsize=6, xytext=(2, 2), textcoords="offset points")
        if points:
            lo, hi = float(min(x.min(), y.min())), float(max(x.max(), y.max()))
            ax.plot([lo, hi], [lo, hi], color="grey", lw=0.8, ls="--")
        r = info["pearson_over_labels"]
        ax.set_title(f"{name}  (r over labels = {'n/a' if r is None else f'{r:.2f}'})", fontsize=8)
        ax.set_xlabel("measured: mean log1p count", fontsize=7)
        ax.set_ylabel("imputed: mean log1p value", fontsize=7)
        ax.tick_params(labelsize=6)
    for ax in axes.ravel()[n:]:
        ax.axis("off")
    fig.suptitle("imputed (panels without the protein) against measured (panels with it), per label", fontsize=9)
    fig.tight_layout()
    out_png = Path(out_png)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def _mean(values: np.ndarray) -> float | None:
    values = np.asarray(values, dtype=np.float64)
    return float(values.mean()) if values.size else None


def _counts(names: np.ndarray) -> dict[str, int]:
    kinds, counts = np.unique(names, return_counts=True)
    return {str(k): int(c) for k, c in zip(kinds, counts)}
