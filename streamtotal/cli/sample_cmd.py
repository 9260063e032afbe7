"""``streamtotal sample``: posterior predictive RNA and protein counts, to a file or into the store."""

from __future__ import annotations

import argparse
import json

from streamtotal.cli.cell_selection import add_cell_arguments, add_draw_arguments, selected_cell_ids
from streamtotal.cli.output_path import check_output_path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sample",
        help="posterior predictive RNA and protein counts, for chosen cells (file) or every cell (into the store)",
        description="Draws posterior predictive counts with the model of RUN_DIR: z from q(z|x,y,s), log beta "
        "from its posterior, Bernoulli(pi) background/foreground per protein, then negative-binomial RNA and "
        "protein counts (unmeasured proteins are drawn too). --out FILE.h5ad|FILE.zarr writes an AnnData of the "
        "chosen cells (X = RNA counts, obsm['protein_counts'] = protein counts; several --n-samples repeat each "
        "cell, with obs 'cell' and 'sample'); it is held in memory, so choose the cells (--cells/--cells-file). "
        "--write-back writes one draw for every cell into STORE's obsm/predictive_rna and "
        "obsm/predictive_protein chunk by chunk; an interrupted write-back resumes when the same command is "
        "rerun. Draws are seeded per block of --batch-size store rows: same seed and batch size, same counts.",
    )
    p.add_argument("run_dir", help="training run directory")
    p.add_argument("store", help="store (aligned onto the model's genes and proteins by name)")
    p.add_argument("--out", help="write the chosen cells' draws to this .h5ad or .zarr AnnData file")
    p.add_argument("--write-back", action="store_true",
                   help="write one draw per cell into STORE's obsm (every cell; resumable)")
    add_cell_arguments(p)
    p.add_argument("--n-samples", type=int, default=1, help="draws per cell for --out (default 1)")
    p.add_argument("--what", nargs="+", choices=["rna", "protein"], default=["rna", "protein"],
                   help="modalities written back (default both)")
    p.add_argument("--genes", nargs="+", help="only these genes (default all)")
    p.add_argument("--proteins", nargs="+", help="only these proteins (default all)")
    add_draw_arguments(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    check_output_path(args.out, "--out", kind="file")
    from streamtotal.errors import ConfigError
    from streamtotal.inference.expression import StorePosterior
    from streamtotal.inference.predictive_store import export_predictive, write_predictive

    if not args.out and not args.write_back:
        raise ConfigError("say where the draws go: --out FILE.h5ad (chosen cells) and/or --write-back (the store)")
    if args.write_back and (args.cells or args.cells_file):
        raise ConfigError("--write-back covers every cell of the store; use --out FILE.h5ad for chosen cells")
    if args.write_back and args.n_samples != 1:
        raise ConfigError("--write-back stores one draw per cell; use --out FILE.h5ad for several --n-samples")
    post = StorePosterior(args.run_dir, args.store, batch_size=args.batch_size, device=args.device,
                          progress=not args.no_progress)
    report: dict = {"n_cells": post.n_obs}
    if args.out:
        ids = selected_cell_ids(args, post)
        path = export_predictive(post, args.out, ids, args.n_samples, genes=args.genes, proteins=args.proteins,
                                 seed=args.seed)
        report.update(n_cells=post.n_obs if ids is None else int(ids.size), n_samples=args.n_samples,
                      exported=str(path))
    if args.write_back:
        result = write_predictive(post, what=args.what, genes=args.genes, proteins=args.proteins, seed=args.seed)
        report.update(written=result.written, chunks_skipped=result.chunks_skipped,
                      chunks_computed=result.chunks_computed)
    print(json.dumps(report))
