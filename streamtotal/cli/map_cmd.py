"""``streamtotal map``: scArches reference mapping of query stores onto a trained totalVI / totalANVI run."""

from __future__ import annotations

import argparse
import json
import os

from streamtotal.cli.knn_args import add_knn_arguments, knn_config_from_args
from streamtotal.surgery.freeze import UNFROZEN_CHOICES
from streamtotal.cli.output_path import check_output_path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "map",
        help="map query stores onto a trained reference (scArches surgery), streamed and checkpointed",
        description="Aligns QUERY_STORE(s) onto REFERENCE_RUN's genes and proteins by name (missing genes "
        "zero-filled, refused below --min-gene-overlap; extra genes dropped; missing proteins masked, extra ones "
        "dropped; written to OUT/alignment.json), adds covariate weights for the query's new batches and trains "
        "only what --unfrozen names, everything else bit-identical to the reference (no gradient, no weight decay, "
        "frozen batch norms in eval mode). Training streams, checkpoints and resumes like `streamtotal train` "
        "(also under torchrun). OUT then works with `embed` and `predict`.",
    )
    p.add_argument("reference_run", help="trained reference run directory (totalVI or totalANVI)")
    p.add_argument("query_stores", nargs="+", help="query stores (Zarr, .h5ad, TileDB-SOMA, lamin://)")
    p.add_argument("--out", required=True, help="query run directory")
    p.add_argument("--epochs", type=int, help="query epochs (default: scvi-tools' rule from the query's size)")
    p.add_argument("--unfrozen", choices=UNFROZEN_CHOICES, default="covariates",
                   help="what trains: covariates (default, scArches: the new batches' weights only), "
                   "covariates+batchnorm, or all (fine-tune everything)")
    p.add_argument("--new-batch-init", choices=["random", "zeros", "mean"], default="random",
                   help="initial covariate weights of the new batches (default random, as scArches)")
    p.add_argument("--no-dropout", action="store_true", help="switch dropout off during query training")
    p.add_argument("--min-gene-overlap", type=float,
                   help="refuse a query study sharing less than this fraction of the reference genes")
    p.add_argument("--absent-genes", choices=["mask", "zero"],
                   help="reference genes a query lacks: mask (unmeasured: out of the RNA likelihood, estimated in "
                   "the encoder input) or zero (read as measured zeros, as scvi-tools); default: the reference's "
                   "[data] absent_genes (mask)")
    p.add_argument("--batch-key", help="obs column of the query's batch, defining the new batches (default: the "
                   "reference's; none there: every query store is one batch)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument("--predict", action="store_true",
                   help="afterwards write predicted labels, probabilities, uncertainty and latent into every query "
                   "store (as `streamtotal predict`): by the classifier of a totalANVI reference, or by kNN "
                   "transfer from the reference's labelled cells with --labels-key")
    p.add_argument("--prefix", default="streamtotal", help="prefix of the --predict results (default streamtotal)")
    add_knn_arguments(p)
    t = p.add_argument_group("training (default: the reference's settings)")
    t.add_argument("--batch-size", type=int)
    t.add_argument("--lr", type=float)
    t.add_argument("--weight-decay", type=float)
    t.add_argument("--seed", type=int)
    t.add_argument("--checkpoint-every", type=int)
    t.add_argument("--device", help="auto, cpu, cuda, cuda:N")
    t.add_argument("--threads", type=int)
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    check_output_path(args.out, "--out", kind="dir")
    from streamtotal.surgery.freeze import SurgeryConfig
    from streamtotal.surgery.map_query import map_query
    from streamtotal.cli.process_settings import tune_process_for_training

    tune_process_for_training(args.device)
    train = {"batch_size": args.batch_size, "lr": args.lr, "weight_decay": args.weight_decay, "seed": args.seed,
             "checkpoint_every_steps": args.checkpoint_every, "device": args.device, "threads": args.threads,
             "progress": False if args.no_progress else None}
    surgery = SurgeryConfig(unfrozen=args.unfrozen, new_batch_init=args.new_batch_init, dropout=not args.no_dropout)
    result = map_query(args.reference_run, args.query_stores, args.out, surgery=surgery, epochs=args.epochs,
                       batch_key=args.batch_key, min_gene_overlap=args.min_gene_overlap, resume=args.resume,
                       train={k: v for k, v in train.items() if v is not None}, predict=args.predict,
                       prefix=args.prefix, progress=not args.no_progress, knn=knn_config_from_args(args),
                       absent_genes=args.absent_genes)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({"run_dir": str(args.out), "new_batches": result.report["new_batches"],
                          "steps": result.summary.steps, "epochs": result.summary.epochs,
                          "validation_neg_elbo": result.summary.validation.get("neg_elbo"),
                          "predicted": [{"store": str(store), "n_cells": r.n_cells, "method": r.method,
                                         "counts": r.counts, "written": r.written}
                                        for store, r in zip(args.query_stores, result.predictions)]}))
