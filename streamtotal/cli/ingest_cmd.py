"""``streamtotal ingest``: convert h5ad / h5mu / 10x h5 into a Zarr store laid out for streaming."""

from __future__ import annotations

import argparse

from streamtotal.cli.output_path import check_output_path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "ingest",
        help="convert an h5ad, h5mu or 10x feature-barcode .h5 into a streaming Zarr store or TileDB-SOMA Experiment",
        description="Converts INPUT block by block (out of core) into a store laid out for streaming — a Zarr store "
        "(default) or a TileDB-SOMA Experiment with an RNA and a protein measurement (--format soma, which can "
        "also --append a further study to an existing Experiment) — validating counts on the way (finite, "
        "non-negative, integer unless --allow-non-integer), and reports what it found. A new store is written "
        "to a temporary name and renamed when complete.",
    )
    p.add_argument("input", help="input file: .h5ad, .h5mu or 10x .h5")
    p.add_argument("--out", required=True, help="output store: a Zarr directory, or a SOMA Experiment URI")
    p.add_argument("--format", dest="store_format", default="zarr", choices=["zarr", "soma"],
                   help="output store format (default zarr)")
    p.add_argument("--input-format", default="auto", choices=["auto", "h5ad", "h5mu", "10x"],
                   help="input format (default: from the file)")
    p.add_argument("--append", action="store_true",
                   help="soma: append INPUT as a further study to the existing Experiment at --out")
    p.add_argument("--study-name", help="soma: the study's name (default: the input file's name)")
    p.add_argument("--protein-key", default="protein_expression",
                   help="h5ad: obsm key of the protein counts (default protein_expression)")
    p.add_argument("--rna-layer", default=None, help="h5ad: take RNA counts from this layer instead of X")
    p.add_argument("--batch-key", default=None,
                   help="obs column of batches; proteins all-zero within a batch are recorded as not measured there")
    p.add_argument("--allow-non-integer", action="store_true",
                   help="accept non-integer counts (e.g. ambient-corrected); NaN and negatives are still refused")
    p.add_argument("--chunk-cells", type=int, default=None,
                   help="zarr: cells per stored chunk (default 64 on local disk, 2048 when --out is on object "
                   "storage, where each chunk is one request; a store for S3 written locally and uploaded should "
                   "use 2048 too)")
    p.add_argument("--overwrite", action="store_true", help="replace the output store if it exists")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    check_output_path(args.out, "--out", kind="dir" if args.append else "file", object_storage=True)
    from streamtotal.errors import ConfigError

    common = dict(input_format=args.input_format, protein_key=args.protein_key, rna_layer=args.rna_layer,
                  batch_key=args.batch_key, allow_non_integer=args.allow_non_integer, overwrite=args.overwrite,
                  progress=not args.no_progress)
    if args.store_format == "soma":
        if args.chunk_cells is not None:
            raise ConfigError("--chunk-cells applies to --format zarr only; TileDB-SOMA chooses its own tiling")
        from loaders.ingest.soma_ingest import ingest_soma

        report = ingest_soma(args.input, args.out, append=args.append, study_name=args.study_name, **common)
    else:
        if args.append or args.study_name:
            raise ConfigError("--append and --study-name apply to --format soma only; a Zarr store holds one study "
                              "(train on several stores to combine studies)")
        from loaders.ingest import ingest
        from loaders.store_layout import StoreLayoutConfig

        if args.chunk_cells is not None and args.chunk_cells < 1:
            raise ConfigError(f"--chunk-cells must be >= 1; got {args.chunk_cells}")
        layout = StoreLayoutConfig.for_destination(args.out, args.chunk_cells)
        report = ingest(args.input, args.out, layout=layout, **common)
    print(report)
