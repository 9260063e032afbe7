"""streamtotal's differential-expression table in scvi-tools' column names (``TOTALVI.differential_expression``)."""

from __future__ import annotations

import pandas as pd

_RENAMES = {
    "norm_mean1": "scale1",
    "norm_mean2": "scale2",
    "nonzero_frac1": "non_zeros_proportion1",
    "nonzero_frac2": "non_zeros_proportion2",
    "raw_norm_mean1": "raw_normalized_mean1",
    "raw_norm_mean2": "raw_normalized_mean2",
}

SCVI_COLUMNS = ("proba_de", "proba_not_de", "bayes_factor", "scale1", "scale2", "pseudocounts", "delta",
                "lfc_mean", "lfc_median", "lfc_std", "raw_mean1", "raw_mean2", "non_zeros_proportion1",
                "non_zeros_proportion2", "raw_normalized_mean1", "raw_normalized_mean2")
"""scvi-tools' totalVI DE columns, in its order (then ``is_de_fdr_<target>``, ``comparison``, ``group1``,
``group2``, and streamtotal's ``modality``)."""


def scvi_columns(df: pd.DataFrame) -> pd.DataFrame:
    """One comparison of ``DifferentialExpression`` with scvi-tools' columns.

    Args:
        df: from ``DifferentialExpression.compare_groups`` / ``compare_cells`` (its ``attrs`` hold the options).

    Returns:
        A new DataFrame (index = feature name, rows in the same order): ``SCVI_COLUMNS``,
        ``is_de_fdr_<fdr_target>``, ``comparison`` ("<group1> vs <group2>"), ``group1``, ``group2``, ``modality``.
    """
    out = df.rename(columns=_RENAMES).copy()
    attrs = df.attrs
    out["delta"] = attrs.get("delta")
    out["pseudocounts"] = [attrs.get("rna_pseudocount") if m == "rna" else attrs.get("protein_pseudocount")
                           for m in out["modality"]]
    out[f"is_de_fdr_{attrs.get('fdr_target')}"] = out.pop("is_de_fdr")
    out["comparison"] = [f"{a} vs {b}" for a, b in zip(out["group1"], out["group2"])]
    ordered = [*SCVI_COLUMNS, f"is_de_fdr_{attrs.get('fdr_target')}", "comparison", "group1", "group2", "modality"]
    out = out[ordered]
    out.attrs = dict(attrs)
    return out
