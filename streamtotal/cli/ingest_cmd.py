"""``streamtotal ingest``: convert h5ad / h5mu / 10x h5 into a Zarr store laid out for streaming."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "ingest",
        help="convert an h5ad, h5mu or 10x feature-barcode .h5 into a streaming Zarr store",
        description="Converts INPUT block by block (out of core) into a Zarr store chunked for streaming, "
        "validating counts on the way (finite, non-negative, integer unless --allow-non-integer), and reports "
        "what it found. The store is written to a temporary name and renamed when complete.",
    )
    p.add_argument("input", help="input file: .h5ad, .h5mu or 10x .h5")
    p.add_argument("--out", required=True, help="output Zarr store directory")
    p.add_argument("--format", dest="input_format", default="auto", choices=["auto", "h5ad", "h5mu", "10x"],
                   help="input format (default: from the file)")
    p.add_argument("--protein-key", default="protein_expression",
                   help="h5ad: obsm key of the protein counts (default protein_expression)")
    p.add_argument("--rna-layer", default=None, help="h5ad: take RNA counts from this layer instead of X")
    p.add_argument("--batch-key", default=None,
                   help="obs column of batches; proteins all-zero within a batch are recorded as not measured there")
    p.add_argument("--allow-non-integer", action="store_true",
                   help="accept non-integer counts (e.g. ambient-corrected); NaN and negatives are still refused")
    p.add_argument("--overwrite", action="store_true", help="replace the output store if it exists")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    from loaders.ingest import ingest

    report = ingest(
        args.input, args.out, input_format=args.input_format, protein_key=args.protein_key,
        rna_layer=args.rna_layer, batch_key=args.batch_key, allow_non_integer=args.allow_non_integer,
        overwrite=args.overwrite, progress=not args.no_progress,
    )
    print(report)
