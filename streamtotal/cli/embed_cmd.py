"""``streamtotal embed``: write the latent mean of every cell into the store (and optionally an h5ad)."""

from __future__ import annotations

import argparse

from streamtotal.cli.output_path import check_output_path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "embed",
        help="write the latent mean per cell into a store's obsm, chunk by chunk",
        description="Streams STORE through the model of RUN_DIR and writes the latent posterior mean of every "
        "cell into STORE's obsm[KEY] chunk by chunk (a temp array renamed when complete; an interrupted run "
        "continues with the chunks not written yet when the same command is rerun). --export-h5ad also writes "
        "an AnnData (obs + latent) for scanpy.",
    )
    p.add_argument("run_dir", help="training run directory")
    p.add_argument("store", help="Zarr store to embed (aligned onto the model's genes and proteins by name)")
    p.add_argument("--key", default="X_streamtotal", help="obsm key (default X_streamtotal)")
    p.add_argument("--no-write-back", action="store_true", help="do not write into the store")
    p.add_argument("--export-h5ad", help="also write obs + latent to this .h5ad file")
    p.add_argument("--batch-size", type=int, default=4096, help="cells per forward pass (default 4096)")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    check_output_path(args.export_h5ad, "--export-h5ad", kind="file")
    from streamtotal.inference.embed import embed

    result = embed(args.run_dir, args.store, key=None if args.no_write_back else args.key,
                   export_h5ad=args.export_h5ad, batch_size=args.batch_size, device=args.device,
                   progress=not args.no_progress)
    where = f"{args.store} obsm[{result.key!r}]" if result.key else "nowhere in the store"
    resumed = (f" (resumed: {result.chunks_skipped} of {result.chunks_skipped + result.chunks_computed} chunks were "
               "already written)") if result.chunks_skipped else ""
    print(f"embedded {result.n_cells} cells into {where}{resumed}"
          + (f"; exported {result.exported}" if result.exported else ""))
