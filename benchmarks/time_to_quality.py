"""Time to quality: how long streamtotal takes to reach the model scvi-tools TOTALVI ends its default training with.

What a user waits for is a good model, not cells/s. For each data set:

- scvi-tools TOTALVI trains with its defaults (its epoch rule min(400, 400 * 20,000 / n_obs), its early stopping
  and learning-rate schedule, batch 256, lr 4e-3). Its wall time runs from the start of its process (Python
  start-up, imports, reading the h5ad, ``setup_anndata``, model construction) to the end of ``train``. Then, outside
  the timed part, its final validation -ELBO on the held-out cells and its scib bio-conservation score.
- streamtotal trains with its defaults (its own epoch rule, early stopping, schedule) on the same training cells,
  from the start of its process (start-up, imports, ingesting the h5ad into a Zarr store, setup, priors).
  After every epoch's validation the script notes the wall time and the validation -ELBO; the first epoch whose
  value is <= scvi-tools' final value is the target, its wall time streamtotal's time, and the model weights then
  are kept (in memory) for its bio-conservation score. Training then goes on to its own end, for the full-run
  figures. Never reached: ``time_to_target_seconds`` is null and its best value is reported. (``metrics.jsonl``
  logs each epoch's validation terms with its step and epoch but no time, so a small Trainer subclass in this
  script, ``EpochClock``, notes the time as each epoch's validation ends; it changes nothing in the training.)

``wall_time_ratio`` = streamtotal's time to target / scvi-tools' wall time (setup included for both).
``goal_met``: ratio <= 0.2 and bio conservation at the target no lower than scvi-tools'.

Held-out cells: one seeded split, ``loaders.plan.split_validation(n_obs, 0.1, seed)`` (runs of
``validation_block(n_obs)`` cells), which is exactly how streamtotal's Trainer picks its validation cells for
``validation_fraction = 0.1`` and ``seed``; scvi-tools gets the same train/validation cells through
``TOTALVI.train(external_indexing=[train, validation, []])``, so its early stopping watches the same cells. The
script checks that streamtotal's validation cells are these.

The -ELBO is the same quantity for both: the mean over the held-out cells of the per-cell negative ELBO at KL
weight 1, a one-sample estimate, model in eval mode (dropout off, batch-norm running statistics):
  RNA NB reconstruction NLL + protein NB-mixture reconstruction NLL (masked to measured proteins)
  + KL(q(z)||N(0, I)) + KL(q(log beta)||prior of the protein background) + KL(library) (0: both observe it).
scvi-tools: ``-model.get_elbo(indices=validation)`` = reconst_loss_gene + reconst_loss_protein + kl_div_z +
kl_div_l_gene + kl_div_back_pro (``compute_elbo`` sums ``reconstruction_loss`` and ``kl_local`` unweighted; its
training-only background-preference penalty and KL warm-up weights are not in it). The script recomputes it term
by term with the same seed and checks the sum. streamtotal: ``evaluate_elbo`` (what the Trainer logs as
``val_neg_elbo`` after every epoch) = rna_nll + protein_nll + kl_z + kl_background + kl_library; the script checks
that the terms sum to it. The JSON's ``elbo_definition`` and each run's ``elbo_terms`` carry this.

Bio conservation: scib-metrics' bio set (isolated labels, k-means NMI and ARI, silhouette label, cLISI; their
mean) via ``streamtotal.inference.integration_metrics``, on the posterior-mean latent of the labelled cells
(``cell_type`` other than "unlabeled"), at most ``--score-cells`` of them (a seeded subset, the same for every
model).

Data sets: ``pbmc10k`` (../shared/data/pbmc10k_cite.h5ad, one batch) and ``simulated_100k``
(``streamtotal.simulate.CiteSimulator``: ``--sim-cells`` cells x 2,000 genes x 50 proteins, 2 batches, 8 cell
types, every cell labelled). Each method runs in its own process, one after the other. Prints one JSON object on
stdout; progress on stderr.

    python benchmarks/time_to_quality.py [--datasets pbmc10k,simulated_100k] [--sim-cells 100000] [--seed 0]
                                         [--workdir DIR] [--device cpu]

Smoke run (a few hundred cells, 3 epochs each; about a minute or two):

    python benchmarks/time_to_quality.py --quick

Exploring other settings (how the defaults were chosen): ``--train-option KEY=VALUE`` sets a [train] key for
streamtotal (repeatable), ``--stop-at-target`` ends its run at the target epoch, and ``--scvi-result REPORT``
reuses scvi-tools' entry from an earlier report of the same data, seed and scvi-tools version (refused otherwise)
instead of training it again; the report records all three. For example:

    python benchmarks/time_to_quality.py --datasets pbmc10k --scvi-result earlier.json --stop-at-target \
        --train-option kl_warmup_fraction=0.5
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from _common import child_result, peak_rss_mib

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "pbmc10k_cite.h5ad"
DATASETS = ("pbmc10k", "simulated_100k")
VALIDATION_FRACTION = 0.1
QUICK_CELLS = 600
QUICK_EPOCHS = 3
GOAL_RATIO = 0.2
STREAMTOTAL_ELBO_TERMS = ("rna_nll", "protein_nll", "kl_z", "kl_background", "kl_library")

ELBO_DEFINITION = {
    "quantity": "mean over the held-out cells of the per-cell negative ELBO at KL weight 1 (one-sample estimate, "
                "eval mode)",
    "terms": ["RNA NB reconstruction NLL", "protein NB-mixture reconstruction NLL (measured proteins)",
              "KL(z)", "KL(protein background)", "KL(library) (0 when the library is observed, both defaults)"],
    "scvi_tools": "-TOTALVI.get_elbo(indices=validation) = reconst_loss_gene + reconst_loss_protein + kl_div_z + "
                  "kl_div_l_gene + kl_div_back_pro",
    "streamtotal": "streamtotal.training.validation.evaluate_elbo neg_elbo = rna_nll + protein_nll + kl_z + "
                   "kl_background + kl_library",
}


# ---------------------------------------------------------------------------------------------- data preparation

def prepare(name: str, args: argparse.Namespace, work: Path) -> dict:
    """Writes a data set's inputs under ``work`` (h5ad, held-out and scored cell ids); returns its description."""
    import anndata as ad

    from loaders.plan import split_validation, validation_block

    work.mkdir(parents=True, exist_ok=True)
    if name == "pbmc10k":
        batch_key = None
        h5ad = Path(args.data)
        if args.quick:  # a seeded subset of cells, written next to the other inputs
            adata = ad.read_h5ad(h5ad)
            keep = np.sort(np.random.default_rng(args.seed).permutation(adata.n_obs)[:QUICK_CELLS])
            h5ad = work / "data.h5ad"
            adata[keep].copy().write_h5ad(h5ad)
    else:
        from streamtotal.simulate import CiteSimulator, SimulationConfig

        batch_key = "batch"
        cells, genes, proteins = (QUICK_CELLS, 200, 20) if args.quick else (args.sim_cells, 2000, 50)
        sim = CiteSimulator(SimulationConfig(n_cells=cells, n_genes=genes, n_proteins=proteins, n_batches=2,
                                             n_cell_types=8, n_missing_proteins=0, unlabeled_fraction=0.0,
                                             seed=args.seed))
        h5ad = work / "data.h5ad"
        sim.to_anndata().write_h5ad(h5ad)
    backed = ad.read_h5ad(h5ad, backed="r")
    obs, n_obs, n_vars = backed.obs, backed.n_obs, backed.n_vars
    # The split streamtotal's Trainer makes for validation_fraction and seed (checked in its process).
    train_ids, val_ids = split_validation(n_obs, VALIDATION_FRACTION, args.seed, block=validation_block(n_obs))
    labelled = np.flatnonzero(obs["cell_type"].astype(str).to_numpy() != "unlabeled")
    rng = np.random.default_rng(args.seed)
    score_ids = np.sort(rng.choice(labelled, size=min(args.score_cells, len(labelled)), replace=False))
    for key, ids in (("train_ids", train_ids), ("val_ids", val_ids), ("score_ids", score_ids)):
        np.save(work / f"{key}.npy", ids)
    meta = {"name": name, "h5ad": str(h5ad), "batch_key": batch_key, "cells": int(n_obs),
            "genes": int(n_vars), "training_cells": int(len(train_ids)),
            "validation_cells": int(len(val_ids)), "scored_cells": int(len(score_ids))}
    (work / "meta.json").write_text(json.dumps(meta))
    return meta


