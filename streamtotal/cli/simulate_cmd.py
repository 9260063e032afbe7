"""``streamtotal simulate``: write a simulated CITE-seq atlas as an h5ad file or straight into a Zarr store."""

from __future__ import annotations

import argparse

from streamtotal.simulate import CiteSimulator, SimulationConfig
from streamtotal.simulate_writer import write_simulation  # noqa: F401 (also imported from here by tests)
from streamtotal.cli.output_path import check_output_path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "simulate",
        help="simulate a CITE-seq atlas (cell types, batches, protein background/foreground)",
        description="Simulates realistic CITE-seq data. OUT ending in .h5ad is written as AnnData (in memory, for "
        "small data); anything else is written block by block as a streamtotal Zarr store (any size).",
    )
    p.add_argument("out", help="output .h5ad file or Zarr store directory")
    d = SimulationConfig()
    p.add_argument("--cells", type=int, default=d.n_cells, help=f"number of cells (default {d.n_cells})")
    p.add_argument("--genes", type=int, default=d.n_genes, help=f"number of genes (default {d.n_genes})")
    p.add_argument("--proteins", type=int, default=d.n_proteins, help=f"number of proteins (default {d.n_proteins})")
    p.add_argument("--cell-types", type=int, default=d.n_cell_types, help=f"cell types (default {d.n_cell_types})")
    p.add_argument("--batches", type=int, default=d.n_batches, help=f"batches (default {d.n_batches})")
    p.add_argument("--missing-proteins", type=int, default=d.n_missing_proteins,
                   help=f"proteins the last batch did not measure (default {d.n_missing_proteins})")
    p.add_argument("--seed", type=int, default=d.seed, help=f"random seed (default {d.seed})")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    check_output_path(args.out, "OUT", kind="file")
    config = SimulationConfig(n_cells=args.cells, n_genes=args.genes, n_proteins=args.proteins,
                              n_cell_types=args.cell_types, n_batches=args.batches,
                              n_missing_proteins=args.missing_proteins, seed=args.seed)
    path = write_simulation(CiteSimulator(config), args.out, overwrite=args.overwrite)
    print(f"wrote {config.n_cells} simulated cells x {config.n_genes} genes x {config.n_proteins} proteins to {path}")
