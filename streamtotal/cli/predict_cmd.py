"""``streamtotal predict``: totalANVI label transfer onto a store (labels, probabilities, uncertainty, latent)."""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict",
        help="predict cell-type labels with a totalANVI run, written back into the store chunk by chunk",
        description="Streams STORE through the totalANVI model of RUN_DIR and writes, for every cell, the predicted "
        "label (obs PREFIX_label), its uncertainty (obs PREFIX_label_uncertainty = 1 - max probability, and "
        "PREFIX_label_entropy), the class probabilities (obsm PREFIX_label_probs, class names in its attrs) and "
        "the latent mean (obsm PREFIX_latent), atomically (temp elements renamed when complete). A totalVI run "
        "without a classifier is refused: train with --totalanvi --labels-key KEY [--from RUN_DIR].",
    )
    p.add_argument("run_dir", help="totalANVI training run directory")
    p.add_argument("store", help="Zarr store (aligned onto the model's genes and proteins by name)")
    p.add_argument("--prefix", default="streamtotal",
                   help="prefix of the obs columns and obsm keys (default streamtotal)")
    p.add_argument("--no-write-back", action="store_true", help="do not write into the store")
    p.add_argument("--export-h5ad", help="also write obs + predictions + probabilities + latent to this .h5ad file")
    p.add_argument("--batch-size", type=int, default=4096, help="cells per forward pass (default 4096)")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    from streamtotal.inference.labels import predict_labels

    result = predict_labels(args.run_dir, args.store, write_back=not args.no_write_back, prefix=args.prefix,
                            export_h5ad=args.export_h5ad, batch_size=args.batch_size, device=args.device,
                            progress=not args.no_progress)
    print(json.dumps({"n_cells": result.n_cells, "predicted_counts": result.counts,
                      "written": result.written, "exported": str(result.exported) if result.exported else None}))