def bio_conservation(latent: np.ndarray, labels: np.ndarray) -> dict:
    """scib-metrics' bio-conservation metrics of ``latent`` and their mean (``aggregate``)."""
    from streamtotal.inference.integration_metrics import BIO_METRICS, integration_metrics

    scores = integration_metrics(np.ascontiguousarray(latent, dtype=np.float32), labels, metrics=BIO_METRICS)
    return {"score": scores["aggregate"]["bio_conservation"], "metrics": scores["bio_conservation"]}


def _labels(meta: dict, ids: np.ndarray) -> np.ndarray:
    import anndata as ad

    return ad.read_h5ad(meta["h5ad"], backed="r").obs["cell_type"].astype(str).to_numpy()[ids]


# ---------------------------------------------------------------------------------------------- the two methods

def run_scvi(args: argparse.Namespace, work: Path) -> dict:
    """scvi-tools TOTALVI with its default training; timed from this process's start to the end of ``train``."""
    import anndata as ad
    import scvi
    import torch
    from scvi.model._utils import get_max_epochs_heuristic

    meta = json.loads((work / "meta.json").read_text())
    train_ids, val_ids = np.load(work / "train_ids.npy"), np.load(work / "val_ids.npy")
    scvi.settings.seed = args.seed
    scvi.settings.dl_num_workers = 0
    adata = ad.read_h5ad(meta["h5ad"])
    scvi.model.TOTALVI.setup_anndata(adata, protein_expression_obsm_key="protein_expression",
                                     batch_key=meta["batch_key"])
    model = scvi.model.TOTALVI(adata)
    setup = time.time() - args.t0
    # None = its own rule; the cap only shortens smoke runs.
    max_epochs = None if args.max_epochs_cap is None else min(get_max_epochs_heuristic(adata.n_obs),
                                                              args.max_epochs_cap)
    model.train(max_epochs=max_epochs, accelerator="gpu" if args.device.startswith("cuda") else "cpu", devices=1,
                external_indexing=[train_ids, val_ids, np.array([], dtype=np.int64)], enable_progress_bar=False)
    wall = time.time() - args.t0
    epochs = len(model.history["elbo_train"])
    terms = _scvi_elbo_terms(model, adata, val_ids, args.seed)
    torch.manual_seed(args.seed)  # the same latent draws as the term-by-term pass
    neg_elbo = -float(model.get_elbo(adata=adata, indices=val_ids, batch_size=1024))
    score_ids = np.load(work / "score_ids.npy")
    bio = bio_conservation(model.get_latent_representation(adata, indices=score_ids), _labels(meta, score_ids))
    return {"wall_seconds": wall, "setup_seconds": setup, "epochs": epochs,
            "epoch_rule": get_max_epochs_heuristic(adata.n_obs), "max_epochs": max_epochs,
            "val_neg_elbo": neg_elbo, "elbo_terms": terms,
            "elbo_terms_sum_matches": bool(abs(sum(terms.values()) - neg_elbo) <= 1e-4 * abs(neg_elbo)),
            "bio_conservation": bio["score"], "scib_bio_metrics": bio["metrics"],
            "peak_rss_mib": peak_rss_mib(), "version": scvi.__version__}


