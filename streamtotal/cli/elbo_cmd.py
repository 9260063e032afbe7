"""``streamtotal elbo``: ELBO, reconstruction error and marginal log-likelihood of a store's cells."""

from __future__ import annotations

import argparse
import json

from streamtotal.cli.cell_selection import add_cell_arguments, add_draw_arguments, selected_cell_ids


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "elbo",
        help="ELBO, reconstruction error and (--marginal-ll) log-likelihood per cell; means as JSON",
        description="Streams STORE (or the chosen cells) through the model of RUN_DIR and prints dataset-level "
        "means as JSON: elbo (one posterior draw per cell, KL weight 1; higher is better), reconstruction_error "
        "(RNA + protein negative log-likelihood at that draw, measured proteins only) and, with --marginal-ll, "
        "marginal_ll (importance-sampled log p(x, y | s) with --n-mc-samples draws; >= elbo on average). "
        "--write stores the per-cell values in STORE's obs (PREFIX_elbo, PREFIX_reconstruction_error, "
        "PREFIX_marginal_ll) chunk by chunk; an interrupted --write resumes when the same command is rerun. "
        "Draws are seeded per block of --batch-size store rows: same seed and batch size, same values.",
    )
    p.add_argument("run_dir", help="training run directory")
    p.add_argument("store", help="store (aligned onto the model's genes and proteins by name)")
    add_cell_arguments(p)
    p.add_argument("--marginal-ll", action="store_true", help="also estimate the marginal log-likelihood")
    p.add_argument("--n-mc-samples", type=int, default=100,
                   help="importance samples per cell for --marginal-ll (default 100)")
    p.add_argument("--mc-chunk", type=int, default=25,
                   help="importance samples evaluated at once (memory: mc-chunk x batch-size cells; default 25)")
    p.add_argument("--write", action="store_true", help="write per-cell values into STORE's obs (every cell)")
    p.add_argument("--prefix", default="streamtotal", help="prefix of the obs columns written (default streamtotal)")
    add_draw_arguments(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    from streamtotal.errors import ConfigError
    from streamtotal.inference.expression import StorePosterior
    from streamtotal.inference.predictive_store import score_cells

    if args.write and (args.cells or args.cells_file):
        raise ConfigError("--write covers every cell of the store; leave out --cells/--cells-file (or --write)")
    post = StorePosterior(args.run_dir, args.store, batch_size=args.batch_size, device=args.device,
                          progress=not args.no_progress)
    ids = selected_cell_ids(args, post)
    result = score_cells(post, ids, marginal_ll=args.marginal_ll, n_mc_samples=args.n_mc_samples,
                         chunk_size=args.mc_chunk, seed=args.seed, write_back=args.write, prefix=args.prefix)
    report = {"n_cells": result.n_cells, **result.means}
    if result.written:
        report.update(written=result.written, chunks_skipped=result.chunks_skipped,
                      chunks_computed=result.chunks_computed)
    print(json.dumps(report))
