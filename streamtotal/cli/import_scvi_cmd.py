"""``streamtotal import-scvi``: a saved scvi-tools TOTALVI / TOTALANVI model as a streamtotal run directory."""

from __future__ import annotations

import argparse

from streamtotal.cli.output_path import check_output_path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "import-scvi",
        help="import a saved scvi-tools TOTALVI or TOTALANVI model directory as a run directory",
        description="Reads SCVI_MODEL_DIR (what scvi-tools' model.save(DIR) wrote: DIR/model.pt) and writes RUN_DIR "
        "as `streamtotal train` would (config.toml, registry.json, model.pt), so `embed`, `denoise`, `predict`, "
        "`de`, `evaluate` and `map` work on it. The imported model computes scvi-tools' function (same latent "
        "means and label predictions on the same cells); scvi-tools' per-batch protein efficiency is folded into "
        "the protein background. Options streamtotal cannot reproduce (latent_distribution 'ln', zinb, extra "
        "covariates, gene-label or gene-cell dispersion, a panel key, size factors) are refused by name. "
        "RUN_DIR is written under a temporary name and renamed when complete.",
    )
    p.add_argument("scvi_model_dir", help="directory written by scvi-tools' TOTALVI/TOTALANVI .save(DIR)")
    p.add_argument("--out", required=True, help="run directory to create")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out (only once the new one is complete)")
    p.add_argument("--batch-name",
                   help="model set up without batch_key only: the name of the store it will read (file name "
                   "without .zarr/.h5ad), which streamtotal uses as that store's batch")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    check_output_path(args.out, "--out", kind="file")
    from streamtotal.interop.scvi_import import import_scvi_model

    result = import_scvi_model(args.scvi_model_dir, args.out, overwrite=args.overwrite, batch_name=args.batch_name)
    registry = result.registry
    print(f"imported scvi-tools {result.model_name} (saved by scvi-tools {result.scvi_version}) into {result.run_dir}: "
          f"{registry.n_genes} genes, {registry.n_proteins} proteins, {registry.n_batch} batches"
          + (f", {registry.n_labels} labels" if registry.n_labels else ""))