def _scvi_elbo_terms(model, adata, ids: np.ndarray, seed: int) -> dict:
    """Mean per cell of each term scvi-tools' ``compute_elbo`` sums, in the same pass order and seed as
    ``get_elbo`` (so the sum equals it exactly)."""
    import inspect

    import torch

    module = model.module
    kwargs = ({"full_forward_pass": True}
              if "full_forward_pass" in inspect.signature(module._get_inference_input).parameters else {})
    sums: dict[str, float] = {}
    n = 0
    torch.manual_seed(seed)
    with torch.inference_mode():
        for tensors in model._make_data_loader(adata=adata, indices=ids, batch_size=1024):
            _, _, losses = module(tensors, get_inference_input_kwargs=kwargs)
            for key, value in {**losses.reconstruction_loss, **losses.kl_local}.items():
                sums[key] = sums.get(key, 0.0) + float(value.double().sum())
            n += int(next(iter(losses.reconstruction_loss.values())).shape[0])
    return {key: value / max(n, 1) for key, value in sums.items()}


def train_options(pairs: list[str]) -> dict:
    """``--train-option KEY=VALUE`` pairs as TrainConfig keyword arguments (values parsed as JSON, else kept as
    text): to explore settings other than the defaults; the report records them."""
    from dataclasses import fields

    from streamtotal.config import TrainConfig

    known = {f.name for f in fields(TrainConfig)}
    options = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or key not in known:
            raise SystemExit(f"--train-option {pair!r}: expected KEY=VALUE with KEY a [train] setting "
                             f"({', '.join(sorted(known))})")
        try:
            options[key] = json.loads(text)
        except json.JSONDecodeError:
            options[key] = text
    return options


