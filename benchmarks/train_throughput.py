"""Training throughput and quality: streamtotal (streaming from Zarr) against scvi-tools TOTALVI (in memory).

Both train the same architecture (20 latent, 256 hidden, 2 encoder layers, 1 decoder layer), batch size and
number of epochs on the same simulated data, each in its own process (so peak RSS is each one's own), one
after the other (so they do not compete for the 2 cores). Both hold out the same validation cells (scvi-tools
through ``external_indexing``) and report the per-cell negative ELBO at KL weight 1 on them.

streamtotal trains at its default precision (``--precision auto``: bf16 autocast on GPUs and CPUs with bf16
instructions, float32 elsewhere; the JSON says which); scvi-tools at its default, float32. ``--also-fp32`` adds a
float32 streamtotal run to the same comparison.

Prints one JSON object. Usage:

    python benchmarks/train_throughput.py [--cells 20000 --genes 2000 --proteins 50 --epochs 3] [--also-fp32]
                                          [--repeats 5]

On a GPU machine both train on the GPU (scvi-tools with ``accelerator="gpu"``), e.g. with larger data and batches:

    python benchmarks/train_throughput.py --device cuda --cells 200000 --batch-size 1024
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


def prepare(args: argparse.Namespace, work: Path) -> None:
    from loaders.ingest import ingest
    from loaders.plan import split_validation
    from streamtotal.simulate import CiteSimulator, SimulationConfig

    sim = CiteSimulator(SimulationConfig(n_cells=args.cells, n_genes=args.genes, n_proteins=args.proteins,
                                         n_batches=2, n_cell_types=8, n_missing_proteins=0, seed=args.seed))
    sim.to_anndata().write_h5ad(work / "data.h5ad")
    ingest(work / "data.h5ad", work / "data.zarr", batch_key="batch", progress=False, overwrite=True)
    train_ids, val_ids = split_validation(args.cells, 0.1, args.seed)
    np.save(work / "train_ids.npy", train_ids)
    np.save(work / "val_ids.npy", val_ids)


def run_scvi(args: argparse.Namespace, work: Path) -> dict:
    import anndata as ad
    import scvi
    import torch

    scvi.settings.seed = args.seed
    scvi.settings.dl_num_workers = 0
    train_ids, val_ids = np.load(work / "train_ids.npy"), np.load(work / "val_ids.npy")
    t0 = time.perf_counter()
    adata = ad.read_h5ad(work / "data.h5ad")
    scvi.model.TOTALVI.setup_anndata(adata, protein_expression_obsm_key="protein_expression", batch_key="batch")
    model = scvi.model.TOTALVI(adata, n_latent=20)
    t1 = time.perf_counter()
    model.train(max_epochs=args.epochs, batch_size=args.batch_size,
                accelerator="gpu" if args.device.startswith("cuda") else "cpu", devices=1,
                external_indexing=[train_ids, val_ids, np.array([], dtype=np.int64)],
                enable_progress_bar=False)
    t2 = time.perf_counter()
    torch.manual_seed(args.seed)
    neg_elbo = -float(model.get_elbo(adata=adata, indices=val_ids, batch_size=1024))
    return {
        "cells_per_s": len(train_ids) * args.epochs / (t2 - t1),
        "cells_per_s_end_to_end": len(train_ids) * args.epochs / (t2 - t0),
        "train_seconds": t2 - t1, "setup_seconds": t1 - t0,
        "val_neg_elbo": neg_elbo, "peak_rss_mib": peak_rss_mib(), "torch_threads": torch.get_num_threads(),
        "version": scvi.__version__,
    }


def run_streamtotal(args: argparse.Namespace, work: Path) -> dict:
    import torch

    from streamtotal.cli.process_settings import tune_process_for_training
    from streamtotal.config import DataConfig, RunConfig, TrainConfig
    from streamtotal.training.trainer import Trainer
    from streamtotal.training.validation import evaluate_elbo

    config = RunConfig(data=DataConfig(stores=(str(work / "data.zarr"),), batch_key="batch"),
                       train=TrainConfig(max_epochs=args.epochs, batch_size=args.batch_size, seed=args.seed,
                                         progress=False, device=args.device,
                                         checkpoint_every_steps=10**9, num_workers=args.num_workers,
                                         precision=args.precision))
    run_dir = work / f"run_{args.precision}"
    shutil.rmtree(run_dir, ignore_errors=True)  # a kept --workdir holds the previous run's checkpoints
    # The process-wide allocator tuning `streamtotal train` makes on CPU (the library leaves the process alone).
    tune_process_for_training(args.device)
    t0 = time.perf_counter()
    trainer = Trainer(config, run_dir)
    t1 = time.perf_counter()
    summary = trainer.fit()
    t2 = time.perf_counter()
    assert np.array_equal(trainer.val_ids, np.load(work / "val_ids.npy")), "validation cells differ from scvi's"
    val = evaluate_elbo(trainer.model, trainer.collection, trainer.val_ids, dist=trainer.dist,
                        device=trainer.device, batch_size=1024, seed=args.seed)
    return {
        "cells_per_s": len(trainer.train_ids) * summary.epochs / (t2 - t1),
        "cells_per_s_end_to_end": len(trainer.train_ids) * summary.epochs / (t2 - t0),
        "train_seconds": t2 - t1, "setup_seconds": t1 - t0,
        "val_neg_elbo": val["neg_elbo"], "peak_rss_mib": peak_rss_mib(), "torch_threads": torch.get_num_threads(),
        "precision": trainer.precision,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cells", type=int, default=20000)
    p.add_argument("--genes", type=int, default=2000)
    p.add_argument("--proteins", type=int, default=50)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=256, help="cells per minibatch, both models (default 256)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda: where both models train")
    p.add_argument("--num-workers", type=int, default=0, help="streamtotal DataLoader workers")
    p.add_argument("--workdir", help="keep data here (default: a temp dir)")
    p.add_argument("--precision", default="auto",
                   help="streamtotal's train.precision: auto (its default: bf16 on GPUs and CPUs with bf16 "
                        "instructions, else fp32), fp32 or bf16")
    p.add_argument("--also-fp32", action="store_true", help="also run streamtotal in float32 in the same run")
    p.add_argument("--repeats", type=int, default=1,
                   help="rounds of back-to-back runs; the report gives each contender's median run and the median "
                        "of the per-round ratios (on a shared machine single runs vary by +-15%%)")
    p.add_argument("--only", choices=["scvi", "streamtotal"], help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.only:
        work = Path(args.workdir)
        result = run_scvi(args, work) if args.only == "scvi" else run_streamtotal(args, work)
        print("RESULT " + json.dumps(result))
        return

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        prepare(args, work)
        runs = [("scvi", "scvi", args.precision), ("streamtotal", "streamtotal", args.precision)]
        if args.also_fp32:
            runs.append(("streamtotal_fp32", "streamtotal", "fp32"))
        rounds: list[dict] = []
        for _ in range(args.repeats):  # rounds alternate the contenders, so machine noise hits them alike
            rounds.append({name: _run_one(args, work, only, precision) for name, only, precision in runs})
        print(json.dumps(summarize(args, work, rounds), indent=1))


def _run_one(args: argparse.Namespace, work: Path, only: str, precision: str) -> dict:
    cmd = [sys.executable, __file__, "--only", only, "--workdir", str(work), "--cells", str(args.cells),
           "--genes", str(args.genes), "--proteins", str(args.proteins), "--epochs", str(args.epochs),
           "--seed", str(args.seed), "--num-workers", str(args.num_workers), "--precision", precision,
           "--batch-size", str(args.batch_size), "--device", args.device]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    result = child_result(proc.stdout)
    if proc.returncode != 0 or result is None:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"{only} ({precision}) run failed")
    return result


def summarize(args: argparse.Namespace, work: Path, rounds: list[dict]) -> dict:
    """The JSON report: each contender's median-rate run, and ratios per round (back-to-back runs) and their
    median; with one round, simply that round's figures."""

    def median_run(name: str) -> dict:
        ordered = sorted((r[name] for r in rounds), key=lambda x: x["cells_per_s"])
        return {**ordered[(len(ordered) - 1) // 2], "cells_per_s_runs": [r[name]["cells_per_s"] for r in rounds]}

    def ratios(name: str, key: str = "cells_per_s") -> list[float]:
        return [r[name][key] / r["scvi"][key] for r in rounds]

    scvi = median_run("scvi")
    out = {
        "benchmark": "train_throughput",
        "data": {"cells": args.cells, "genes": args.genes, "proteins": args.proteins, "epochs": args.epochs,
                 "batch_size": args.batch_size, "device": args.device,
                 "validation_cells": int(len(np.load(work / "val_ids.npy")))},
        "cpu_count": os.cpu_count(),
        "rounds": len(rounds),
        "scvi_tools": scvi,
    }
    for name, suffix in (("streamtotal", ""), ("streamtotal_fp32", "_fp32")):
        if name not in rounds[0]:
            continue
        run = median_run(name)
        per_round = ratios(name)
        out[name] = run
        out[f"throughput_ratio{suffix}"] = float(np.median(per_round))
        out[f"throughput_ratio{suffix}_per_round"] = per_round
        out[f"throughput_ratio{suffix}_end_to_end"] = float(np.median(ratios(name, "cells_per_s_end_to_end")))
        out[f"val_neg_elbo_relative_gap{suffix}"] = (run["val_neg_elbo"] - scvi["val_neg_elbo"]) / abs(
            scvi["val_neg_elbo"])
    return out


if __name__ == "__main__":
    main()
