"""``model.history``: a run's ``metrics.jsonl`` as scvi-tools' dict of one-column DataFrames indexed by epoch.

scvi-tools (Lightning) logs one value per epoch under keys such as ``elbo_train``, ``elbo_validation``,
``reconstruction_loss_train``, ``kl_local_train`` and ``kl_weight``. The trainer logs a window of steps every
``log_every_steps`` and one validation record per epoch; an epoch's training value here is the cell-weighted
mean of its windows (the per-cell loss, as scvi-tools' per-cell ``elbo``). An epoch whose steps all fell in a
window closed by the next epoch still gets that window's value.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import pandas as pd

from streamtotal.training.metrics_log import read_metrics

_TRAIN_TERMS = {
    # scvi-tools key -> terms of a train record summed for it
    "elbo_train": ("rna_nll", "protein_nll", "kl_z", "kl_background"),
    "reconstruction_loss_train": ("rna_nll", "protein_nll"),
    "kl_local_train": ("kl_z", "kl_background"),
    "train_loss_epoch": ("loss",),
}
_VALIDATION_TERMS = {
    "elbo_validation": ("neg_elbo",),
    "reconstruction_loss_validation": ("rna_nll", "protein_nll"),
    "kl_local_validation": ("kl_z", "kl_background"),
    "validation_loss": ("neg_elbo",),
}


def history_from_metrics(path: str | Path) -> dict[str, pd.DataFrame]:
    """Reads a run's ``metrics.jsonl`` into scvi-tools' ``model.history`` shape.

    Args:
        path: the ``metrics.jsonl`` file (missing = no history).

    Returns:
        ``{key: DataFrame}``, each with one column named as its key and an ``epoch`` index: the keys of
        ``_TRAIN_TERMS`` and ``_VALIDATION_TERMS`` present in the log, plus ``kl_weight`` and ``lr`` (their last
        value in each epoch) and, for totalANVI, ``label_accuracy_validation`` and
        ``classification_loss_validation``.
    """
    train_sums: dict[int, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    last: dict[str, dict[int, float]] = defaultdict(dict)
    validation: dict[str, dict[int, float]] = defaultdict(dict)
    for record in read_metrics(Path(path)):
        epoch = int(record.get("epoch", 0))
        if record.get("kind") == "train":
            # Each window reports per-cell means over ``log_every_steps`` minibatches of one size: windows weigh
            # the same.
            sums = train_sums[epoch]
            sums["_windows"] += 1.0
            for term in ("loss", "rna_nll", "protein_nll", "kl_z", "kl_background"):
                sums[term] += float(record.get(term, 0.0))
            for key in ("kl_weight", "lr"):
                if key in record:
                    last[key][epoch] = float(record[key])
        elif record.get("kind") == "validation":
            for key, terms in _VALIDATION_TERMS.items():
                if all(f"val_{t}" in record for t in terms):
                    validation[key][epoch] = sum(float(record[f"val_{t}"]) for t in terms)
            for term in ("label_accuracy", "classification_loss"):
                if f"val_{term}" in record:
                    validation[f"{term}_validation"][epoch] = float(record[f"val_{term}"])
    history: dict[str, pd.DataFrame] = {}
    for key, terms in _TRAIN_TERMS.items():
        values = {e: sum(s[t] for t in terms) / s["_windows"] for e, s in sorted(train_sums.items())}
        if values:
            history[key] = _frame(key, values)
    for key, values in (*last.items(), *validation.items()):
        history[key] = _frame(key, values)
    return history


def _frame(key: str, values: dict[int, float]) -> pd.DataFrame:
    index = pd.Index(sorted(values), name="epoch")
    return pd.DataFrame({key: [values[e] for e in index]}, index=index)