def run_streamtotal(args: argparse.Namespace, work: Path) -> dict:
    """streamtotal with its default training; the wall time and validation -ELBO after every epoch, from this
    process's start (ingest included); the weights at the first epoch that reaches ``args.target``."""
    import copy

    from loaders.ingest import ingest
    from streamtotal.cli.process_settings import tune_process_for_training
    from streamtotal.config import DataConfig, RunConfig, TrainConfig
    from streamtotal.inference.expression import StorePosterior
    from streamtotal.training.run_dir import TrainedModel
    from streamtotal.training.trainer import Trainer

    class EpochClock(Trainer):
        """A Trainer that notes the wall time and validation -ELBO after each epoch's validation and keeps a
        copy of the weights at the first epoch whose -ELBO reaches the target. It only reads; training is the
        default one."""

        def __init__(self, *a, **kw) -> None:
            self.log: list[dict] = []
            self.snapshot: dict | None = None
            super().__init__(*a, **kw)

        def _end_epoch(self) -> None:
            super()._end_epoch()
            value = self.last_validation.get("neg_elbo")
            self.log.append({"epoch": self.epoch, "seconds": time.time() - args.t0, "val_neg_elbo": value})
            if self.snapshot is None and value is not None and value <= args.target:
                self.snapshot = {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}
                if args.stop_at_target:  # exploring settings: the rest of the run is not needed
                    self.stopped_early = True

    meta = json.loads((work / "meta.json").read_text())
    tune_process_for_training(args.device)  # what `streamtotal train` does on CPU
    store, run_dir = work / "streamtotal.zarr", work / "streamtotal_run"
    shutil.rmtree(run_dir, ignore_errors=True)  # a kept --workdir holds the previous run
    ingest(meta["h5ad"], store, batch_key=meta["batch_key"], progress=False, overwrite=True)
    ingested = time.time() - args.t0
    # None = its own rule; the cap only shortens smoke runs: min(its rule, cap).
    max_epochs = (None if args.max_epochs_cap is None
                  else min(TrainConfig().epochs_for(meta["training_cells"]), args.max_epochs_cap))
    train = TrainConfig(max_epochs=max_epochs, validation_fraction=VALIDATION_FRACTION, seed=args.seed,
                        progress=False, device=args.device, **train_options(args.train_option))
    config = RunConfig(data=DataConfig(stores=(str(store),), batch_key=meta["batch_key"]), train=train)
    trainer = EpochClock(config, run_dir)
    setup = time.time() - args.t0
    if not np.array_equal(trainer.val_ids, np.load(work / "val_ids.npy")):
        raise SystemExit("streamtotal's validation cells differ from the held-out cells scvi-tools was given")
    summary = trainer.fit()
    wall = time.time() - args.t0
    terms = dict(trainer.last_validation)
    parts = {k: terms[k] for k in STREAMTOTAL_ELBO_TERMS}
    score_ids = np.load(work / "score_ids.npy")
    labels = _labels(meta, score_ids)

    def bio_of(model) -> dict:
        trained = TrainedModel(model=model, config=trainer.config, registry=trainer.registry, source=run_dir)
        return bio_conservation(StorePosterior(trained, store, device=args.device, progress=False).latent(score_ids),
                                labels)

    final_bio = bio_of(trainer.model)  # training is over: the posterior may take the model over
    reached = next((row for row in trainer.log if row["val_neg_elbo"] is not None
                    and row["val_neg_elbo"] <= args.target), None)
    at_target = None
    if reached is not None:
        model = copy.deepcopy(trainer.model)
        model.load_state_dict(trainer.snapshot)
        at_target = bio_of(model)
    values = [row["val_neg_elbo"] for row in trainer.log if row["val_neg_elbo"] is not None]
    return {
        "target_val_neg_elbo": args.target,
        "time_to_target_seconds": reached["seconds"] if reached else None,
        "epoch_reached": reached["epoch"] if reached else None,
        "val_neg_elbo_at_target": reached["val_neg_elbo"] if reached else None,
        "bio_conservation_at_target": at_target["score"] if at_target else None,
        "scib_bio_metrics_at_target": at_target["metrics"] if at_target else None,
        "best_val_neg_elbo": min(values) if values else None,
        "full_run": {"wall_seconds": wall, "ingest_done_seconds": ingested, "setup_seconds": setup,
                     "epochs": summary.epochs, "epoch_rule": TrainConfig().epochs_for(len(trainer.train_ids)),
                     "planned_epochs": trainer.epochs,
                     "stopped_early": summary.stopped_early, "val_neg_elbo": terms.get("neg_elbo"),
                     "elbo_terms": parts,
                     "elbo_terms_sum_matches": bool(abs(sum(parts.values()) - terms["neg_elbo"])
                                                    <= 1e-4 * abs(terms["neg_elbo"])),
                     "bio_conservation": final_bio["score"], "scib_bio_metrics": final_bio["metrics"],
                     "precision": trainer.precision, "peak_rss_mib": peak_rss_mib()},
        "epochs_log": trainer.log,
    }


