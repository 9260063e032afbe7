"""Turning the cell names a user gives (the store's obs index) into global cell ids, with clear errors."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from streamtotal.errors import SelectionError


def read_names_file(path: str | Path) -> list[str]:
    """Cell names from a text file, one per line (blank lines and lines starting with '#' ignored).

    Raises:
        SelectionError: the file cannot be read.
    """
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as e:
        raise SelectionError(f"cannot read the cell list {path}: {e}") from None
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def cell_ids_from_names(obs_names: Sequence[str], requested: Sequence[str]) -> np.ndarray:
    """Global ids of ``requested`` cell names, in the requested order.

    Args:
        obs_names: every cell's name in store order (``Collection.obs_frame().index``; with several studies
            whose names collide, names are ``study:name``).
        requested: the names asked for.

    Returns:
        ``int64`` ids.

    Raises:
        SelectionError: no names, unknown names (a few are listed), names that several cells of the store share
            (ambiguous: each is listed with how many cells bear it) or names requested more than once.
    """
    wanted = [str(r) for r in requested]
    if not wanted:
        raise SelectionError("the cell list is empty; leave out --cells/--cells-file for every cell")
    position: dict[str, int] = {}
    bearers: dict[str, int] = {}  # cells per name, kept only for names borne by more than one cell
    for i, name in enumerate(map(str, obs_names)):
        if name in position:
            bearers[name] = bearers.get(name, 1) + 1
        else:
            position[name] = i
    unknown = [name for name in wanted if name not in position]
    if unknown:
        example = next(iter(position), "")
        raise SelectionError(
            f"{len(unknown)} of {len(wanted)} requested cells are not in the store: {unknown[:10]}"
            f"{' ...' if len(unknown) > 10 else ''}; cells are named by the store's obs index (e.g. {example!r}; "
            "with several studies whose names collide, 'study:name')"
        )
    ambiguous = [name for name in dict.fromkeys(wanted) if name in bearers]
    if ambiguous:
        listed = ", ".join(f"{name!r} ({bearers[name]} cells)" for name in ambiguous[:10])
        raise SelectionError(
            f"{len(ambiguous)} requested cell name(s) are ambiguous: several cells of the store bear them: {listed}"
            f"{' ...' if len(ambiguous) > 10 else ''}; make the store's obs names unique (e.g. anndata's "
            "obs_names_make_unique() before ingest) or choose these cells by position (cell_ids in the Python API)"
        )
    if len(set(wanted)) != len(wanted):
        repeated = sorted({n for n in wanted if wanted.count(n) > 1})
        raise SelectionError(f"cells requested more than once: {repeated[:10]}")
    return np.array([position[name] for name in wanted], dtype=np.int64)
