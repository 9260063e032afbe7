"""``streamtotal evaluate``: scib metrics, UMAP, training curves and protein heat map into one report folder."""

from __future__ import annotations

import argparse

from streamtotal.cli.output_path import check_output_path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="evaluation report: scib metrics on a labelled sample, UMAP, training curves, protein heat map",
        description="Samples labelled cells of STORE (stratified by label), computes their latent with the model "
        "of RUN_DIR and scores it with scib-metrics (bio conservation and batch correction, aggregated as scib "
        "does), then writes a UMAP by label and batch, the training curves, the mean protein foreground "
        "probability per label and an index.html that opens them into one folder (written whole, then renamed). "
        "When the studies' panels differ, it also sets, per label, the imputed values of each protein in the "
        "cells whose panel lacks it beside the measured counts where a panel has it (with the imputation's "
        "spread over posterior draws).",
    )
    p.add_argument("run_dir", help="training run directory")
    p.add_argument("store", help="store to evaluate on (aligned onto the model's genes and proteins by name)")
    p.add_argument("--labels-key", required=True, help="obs column of the cell labels")
    p.add_argument("--batch-key", help="obs column of the batches to score mixing over (default: the model's)")
    p.add_argument("--out", help="report folder (default RUN_DIR/evaluation; a previous report is replaced)")
    p.add_argument("--cells", type=int, default=20000, help="labelled cells to sample (default 20000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sample and the UMAP (default 0)")
    p.add_argument("--unlabeled-category", default="unlabeled",
                   help="label value left out of the sample (default 'unlabeled')")
    p.add_argument("--metrics", help="comma-separated scib metric names (default: the scib-metrics Benchmarker's "
                   "defaults; kbet_per_label costs about a minute of compilation)")
    p.add_argument("--batch-size", type=int, default=1024, help="cells per forward pass (default 1024)")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    check_output_path(args.out, "--out", kind="file")
    from streamtotal.inference.evaluate import evaluate

    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()] if args.metrics else None
    report = evaluate(args.run_dir, args.store, labels_key=args.labels_key, batch_key=args.batch_key,
                      out_dir=args.out, n_cells=args.cells, seed=args.seed,
                      unlabeled_category=args.unlabeled_category, metrics=metrics, batch_size=args.batch_size,
                      device=args.device, progress=not args.no_progress)
    agg = report.metrics["scib"]["aggregate"]
    shown = ", ".join(f"{k} {'n/a' if v is None else f'{v:.3f}'}" for k, v in agg.items())
    print(f"evaluated {report.metrics['n_cells']} cells: {shown}; open {report.index_html}")
