"""Arguments shared by ``sample`` and ``elbo``: choosing cells by name (``--cells`` / ``--cells-file``) and how to
draw (seed, batch size, device, progress)."""

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


def add_draw_arguments(p: argparse.ArgumentParser) -> None:
    """Adds ``--seed``, ``--batch-size``, ``--device`` and ``--no-progress`` (how ``sample`` and ``elbo`` draw)."""
    p.add_argument("--seed", type=int, default=0, help="seed of the draws (default 0)")
    p.add_argument("--batch-size", type=int, default=1024,
                   help="cells per forward pass and per write chunk (default 1024)")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def selected_cell_ids(args: argparse.Namespace, post) -> np.ndarray | None:
    """The global ids of the cells chosen by ``--cells`` / ``--cells-file``, or None for every cell.

    Raises:
        SelectionError: unknown or repeated names, an empty or unreadable file.
    """
    from streamtotal.inference.cell_names import cell_ids_from_names, read_names_file

    if args.cells is None and args.cells_file is None:
        return None
    names = args.cells if args.cells is not None else read_names_file(args.cells_file)
    return cell_ids_from_names(post.collection.obs_frame().index, names)
