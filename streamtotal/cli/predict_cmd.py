"""``streamtotal predict``: totalANVI label transfer onto a store (labels, probabilities, uncertainty, latent)."""

from __future__ import annotations

import argparse
import json

from streamtotal.cli.knn_args import add_knn_arguments, knn_config_from_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict",
        help="predict cell-type labels (totalANVI classifier, or kNN transfer for totalVI), written back by chunk",
        description="Streams STORE(s) through the model of RUN_DIR and writes, for every cell, the predicted "
        "label (obs PREFIX_label), its uncertainty (obs PREFIX_label_uncertainty = 1 - max probability, and "
        "PREFIX_label_entropy), the class probabilities (obsm PREFIX_label_probs, class names in its attrs) and "
        "the latent mean (obsm PREFIX_latent), atomically (temp elements renamed when complete). A totalVI run has "
        "no classifier: with --labels-key the labels are transferred by a weighted vote of the k nearest labelled "
        "reference cells (the reference a query run was mapped onto, or --reference-run, or RUN_DIR itself).",
    )
    p.add_argument("run_dir", help="training or query (map) run directory")
    p.add_argument("stores", nargs="+", metavar="STORE",
                   help="Zarr store(s) (aligned onto the model's genes and proteins by name); the stores a query "
                   "run was mapped over are given together, as to `map`, so their batches mean the same")
    p.add_argument("--prefix", default="streamtotal",
                   help="prefix of the obs columns and obsm keys (default streamtotal)")
    p.add_argument("--no-write-back", action="store_true", help="do not write into the store")
    p.add_argument("--export-h5ad", help="also write obs + predictions + probabilities + latent to this .h5ad file")
    p.add_argument("--batch-size", type=int, default=4096, help="cells per forward pass (default 4096)")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_knn_arguments(p)
    p.add_argument("--reference-run", help="kNN: the run whose stores hold the labelled reference cells (default: "
                   "the reference RUN_DIR was mapped onto, else RUN_DIR)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    from streamtotal.errors import ConfigError
    from streamtotal.inference.labels import predict_labels, predict_labels_many

    knn = knn_config_from_args(args, args.reference_run)
    options = dict(write_back=not args.no_write_back, prefix=args.prefix, batch_size=args.batch_size,
                   device=args.device, progress=not args.no_progress, knn=knn)
    if len(args.stores) > 1:
        if args.export_h5ad:
            raise ConfigError("--export-h5ad takes one STORE; predict the stores one export at a time")
        results = predict_labels_many(args.run_dir, args.stores, **options)
    else:
        results = [predict_labels(args.run_dir, args.stores[0], export_h5ad=args.export_h5ad, **options)]
    for store, result in zip(args.stores, results):
        print(json.dumps({"store": store, "n_cells": result.n_cells, "method": result.method,
                          "predicted_counts": result.counts, "written": result.written,
                          "exported": str(result.exported) if result.exported else None}))
