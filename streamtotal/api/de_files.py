"""Writing differential-expression tables as ``streamtotal de --out`` does: one CSV per comparison, atomically."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from loaders.atomic_files import write_file_atomically
from streamtotal.errors import ConfigError


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text) or "_"


def write_tables(tables: dict[str, pd.DataFrame], out: str | Path, groupby: str) -> list[Path]:
    """Writes each comparison (streamtotal's columns, as the CLI) to ``out``.

    Args:
        tables: group -> ``DifferentialExpression`` table.
        out: a ``.csv`` file (one comparison) or a directory (files ``de_<groupby>_<group>_vs_<other>.csv``).
        groupby: the obs column compared (names the files).

    Returns:
        The files written.

    Raises:
        ConfigError: a single ``.csv`` for several comparisons.
    """
    out = Path(out)
    single = out.suffix.lower() == ".csv"
    if single and len(tables) > 1:
        raise ConfigError(f"write_to={str(out)!r} is one CSV file but there are {len(tables)} comparisons; "
                          "give a directory")
    written = []
    for group, df in tables.items():
        other = df["group2"].iloc[0] if len(df) else "rest"
        path = out if single else out / f"de_{_safe(groupby)}_{_safe(group)}_vs_{_safe(str(other))}.csv"
        written.append(write_file_atomically(path, df.to_csv))
    return written
