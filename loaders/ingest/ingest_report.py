"""What an ingest found and wrote, for the user to check before training."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from loaders.protein_panels import group_keys

MAX_LABEL_CATEGORIES = 1000
"""obs columns with more distinct values than this are not summarised as label-like."""


@dataclass(frozen=True)
class ColumnSummary:
    """Summary of one label-like obs column.

    Attributes:
        n_categories: distinct non-missing values.
        n_missing: cells with no value (candidates for "unlabeled").
        top: up to five ``(value, cells)`` pairs, most frequent first.
    """

    n_categories: int
    n_missing: int
    top: list[tuple[str, int]]


@dataclass(frozen=True)
class IngestReport:
    """Result of ``ingest``.

    Attributes:
        input_path, output_path, input_format: what was read and written.
        n_cells, n_genes, n_proteins: sizes of the store.
        batch_key: obs column used for panel detection (None: none).
        batches: cells per batch value (empty without ``batch_key``).
        label_columns: summaries of label-like obs columns (categorical/string, few values).
        missing_proteins: ``{batch: [proteins not measured]}`` for batches missing any protein.
        n_panels: number of distinct protein panels.
        seconds: wall time of the ingest.
        notes: other things worth knowing (e.g. feature types left out, duplicate cell names).
    """

    input_path: str
    output_path: str
    input_format: str
    n_cells: int
    n_genes: int
    n_proteins: int
    batch_key: str | None
    batches: dict[str, int]
    label_columns: dict[str, ColumnSummary]
    missing_proteins: dict[str, list[str]]
    n_panels: int
    seconds: float
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        rate = self.n_cells / self.seconds if self.seconds > 0 else float("inf")
        lines = [
            f"ingested {self.input_path} ({self.input_format}) -> {self.output_path}",
            f"  {self.n_cells} cells x {self.n_genes} genes, {self.n_proteins} proteins "
            f"({self.seconds:.1f} s, {rate:,.0f} cells/s)",
        ]
        if self.batch_key:
            lines.append(f"  batches by {self.batch_key!r}: {len(self.batches)}")
            lines += [f"    {b}: {n} cells" for b, n in list(self.batches.items())[:20]]
            if len(self.batches) > 20:
                lines.append(f"    ... {len(self.batches) - 20} more")
        lines.append(f"  protein panels: {self.n_panels}")
        for batch, missing in self.missing_proteins.items():
            shown = ", ".join(missing[:10]) + (f", ... ({len(missing)} in all)" if len(missing) > 10 else "")
            lines.append(f"    {batch}: not measured: {shown}")
        if self.label_columns:
            lines.append("  label-like obs columns:")
            for col, s in self.label_columns.items():
                top = ", ".join(f"{v} ({n})" for v, n in s.top)
                lines.append(f"    {col}: {s.n_categories} values, {s.n_missing} missing; top: {top}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def summarise_label_columns(obs: pd.DataFrame, skip: set[str]) -> dict[str, ColumnSummary]:
    """Returns summaries of obs columns that look like labels: categorical, string or bool columns with
    between 1 and ``MAX_LABEL_CATEGORIES`` values that are not unique per cell."""
    out = {}
    for col in obs.columns:
        if col in skip:
            continue
        series = obs[col]
        dtype = series.dtype
        if not (isinstance(dtype, pd.CategoricalDtype) or dtype == object or pd.api.types.is_string_dtype(dtype)
                or pd.api.types.is_bool_dtype(dtype)):
            continue
        counts = series.astype(object).value_counts(dropna=True)
        if not 1 <= len(counts) <= MAX_LABEL_CATEGORIES or (len(counts) == len(series) and len(series) > 1):
            continue
        out[str(col)] = ColumnSummary(
            n_categories=int(len(counts)),
            n_missing=int(series.isna().sum()),
            top=[(str(v), int(n)) for v, n in counts.head(5).items()],
        )
    return out


def batch_counts(values) -> dict[str, int]:
    """Returns cells per batch value, in order of first appearance."""
    keys = group_keys(values)
    uniques, first, counts = np.unique(keys, return_index=True, return_counts=True)
    order = np.argsort(first)
    return {str(uniques[i]): int(counts[i]) for i in order}


def build_report(reader, *, output_path, genes, proteins, obs: pd.DataFrame, batch_key: str | None, panels,
                 skip_columns: set[str], started: float, notes: list[str]) -> IngestReport:
    """The report of a finished ingest (either output format): what was read, batches, labels and panels.

    Args:
        reader: the input's block reader.
        output_path: the store written.
        genes, proteins: the names written.
        obs: the input's obs.
        batch_key: obs column of the panels, or None.
        panels: the writer's panel assignment (None: one full panel).
        skip_columns: bookkeeping obs columns left out of the label summary.
        started: ``time.perf_counter()`` at the start of the ingest.
        notes: what the ingest noticed on the way.
    """
    return IngestReport(
        input_path=reader.path,
        output_path=output_path,
        input_format=reader.format_name,
        n_cells=reader.n_obs,
        n_genes=len(genes),
        n_proteins=len(proteins),
        batch_key=batch_key,
        batches=batch_counts(obs[batch_key].to_numpy()) if batch_key else {},
        label_columns=summarise_label_columns(obs, skip=skip_columns),
        missing_proteins=panels.missing_by_group(proteins) if panels else {},
        n_panels=len(panels.panels) if panels else 1,
        seconds=time.perf_counter() - started,
        notes=notes,
    )
