"""``streamtotal denoise``: denoised RNA / protein and protein foreground probability, written into the store."""

from __future__ import annotations

import argparse

from streamtotal.cli.output_path import check_output_path

WHAT = {"rna": ["rna"], "protein": ["protein"], "foreground": ["foreground"], "all": ["rna", "protein", "foreground"]}


def _library_size(text: str) -> float | str:
    if text == "latent":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--library-size must be a number or 'latent', got {text!r}") from None


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "denoise",
        help="write denoised RNA/protein and protein foreground probability into a store's obsm",
        description="Streams STORE through the model of RUN_DIR and writes, chunk by chunk, obsm/denoised_rna "
        "[cells x genes] (large: 4 bytes per cell and gene), obsm/denoised_protein and "
        "obsm/protein_foreground_prob [cells x proteins]; column names are in each array's attrs "
        "('feature_names'). Writing goes to temporary arrays, chunk by chunk (chunks of --batch-size cells), "
        "renamed when complete: an interrupted run leaves the previous result intact, and rerunning the same "
        "command (same model, options and batch size) continues with the chunks not written yet.",
    )
    p.add_argument("run_dir", help="training run directory")
    p.add_argument("store", help="Zarr store (aligned onto the model's genes and proteins by name)")
    p.add_argument("--what", nargs="+", choices=sorted(WHAT), default=["all"], metavar="WHAT",
                   help="what to compute, one or several of rna, protein, foreground, all (default all)")
    p.add_argument("--library-size", type=_library_size, default=1.0,
                   help="RNA rows sum to this (e.g. 1e4), or 'latent' for each cell's own library (default 1)")
    p.add_argument("--transform-batch", nargs="+", metavar="B",
                   help="decode as if in batch B (several: averaged); default each cell's own batch")
    p.add_argument("--genes", nargs="+", help="only these genes (default all)")
    p.add_argument("--proteins", nargs="+", help="only these proteins (default all)")
    p.add_argument("--n-samples", type=int, default=1,
                   help="posterior draws averaged (default 1: the plug-in estimate at the posterior means)")
    p.add_argument("--protein-std", action="store_true",
                   help="with --what protein or all: also write the denoised protein's standard deviation over the "
                   "--n-samples (>= 2) posterior draws, its uncertainty (also for proteins a study did not "
                   "measure), to obsm/denoised_protein_std")
    p.add_argument("--include-protein-background", action="store_true", help="add the background part pi*beta")
    p.add_argument("--sample-protein-mixing", action="store_true", help="draw Bernoulli(pi) instead of using pi")
    p.add_argument("--scale-protein", action="store_true", help="scale each cell's protein vector to sum 1")
    p.add_argument("--seed", type=int, default=0, help="seed of the random draws (default 0)")
    p.add_argument("--no-write-back", action="store_true", help="do not write into the store")
    p.add_argument("--out-h5ad", help="also write obs + results (in memory: size it) to this .h5ad file")
    p.add_argument("--batch-size", type=int, default=1024, help="cells per forward pass (default 1024)")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    check_output_path(args.out_h5ad, "--out-h5ad", kind="file")
    from streamtotal.inference.expression import ExpressionOptions, StorePosterior

    options = ExpressionOptions(
        library_size=args.library_size, transform_batch=args.transform_batch, n_samples=args.n_samples,
        include_protein_background=args.include_protein_background,
        sample_protein_mixing=args.sample_protein_mixing, scale_protein=args.scale_protein,
        genes=args.genes, proteins=args.proteins, seed=args.seed,
    )
    post = StorePosterior(args.run_dir, args.store, batch_size=args.batch_size, device=args.device,
                          progress=not args.no_progress)
    chosen = [part for name in args.what for part in WHAT[name]]
    chosen = [part for i, part in enumerate(chosen) if part not in chosen[:i]]  # each once, in the order asked
    what = chosen + (["protein_std"] if args.protein_std and "protein" in chosen else [])
    result = post.compute(what, None, options, write_back=not args.no_write_back,
                          keep=bool(args.out_h5ad))
    message = f"denoised {result.n_cells} cells"
    if result.written:
        message += f"; wrote {', '.join(f'obsm/{k}' for k in result.written.values())} into {args.store}"
        if result.chunks_skipped:
            message += (f" (resumed: {result.chunks_skipped} of {result.chunks_skipped + result.chunks_computed} "
                        "chunks were already written)")
    if args.out_h5ad:
        message += f"; exported {post.export_h5ad(args.out_h5ad, result)}"
    print(message)
