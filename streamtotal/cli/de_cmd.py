"""``streamtotal de``: Bayesian differential expression (RNA and proteins) between groups of an obs column."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from streamtotal.cli.output_path import check_output_path

TOP = 10  # hits printed per comparison


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "de",
        help="differential expression of genes and proteins between groups of cells (writes CSVs)",
        description="Compares groups of an obs column with the model of RUN_DIR (totalVI 'change' mode): "
        "--group1 A --group2 B compares A with B, --group1 A alone compares A with every other cell, and no "
        "--group1 compares every group with the rest. Up to --cells-per-group cells of each group are sampled "
        "and read (groups may be huge); each gets posterior draws of normalised RNA (rho) and denoised protein "
        "((1 - pi) beta alpha), paired across groups into log2 fold changes. Columns: proba_de = P(|LFC| > "
        "delta), bayes_factor = log odds of DE, is_de_fdr = called at the --fdr posterior expected FDR, LFC "
        "mean/median/std, and raw/normalised means and non-zero fractions per group. One CSV per comparison, "
        "sorted by Bayes factor.",
    )
    p.add_argument("run_dir", help="training run directory")
    p.add_argument("store", help="Zarr store (aligned onto the model's genes and proteins by name)")
    p.add_argument("--groupby", required=True, help="obs column defining the groups ('study' = each cell's study)")
    p.add_argument("--group1", help="value of the first group (default: every group, each vs the rest)")
    p.add_argument("--group2", help="value of the second group (default: the rest of the cells)")
    p.add_argument("--modality", choices=["rna", "protein", "both"], default="both", help="what to test (default both)")
    p.add_argument("--delta", type=float, default=0.25, help="|log2 fold change| counted as a change (default 0.25)")
    p.add_argument("--test-mode", choices=("three", "two"), default="three",
                   help="P(DE): 'three' = of the more likely direction (scvi-tools' default), 'two' = of either")
    p.add_argument("--fdr", type=float, default=0.05, help="target posterior expected FDR of the calls (default 0.05)")
    p.add_argument("--cells-per-group", type=int, default=1000, help="cells sampled per group (default 1000)")
    p.add_argument("--draws-per-cell", type=int, default=5, help="posterior draws per sampled cell (default 5)")
    p.add_argument("--stats-all-cells", action="store_true",
                   help="raw means and non-zero fractions over every cell of each group (one more pass)")
    p.add_argument("--seed", type=int, default=0, help="seed of sampling, draws and pairing (default 0)")
    p.add_argument("--batch-correction", action="store_true",
                   help="decode each group's samples under the batches of --batchid1 / --batchid2 (default every "
                   "batch of the model) and pool them, pairing samples within a batch (scvi-tools' "
                   "batch_correction); without it each cell is decoded in its own batch")
    p.add_argument("--batchid1", action="append", metavar="BATCH",
                   help="a batch group 1 is decoded under (repeat for several; needs --batch-correction)")
    p.add_argument("--batchid2", action="append", metavar="BATCH",
                   help="a batch group 2 is decoded under (repeat for several; needs --batch-correction)")
    p.add_argument("--out", help="a .csv file (one comparison) or a directory (default RUN_DIR/de)")
    p.add_argument("--batch-size", type=int, default=1024, help="cells per forward pass (default 1024)")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(run=run)


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text) or "_"


def run(args: argparse.Namespace) -> None:
    check_output_path(args.out, "--out", kind="file" if str(args.out).lower().endswith(".csv") else "dir")
    from loaders.atomic_files import write_file_atomically
    from streamtotal.errors import ConfigError
    from streamtotal.inference.differential import DEOptions, DifferentialExpression

    if args.group2 is not None and args.group1 is None:
        raise ConfigError("--group2 needs --group1 (group1 vs group2)")
    options = DEOptions(modality=args.modality, delta=args.delta, fdr_target=args.fdr, test_mode=args.test_mode,
                        cells_per_group=args.cells_per_group, draws_per_cell=args.draws_per_cell,
                        stats_all_cells=args.stats_all_cells, seed=args.seed,
                        batch_correction=args.batch_correction, batchid1=args.batchid1, batchid2=args.batchid2)
    de = DifferentialExpression(args.run_dir, args.store, batch_size=args.batch_size, device=args.device,
                                progress=not args.no_progress)
    if args.group1 is None:
        results = de.one_vs_rest(args.groupby, options)
    else:
        results = {args.group1: de.compare_groups(args.groupby, args.group1, args.group2, options)}
    out = Path(args.out) if args.out else Path(args.run_dir) / "de"
    single_file = out.suffix.lower() == ".csv"
    if single_file and len(results) > 1:
        raise ConfigError(f"--out {out} is one CSV file but there are {len(results)} comparisons; give a directory")
    for group, df in results.items():
        other = df["group2"].iloc[0] if len(df) else "rest"
        path = out if single_file else out / f"de_{_safe(args.groupby)}_{_safe(group)}_vs_{_safe(other)}.csv"
        write_file_atomically(path, df.to_csv)
        called = int(df["is_de_fdr"].sum())
        print(f"{args.groupby}: {group} vs {other} ({df.attrs['n_group1']} vs {df.attrs['n_group2']} cells): "
              f"{called} of {len(df)} features DE at FDR {args.fdr}; wrote {path}")
        top = df.head(TOP)[["modality", "lfc_mean", "proba_de", "bayes_factor", "is_de_fdr"]]
        print(top.to_string(float_format=lambda v: f"{v:.3f}"))
