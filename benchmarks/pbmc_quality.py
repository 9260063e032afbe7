"""Quality on real CITE-seq (10x PBMC 10k, ../shared/data/pbmc10k_cite.h5ad): streamtotal and scvi-tools TOTALVI
trained for the same epochs, side by side.

- latent: scib-metrics bio conservation, k-NN (k=15) label purity and silhouette of cell types (labelled cells),
  for both models;
- protein foreground probability: mean P(foreground) of CD19 on B cells vs all others, of CD14 on CD14 monocytes
  vs all others (streamtotal; scvi-tools' get_protein_foreground_probability for comparison);
- differential expression, B cells vs rest (streamtotal): rank of CD19 among proteins by Bayes factor.

Each model trains in its own process. Prints one JSON object.

    python benchmarks/pbmc_quality.py [--epochs 50] [--data ../shared/data/pbmc10k_cite.h5ad]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from _common import child_result

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "pbmc10k_cite.h5ad"
MARKERS = {"CD19_TotalSeqB": "B", "CD14_TotalSeqB": "CD14 mono"}


def latent_scores(latent: np.ndarray, labels: np.ndarray) -> dict:
    from sklearn.metrics import silhouette_score
    from sklearn.neighbors import NearestNeighbors

    from streamtotal.inference.integration_metrics import integration_metrics

    keep = labels != "unlabeled"
    z, y = latent[keep], labels[keep]
    idx = NearestNeighbors(n_neighbors=16).fit(z).kneighbors(z, return_distance=False)[:, 1:]
    # scib-metrics' bio-conservation set (one batch here, so no batch-correction metrics).
    scib = integration_metrics(np.ascontiguousarray(z, dtype=np.float32), y)
    return {"knn15_label_purity": float((y[idx] == y[:, None]).mean()),
            "silhouette_label": float(silhouette_score(z, y, sample_size=min(4000, len(y)), random_state=0)),
            "scib_metrics": scib}


def marker_separation(prob: np.ndarray, proteins: list[str], labels: np.ndarray) -> dict:
    out = {}
    for protein, cell_type in MARKERS.items():
        col = prob[:, proteins.index(protein)]
        on = labels == cell_type
        out[protein] = {"on_" + cell_type: float(col[on].mean()), "others": float(col[(~on) & (labels != "unlabeled")].mean())}
    return out


def run_streamtotal(data: Path, work: Path, epochs: int, precision: str = "auto", seed: int = 0) -> dict:
    import anndata as ad

    from loaders.ingest import ingest
    from streamtotal.config import DataConfig, RunConfig, TrainConfig
    from streamtotal.inference.differential import DifferentialExpression
    from streamtotal.inference.expression import StorePosterior
    from streamtotal.training.trainer import Trainer

    store = work / "pbmc.zarr"
    ingest(data, store, progress=False, overwrite=True)
    config = RunConfig(data=DataConfig(stores=(str(store),)),
                       train=TrainConfig(max_epochs=epochs, progress=False, checkpoint_every_steps=10**9,
                                         precision=precision, seed=seed))
    t = time.perf_counter()
    trainer = Trainer(config, work / "run")
    summary = trainer.fit()
    seconds = time.perf_counter() - t
    post = StorePosterior(work / "run", str(store), progress=False)
    latent = post.latent()
    labels = ad.read_h5ad(data, backed="r").obs["cell_type"].astype(str).to_numpy()
    prob = post.protein_foreground_probability()
    proteins = list(post.registry.protein_names)
    de = DifferentialExpression(post).compare_groups("cell_type", "B", modality="protein")
    ranked = [str(i) for i in de.index]
    return {"train_seconds": seconds, "cells_per_s": summary.cells_per_second, "precision": trainer.precision,
            "validation_neg_elbo": summary.validation.get("neg_elbo"), **latent_scores(latent, labels),
            "foreground_probability": marker_separation(prob, proteins, labels),
            "de_B_vs_rest_protein_ranking": ranked[:5],
            "de_B_vs_rest_CD19_rank": ranked.index("CD19_TotalSeqB") + 1}


def run_scvi(data: Path, work: Path, epochs: int) -> dict:
    import anndata as ad
    import scvi

    scvi.settings.seed = 0
    adata = ad.read_h5ad(data)
    scvi.model.TOTALVI.setup_anndata(adata, protein_expression_obsm_key="protein_expression")
    model = scvi.model.TOTALVI(adata)
    t = time.perf_counter()
    model.train(max_epochs=epochs, accelerator="cpu", devices=1, enable_progress_bar=False)
    seconds = time.perf_counter() - t
    labels = adata.obs["cell_type"].astype(str).to_numpy()
    prob = model.get_protein_foreground_probability()
    prob = prob.to_numpy() if hasattr(prob, "to_numpy") else np.asarray(prob)
    return {"train_seconds": seconds, "version": scvi.__version__,
            **latent_scores(model.get_latent_representation(), labels),
            "foreground_probability": marker_separation(prob, list(adata.obsm["protein_expression"].columns), labels)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(DEFAULT_DATA))
    p.add_argument("--epochs", type=int, default=50)
    p.add_argument("--workdir")
    p.add_argument("--precision", default="auto", help="streamtotal's train.precision (auto, fp32, bf16)")
    p.add_argument("--seed", type=int, default=0, help="streamtotal's train.seed")
    p.add_argument("--only", choices=["streamtotal", "scvi"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.only == "streamtotal":
        result = run_streamtotal(Path(args.data), Path(args.workdir), args.epochs, args.precision, args.seed)
        print("RESULT " + json.dumps(result))
        return
    if args.only == "scvi":
        print("RESULT " + json.dumps(run_scvi(Path(args.data), Path(args.workdir), args.epochs)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        results = {}
        for name in ("streamtotal", "scvi"):
            proc = subprocess.run([sys.executable, __file__, "--only", name, "--data", args.data, "--epochs",
                                   str(args.epochs), "--workdir", str(work), "--precision", args.precision,
                                   "--seed", str(args.seed)],
                                  capture_output=True, text=True,
                                  env={**os.environ, "PYTHONWARNINGS": "ignore"})
            results[name] = child_result(proc.stdout) or {"error": proc.stderr[-2000:]}
        print(json.dumps({"benchmark": "pbmc_quality", "data": args.data, "epochs": args.epochs,
                          "streamtotal": results["streamtotal"], "scvi_tools": results["scvi"]}, indent=1))


if __name__ == "__main__":
    main()
