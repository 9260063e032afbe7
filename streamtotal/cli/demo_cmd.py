"""``streamtotal demo``: the whole pipeline on built-in simulated data, in a few minutes on a laptop."""

from __future__ import annotations

import argparse

from streamtotal.demo import DemoConfig
from streamtotal.cli.output_path import check_output_path


def register(sub: argparse._SubParsersAction) -> None:
    d = DemoConfig()
    p = sub.add_parser(
        "demo",
        help="simulate, ingest, train, embed and plot on built-in data",
        description="Simulates a small CITE-seq atlas (cell types, 3 batches, protein background/foreground, one "
        "batch missing 3 proteins), ingests it into a Zarr store, trains totalVI streaming from it, writes the "
        "latent back into the store, and plots a UMAP and the training curves into OUT.",
    )
    p.add_argument("--out", default=d.out, help=f"output folder (default {d.out})")
    p.add_argument("--cells", type=int, default=d.n_cells, help=f"simulated cells (default {d.n_cells})")
    p.add_argument("--epochs", type=int, default=d.epochs, help=f"training epochs (default {d.epochs})")
    p.add_argument("--seed", type=int, default=d.seed, help=f"seed (default {d.seed})")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    check_output_path(args.out, "--out", kind="file")
    from streamtotal.demo import run_demo
    from streamtotal.cli.process_settings import tune_process_for_training

    tune_process_for_training("auto")  # the demo trains on the default device
    run_demo(DemoConfig(out=args.out, n_cells=args.cells, epochs=args.epochs, seed=args.seed,
                        progress=not args.no_progress))
