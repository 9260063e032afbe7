"""``streamtotal export-scvi``: a trained run as a model directory that scvi-tools' ``TOTALVI.load`` opens."""

from __future__ import annotations

import argparse

from streamtotal.cli.output_path import check_output_path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export-scvi",
        help="export a trained run as a scvi-tools TOTALVI model directory",
        description="Writes OUT_DIR/model.pt as scvi-tools' TOTALVI.save(OUT_DIR) would, from the final model (or "
        "newest checkpoint) of RUN_DIR, so that scvi.model.TOTALVI.load(OUT_DIR, adata=adata) opens it on an "
        "AnnData with the same genes (var_names), the proteins in obsm[protein_key] and the batch in "
        "obs[batch_key], and gives streamtotal's latent means on the same cells. Options scvi-tools cannot "
        "compute are refused by name: totalANVI's label classifier, the softplus protein foreground (streamtotal's "
        "default; train with foreground_activation = \"relu\", or pass --approximate-foreground), the encoder's "
        "protein mean over measured proteins when a study lacks some. A new OUT_DIR is written under a temporary "
        "name and renamed when complete; an existing one is refused unless --overwrite, which replaces its "
        "model.pt and keeps its other files (as scvi-tools' save).",
    )
    p.add_argument("run_dir", help="a run directory written by `streamtotal train` (or `import-scvi`, `map`)")
    p.add_argument("out_dir", help="the scvi-tools model directory to write")
    p.add_argument("--overwrite", action="store_true", help="replace OUT_DIR/model.pt of an existing OUT_DIR")
    p.add_argument("--batch-key",
                   help="adata.obs column scvi-tools reads the batch from (default: the run's batch key; required "
                   "for a run of several stores without one: the column then holds the store names)")
    p.add_argument("--approximate-foreground", action="store_true",
                   help="export a softplus-foreground model anyway: scvi-tools uses 1 + relu(u) for the foreground "
                   "multiplier (differs by at most log 2); latent, RNA, background and mixing are unchanged")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    check_output_path(args.out_dir, "OUT_DIR", kind="dir")
    from streamtotal.interop.scvi_export import export_scvi_model
    from streamtotal.training.run_dir import load_trained

    trained = load_trained(args.run_dir)
    result = export_scvi_model(trained, args.out_dir, overwrite=args.overwrite, batch_key=args.batch_key,
                               approximate_foreground=args.approximate_foreground)
    registry = trained.registry
    print(f"exported {args.run_dir} as a scvi-tools TOTALVI model in {result.model_dir}: {registry.n_genes} genes, "
          f"{registry.n_proteins} proteins in obsm[{result.protein_key!r}], {registry.n_batch} batches"
          + (f" in obs[{result.batch_key!r}]" if result.batch_key else "")
          + "; open it with scvi.model.TOTALVI.load(DIR, adata=adata)")
