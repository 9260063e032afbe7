"""Protein panel detection: which proteins each group of cells (e.g. batch) actually measured.

As in scvi-tools, a protein whose counts are all zero within a group was not measured there (a study
without that antibody), so it must be masked out of the likelihood rather than read as a true zero.
The detector works block by block from per-group column sums, so it never needs the whole matrix.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp

from loaders.errors import StoreFormatError

MISSING_GROUP = "nan"
"""Group name given to cells whose group value is missing (NaN/None)."""


@dataclass(frozen=True)
class PanelAssignment:
    """Result of panel detection.

    Attributes:
        panels: ``[P, T] bool`` distinct measured-protein sets, in order of first appearance.
        group_names: ``[G]`` str group values (e.g. batch names), in order of first appearance.
        panel_of_group: ``[G] int`` panel index of each group.
        cells_per_group: ``[G] int`` number of cells in each group.
    """

    panels: np.ndarray
    group_names: np.ndarray
    panel_of_group: np.ndarray
    cells_per_group: np.ndarray

    def codes_for(self, group_values) -> np.ndarray:
        """Returns ``[n] int16`` panel codes for per-cell group values (as given to the detector).

        Raises:
            KeyError: a value was never seen by the detector.
        """
        keys = group_keys(group_values)
        index = {name: i for i, name in enumerate(self.group_names)}
        uniques, inverse = np.unique(keys, return_inverse=True)
        group_idx = np.array([index[u] for u in uniques], dtype=np.int64)
        return self.panel_of_group[group_idx][inverse].astype(np.int16)

    def missing_by_group(self, protein_names) -> dict[str, list[str]]:
        """Returns ``{group: [proteins not measured]}`` for groups missing at least one protein."""
        names = np.asarray(protein_names)
        out = {}
        for group, panel in zip(self.group_names, self.panel_of_group):
            missing = names[~self.panels[panel]]
            if missing.size:
                out[str(group)] = [str(m) for m in missing]
        return out


def checked_panel_codes(codes: np.ndarray, n_panels: int, where: str) -> np.ndarray:
    """Returns stored per-cell panel codes as int64 after checking they index the stored panels.

    Raises:
        StoreFormatError: a code falls outside ``[0, n_panels)``.
    """
    codes = np.asarray(codes, dtype=np.int64)
    if codes.size and (codes.min() < 0 or codes.max() >= n_panels):
        raise StoreFormatError(f"{where}: obs/_protein_panel holds codes outside [0, {n_panels}).")
    return codes


def group_keys(values) -> np.ndarray:
    """Returns per-cell group values as an object array of str, missing values as ``MISSING_GROUP``."""
    series = pd.Series(np.asarray(values, dtype=object))
    keys = series.astype(str).to_numpy(dtype=object)
    keys[series.isna().to_numpy()] = MISSING_GROUP
    return keys


class ProteinPanelDetector:
    """Accumulates per-group protein column sums block by block and derives panels from them."""

    def __init__(self, n_proteins: int) -> None:
        """Args:
            n_proteins: number of protein columns of every block.
        """
        self._n_proteins = n_proteins
        self._index: dict[str, int] = {}
        self._sums = np.zeros((0, n_proteins), dtype=np.float64)
        self._counts = np.zeros(0, dtype=np.int64)

    def update(self, group_values, protein_block: np.ndarray) -> None:
        """Adds one block.

        Args:
            group_values: ``[n]`` group value of each cell of the block.
            protein_block: ``[n, T]`` protein counts of the block (dense or sparse).
        """
        keys = group_keys(group_values)
        uniques, inverse = np.unique(keys, return_inverse=True)
        for u in uniques:
            if u not in self._index:
                self._index[u] = len(self._index)
        grow = len(self._index) - self._sums.shape[0]
        if grow:
            self._sums = np.vstack([self._sums, np.zeros((grow, self._n_proteins))])
            self._counts = np.concatenate([self._counts, np.zeros(grow, dtype=np.int64)])
        rows = np.array([self._index[u] for u in uniques], dtype=np.int64)[inverse]
        # A sparse indicator matrix sums all groups in one product instead of one mask per group.
        indicator = sp.csr_matrix(
            (np.ones(rows.size), (rows, np.arange(rows.size))), shape=(len(self._index), rows.size)
        )
        block = protein_block.toarray() if sp.issparse(protein_block) else np.asarray(protein_block)
        # abs: a negative count must not cancel a positive one (invalid counts are refused elsewhere).
        self._sums += np.asarray(indicator @ np.abs(block.astype(np.float64)))
        self._counts += np.bincount(rows, minlength=len(self._index))

    def result(self) -> PanelAssignment:
        """Returns the panels found so far (one all-True panel when no block was added)."""
        if not self._index:
            return PanelAssignment(
                panels=np.ones((1, self._n_proteins), dtype=bool),
                group_names=np.array([], dtype=object),
                panel_of_group=np.zeros(0, dtype=np.int64),
                cells_per_group=np.zeros(0, dtype=np.int64),
            )
        measured = self._sums > 0
        panels: list[np.ndarray] = []
        panel_of_group = np.empty(measured.shape[0], dtype=np.int64)
        for g, row in enumerate(measured):
            for p, panel in enumerate(panels):
                if np.array_equal(panel, row):
                    panel_of_group[g] = p
                    break
            else:
                panel_of_group[g] = len(panels)
                panels.append(row)
        return PanelAssignment(
            panels=np.stack(panels),
            group_names=np.array(list(self._index), dtype=object),
            panel_of_group=panel_of_group,
            cells_per_group=self._counts.copy(),
        )
