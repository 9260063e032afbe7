"""``--cells`` / ``--cells-file``: choosing cells by name on the command line (shared by ``sample`` and ``elbo``)."""

from __future__ import annotations

import argparse

import numpy as np


def add_cell_arguments(p: argparse.ArgumentParser) -> None:
    """Adds ``--cells NAME...`` and ``--cells-file FILE`` (mutually exclusive) to a command."""
    group = p.add_mutually_exclusive_group()
    group.add_argument("--cells", nargs="+", metavar="NAME",
                       help="only these cells, by the store's obs names (default every cell)")
    group.add_argument("--cells-file", metavar="FILE",
                       help="only the cells named in FILE, one obs name per line ('#' comments allowed)")


def selected_cell_ids(args: argparse.Namespace, post) -> np.ndarray | None:
    """The global ids of the cells chosen by ``--cells`` / ``--cells-file``, or None for every cell.

    Raises:
        SelectionError: unknown or repeated names, an empty or unreadable file.
    """
    from streamtotal.inference.cell_names import cell_ids_from_names, read_names_file
    from streamtotal.inference.embed import collection_obs

    if args.cells is None and args.cells_file is None:
        return None
    names = args.cells if args.cells is not None else read_names_file(args.cells_file)
    return cell_ids_from_names(collection_obs(post.collection).index, names)