# ---------------------------------------------------------------------------------------------- orchestration

def _spawn(args: argparse.Namespace, work: Path, only: str, target: float | None = None) -> dict:
    """Runs one method in its own process; its clock starts just before the process is created."""
    cmd = [sys.executable, __file__, "--only", only, "--workdir", str(work), "--seed", str(args.seed),
           "--device", args.device, "--score-cells", str(args.score_cells)]
    if args.max_epochs_cap is not None:
        cmd += ["--max-epochs-cap", str(args.max_epochs_cap)]
    if target is not None:
        cmd += ["--target", repr(target)]
    for pair in args.train_option:
        cmd += ["--train-option", pair]
    if args.stop_at_target:
        cmd += ["--stop-at-target"]
    cmd += ["--t0", repr(time.time())]  # last: the clock starts as the process is created
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    result = child_result(proc.stdout)
    if proc.returncode != 0 or result is None:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"{only} run failed on {work.name}")
    return result


def _reused_scvi(args: argparse.Namespace, name: str, meta: dict) -> dict:
    """scvi-tools' entry for ``name`` from an earlier report, refused unless its data, seed and version match."""
    import scvi

    earlier = json.loads(Path(args.scvi_result).read_text())
    entry = earlier.get("datasets", {}).get(name)
    if entry is None or earlier.get("seed") != args.seed or earlier.get("quick") != args.quick:
        raise SystemExit(f"--scvi-result {args.scvi_result}: no {name} entry for seed {args.seed}")
    same = {k: entry["data"][k] for k in ("cells", "genes", "training_cells", "validation_cells")}
    if same != {k: meta[k] for k in same} or entry["scvi_tools"].get("version") != scvi.__version__:
        raise SystemExit(f"--scvi-result {args.scvi_result}: its {name} data or scvi-tools version differ")
    return {**entry["scvi_tools"], "reused": True}


