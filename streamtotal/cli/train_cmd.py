"""``streamtotal train``: train totalVI streaming from one or more stores (single process or under torchrun)."""

from __future__ import annotations

import argparse
import json

from loaders.object_store import as_path, is_url
from streamtotal.config import RunConfig
from streamtotal.cli.output_path import check_output_path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train totalVI streaming from stores",
        description="Trains totalVI on STORE(s), streaming minibatches. Settings come from the defaults, then "
        "--config FILE.toml ([data], [model], [train] tables; see the README's config reference), then flags. "
        "The resolved config is written to RUN_DIR/config.toml. Under torchrun every rank runs this command.",
    )
    p.add_argument("stores", nargs="*",
                   help="Zarr stores, .h5ad files or lamin://INSTANCE/COLLECTION_KEY (several = several studies)")
    p.add_argument("--out", required=True, help="run directory (checkpoints, metrics, final model)")
    p.add_argument("--config", help="TOML run config")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest checkpoint in --out (starts fresh if there is none)")
    g = p.add_argument_group("data")
    g.add_argument("--batch-key", help="obs column of the batch covariate (default: one batch per study)")
    g.add_argument("--labels-key", help="obs column of cell-type labels")
    g.add_argument("--protein-key", help="obsm key of protein counts (default protein_expression)")
    g.add_argument("--gene-join", choices=["inner", "outer"], help="combine genes of several studies")
    g.add_argument("--absent-genes", choices=["mask", "zero"],
                   help="genes a study lacks in an outer join: mask (unmeasured, default) or zero (measured zeros)")
    m = p.add_argument_group("model")
    m.add_argument("--n-latent", type=int, help="latent dimensions (default 20)")
    m.add_argument("--n-hidden", type=int, help="hidden units per layer (default 256)")
    m.add_argument("--latent-library", action="store_true", default=None,
                   help="model the library size as latent (default: observed)")
    m.add_argument("--no-empirical-prior", dest="empirical_prior", action="store_false", default=None,
                   help="fixed protein background prior instead of the empirical per-batch one")
    m.add_argument("--adversarial", action="store_true", default=None, help="add an adversarial batch classifier")
    m.add_argument("--totalanvi", action="store_true", default=None,
                   help="totalANVI: train a cell-type classifier on z jointly (needs --labels-key)")
    m.add_argument("--label-prior", choices=("none", "m2"),
                   help="totalANVI: prior of z; m2 = scANVI's label-conditional prior (scvi-tools' TOTALANVI); "
                   "default none")
    m.add_argument("--classification-ratio", type=float,
                   help="totalANVI: weight of the classification loss (default 50, as scvi-tools)")
    p.add_argument("--from", dest="init_from", metavar="RUN_DIR",
                   help="start from the weights of a trained run (same genes, proteins, batches); without "
                   "--config its [data] and [model] settings are the starting point, e.g. "
                   "--from TOTALVI_RUN --totalanvi --labels-key cell_type")
    t = p.add_argument_group("training")
    t.add_argument("--epochs", type=int, help="epochs (default: scvi-tools' rule from the number of cells)")
    t.add_argument("--batch-size", type=int, help="cells per minibatch (default 256 for totalVI, 128 for totalANVI)")
    t.add_argument("--lr", type=float, help="learning rate (default 4e-3 for totalVI, 1e-3 for totalANVI)")
    t.add_argument("--seed", type=int, help="seed of init, data order and validation split (default 0)")
    t.add_argument("--validation-fraction", type=float, help="held-out fraction (default 0.1)")
    t.add_argument("--num-workers", type=int, help="DataLoader worker processes (default 0: a reader thread)")
    t.add_argument("--checkpoint-every", type=int, help="checkpoint every N steps (default 500)")
    t.add_argument("--device", help="auto (default), cpu, cuda, cuda:N")
    t.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    t.add_argument("--precision", choices=["auto", "fp32", "bf16"],
                   help="bf16 autocast of the linear layers, or fp32 (default auto: bf16 on a capable GPU)")
    t.add_argument("--compile", action="store_true", default=None, help="torch.compile the model before training")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=run)


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """Defaults (or, with --from and no --config, the --from run's [data] and [model]), then --config, then flags."""
    if args.config:
        config = RunConfig.from_toml(args.config)
    elif getattr(args, "init_from", None):
        from streamtotal.errors import RunDirError

        toml = as_path(args.init_from) / "config.toml"
        if not toml.is_file():
            raise RunDirError(f"--from {args.init_from}: no config.toml there; is it a training run directory?")
        source = RunConfig.from_toml(toml)
        config = RunConfig(data=source.data, model=source.model)
    else:
        config = RunConfig()
    overrides = {
        "data": {"stores": list(args.stores) or None, "batch_key": args.batch_key, "labels_key": args.labels_key,
                 "protein_key": args.protein_key, "gene_join": args.gene_join, "absent_genes": args.absent_genes},
        "model": {"n_latent": args.n_latent, "n_hidden": args.n_hidden, "latent_library": args.latent_library,
                  "empirical_protein_background_prior": args.empirical_prior,
                  "adversarial_classifier": args.adversarial, "label_classifier": args.totalanvi,
                  "classification_ratio": args.classification_ratio, "label_prior": args.label_prior},
        "train": {"max_epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed,
                  "validation_fraction": args.validation_fraction, "num_workers": args.num_workers,
                  "checkpoint_every_steps": args.checkpoint_every, "device": args.device, "threads": args.threads,
                  "precision": args.precision, "compile": args.compile,
                  "progress": False if args.no_progress else None, "init_from": _absolute(args.init_from)},
    }
    return config.with_overrides(overrides)


def _absolute(path: str | None) -> str | None:
    from pathlib import Path

    return (path if is_url(path) else str(Path(path).resolve())) if path else None


def run(args: argparse.Namespace) -> None:
    check_output_path(args.out, "--out", kind="dir", object_storage=True)
    from streamtotal.cli.process_settings import tune_process_for_training
    from streamtotal.training.trainer import Trainer

    config = config_from_args(args)
    tune_process_for_training(config.train.device)
    trainer = Trainer(config, args.out, resume=args.resume)
    summary = trainer.fit()
    if trainer.dist.is_main:
        print(json.dumps({"run_dir": str(args.out), "steps": summary.steps, "epochs": summary.epochs,
                          "cells_per_s": round(summary.cells_per_second, 1),
                          "validation_neg_elbo": summary.validation.get("neg_elbo"),
                          **({"validation_label_accuracy": summary.validation["label_accuracy"]}
                             if "label_accuracy" in summary.validation else {}),
                          "stopped_early": summary.stopped_early}))
    trainer.dist.close()