def compare(meta: dict, scvi: dict, st: dict) -> dict:
    """One data set's entry of the report: both runs, the wall-time ratio and the goal flags."""
    t = st["time_to_target_seconds"]
    ratio = t / scvi["wall_seconds"] if t is not None else None
    bio_ok = (st["bio_conservation_at_target"] >= scvi["bio_conservation"]
              if st["bio_conservation_at_target"] is not None else None)
    return {"data": meta, "scvi_tools": scvi, "streamtotal": st, "wall_time_ratio": ratio,
            "goal_met": {"wall_time_ratio_at_most_0.2": ratio <= GOAL_RATIO if ratio is not None else False,
                         "bio_conservation_no_lower": bool(bio_ok),
                         "both": bool(ratio is not None and ratio <= GOAL_RATIO and bio_ok)}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", default=",".join(DATASETS), help="comma-separated among " + ", ".join(DATASETS))
    p.add_argument("--data", default=str(DEFAULT_DATA), help="the PBMC 10k CITE-seq h5ad")
    p.add_argument("--sim-cells", type=int, default=100_000, help="cells of the simulated atlas")
    p.add_argument("--seed", type=int, default=0, help="split, simulation and both methods' training seed")
    p.add_argument("--score-cells", type=int, default=20_000,
                   help="labelled cells (a seeded subset, the same for every model) the scib metrics score")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda: where both models train")
    p.add_argument("--workdir", help="keep data and runs here (default: a temp dir)")
    p.add_argument("--max-epochs-cap", type=int, help="smoke runs only: at most this many epochs for each method")
    p.add_argument("--quick", action="store_true",
                   help=f"smoke run: {QUICK_CELLS} cells per data set, at most {QUICK_EPOCHS} epochs")
    p.add_argument("--train-option", action="append", default=[], metavar="KEY=VALUE",
                   help="streamtotal: a [train] setting other than its default (repeatable), e.g. "
                        "kl_warmup_fraction=0.5; the report lists them")
    p.add_argument("--stop-at-target", action="store_true",
                   help="streamtotal: stop training at the first epoch that reaches scvi-tools' value (exploring "
                        "settings; the full-run figures then describe the shortened run)")
    p.add_argument("--scvi-result", help="reuse scvi-tools' entry from this earlier report of the same data, seed "
                                         "and scvi-tools version instead of training it again (exploring "
                                         "settings; the report says so)")
    p.add_argument("--only", choices=["scvi", "streamtotal"], help=argparse.SUPPRESS)
    p.add_argument("--t0", type=float, help=argparse.SUPPRESS)
    p.add_argument("--target", type=float, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.only:
        work = Path(args.workdir)
        result = run_scvi(args, work) if args.only == "scvi" else run_streamtotal(args, work)
        print("RESULT " + json.dumps(result))
        return
    names = [n.strip() for n in args.datasets.split(",") if n.strip()]
    unknown = sorted(set(names) - set(DATASETS))
    if unknown or not names:
        p.error(f"--datasets: unknown {unknown or names}; choose among {list(DATASETS)}")
    if args.quick and args.max_epochs_cap is None:
        args.max_epochs_cap = QUICK_EPOCHS
    if args.max_epochs_cap is not None and args.max_epochs_cap < 1:
        p.error("--max-epochs-cap must be >= 1")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.workdir or tmp)
        report = {"benchmark": "time_to_quality", "quick": args.quick, "seed": args.seed, "device": args.device,
                  "max_epochs_cap": args.max_epochs_cap, "validation_fraction": VALIDATION_FRACTION,
                  "goal": f"wall_time_ratio <= {GOAL_RATIO} and bio conservation no lower",
                  "elbo_definition": ELBO_DEFINITION, "streamtotal_train_options": train_options(args.train_option),
                  "stop_at_target": args.stop_at_target, "scvi_result_reused_from": args.scvi_result,
                  "cpu_count": os.cpu_count(), "datasets": {}}
        for name in names:
            work = root / name
            print(f"[{name}] preparing data", file=sys.stderr, flush=True)
            meta = prepare(name, args, work)
            print(f"[{name}] scvi-tools TOTALVI ({meta['cells']} cells)", file=sys.stderr, flush=True)
            scvi = _reused_scvi(args, name, meta) if args.scvi_result else _spawn(args, work, "scvi")
            print(f"[{name}] scvi-tools: {scvi['wall_seconds']:.1f} s, {scvi['epochs']} epochs, validation -ELBO "
                  f"{scvi['val_neg_elbo']:.2f}; streamtotal", file=sys.stderr, flush=True)
            st = _spawn(args, work, "streamtotal", target=scvi["val_neg_elbo"])
            report["datasets"][name] = entry = compare(meta, scvi, st)
            print(f"[{name}] streamtotal: time to target {st['time_to_target_seconds']}, ratio "
                  f"{entry['wall_time_ratio']}", file=sys.stderr, flush=True)
        print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
