"""Cross-study integration on real CITE-seq (10x PBMC 10k): a query from "another technology", and a study that
did not measure some proteins. streamtotal's defaults against scvi-tools, same epochs.

Label transfer (per seed; the seed draws the split, the thinning, the removed genes and the training): the
labelled cells are split 50/50 into a reference and a query; the query is made to look like another technology:
RNA and protein counts binomially thinned (35% of RNA, 50% of protein UMIs kept), 13% of the reference's genes
removed at random, CD16 and CD15 removed, and 10 extra protein columns of background-like counts added. Methods:

- ``streamtotal``: ``train --totalanvi`` on the reference, ``map --predict`` of the query, defaults (absent genes
  masked: ``[data] absent_genes = "mask"``);
- ``streamtotal_zero_filled``: the same with ``absent_genes = "zero"`` (the behaviour before masking);
- ``scvi_totalanvi_zero_filled``: scvi-tools TOTALANVI on the reference, the query zero-filled by
  ``prepare_query_anndata`` (its proteins aligned to the reference panel: extra ones dropped, missing ones 0),
  ``load_query_data`` + query training, ``predict``;
- ``scvi_totalanvi_shared``: the same with reference and query subset to their shared genes and proteins (the
  only way it accepts such a query without zeros, and a reference retrained by hand).

Scores: accuracy and macro-F1 against the held-back labels (fine labels of the dataset, and coarse ones: T, B,
myeloid, NK), mean over seeds.

Protein imputation (per seed): the cells are split at random into two studies; study B's CD4, CD8a, CD19 and CD14
are withheld (its store lacks them). streamtotal (two stores, one study each) and scvi-tools TOTALVI (in memory,
one AnnData with B's withheld columns at 0, which it treats as missing for that batch) train on the same data for
the same epochs; each imputes B's withheld proteins as denoised protein (25 posterior samples, background
included, decoded as study A, which measured them). Scores: Pearson and Spearman correlation of log1p(imputed)
with log1p(withheld counts), per protein, and their means.

Each method runs in its own process. Prints one JSON object (and each run's result on stderr as it finishes).

    python benchmarks/cross_study.py [--epochs 50] [--seeds 0,1,2] [--quick]

``--quick``: seed 0, 3 epochs, a 1,500-cell subset: a smoke run that checks the script works (its figures mean
nothing).
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
RNA_KEEP, PROTEIN_KEEP = 0.35, 0.50
GENE_DROP_FRACTION = 0.13
DROPPED_PROTEINS = ("CD16_TotalSeqB", "CD15_TotalSeqB")
N_EXTRA_PROTEINS = 10
WITHHELD = ("CD4_TotalSeqB", "CD8a_TotalSeqB", "CD19_TotalSeqB", "CD14_TotalSeqB")
IMPUTE_SAMPLES = 25
COARSE = {"CD4 T": "T", "CD8 T": "T", "B": "B", "CD14 mono": "myeloid", "CD16 mono": "myeloid",
          "DC-like": "myeloid", "NK": "NK"}
LABEL_METHODS = ("streamtotal", "streamtotal_zero_filled", "scvi_totalanvi_zero_filled", "scvi_totalanvi_shared")
IMPUTE_METHODS = ("streamtotal_impute", "scvi_totalvi_impute")


# ---------------------------------------------------------------------------------------------- data preparation

def _load(data: Path, subset: int | None):
    import anndata as ad

    adata = ad.read_h5ad(data)
    if subset and subset < adata.n_obs:
        keep = np.sort(np.random.default_rng(0).choice(adata.n_obs, subset, replace=False))
        adata = adata[keep].copy()
    adata.obs["cell_type"] = adata.obs["cell_type"].astype(str)
    return adata


def _thin(counts, keep: float, rng: np.random.Generator):
    """Binomial thinning of integer counts (sparse or dense): each UMI kept with probability ``keep``."""
    import scipy.sparse as sp

    if sp.issparse(counts):
        out = sp.csr_matrix(counts, dtype=np.float32, copy=True)
        out.data = rng.binomial(np.rint(out.data).astype(np.int64), keep).astype(np.float32)
        out.eliminate_zeros()
        return out
    return rng.binomial(np.rint(np.asarray(counts)).astype(np.int64), keep).astype(np.float32)


def prepare_label_transfer(data: Path, work: Path, seed: int, subset: int | None) -> None:
    """Writes ``reference.h5ad`` and the technology-shifted ``query.h5ad`` of ``seed`` into ``work``."""
    import anndata as ad
    import pandas as pd

    adata = _load(data, subset)
    adata = adata[adata.obs["cell_type"] != "unlabeled"].copy()
    rng = np.random.default_rng([seed, 17])
    is_ref = np.zeros(adata.n_obs, dtype=bool)
    is_ref[rng.permutation(adata.n_obs)[: adata.n_obs // 2]] = True
    adata.obs["batch"] = np.where(is_ref, "reference", "query")
    adata[is_ref].copy().write_h5ad(work / "reference.h5ad")

    query = adata[~is_ref].copy()
    genes = np.asarray(query.var_names)
    drop = rng.choice(genes.size, int(round(GENE_DROP_FRACTION * genes.size)), replace=False)
    kept_genes = np.sort(np.setdiff1d(np.arange(genes.size), drop))
    rna = _thin(query.X, RNA_KEEP, rng)[:, kept_genes]
    protein = query.obsm["protein_expression"].drop(columns=list(DROPPED_PROTEINS))
    thinned = _thin(protein.to_numpy(), PROTEIN_KEEP, rng)
    # Background-like extra antibodies: NB counts around a fraction of each cell's median thinned protein count.
    level = 0.5 * np.maximum(np.median(thinned, axis=1, keepdims=True), 1.0)
    extra = rng.poisson(rng.gamma(2.0, level / 2.0, size=(thinned.shape[0], N_EXTRA_PROTEINS))).astype(np.float32)
    columns = list(protein.columns) + [f"EXTRA{i}_background" for i in range(N_EXTRA_PROTEINS)]
    obs = query.obs.copy()
    obs["true_cell_type"] = obs["cell_type"]
    obs["cell_type"] = "unlabeled"  # the query's labels are hidden from every method
    shifted = ad.AnnData(X=rna, obs=obs, var=query.var.iloc[kept_genes].copy())
    shifted.obsm["protein_expression"] = pd.DataFrame(np.hstack([thinned, extra]), index=obs.index, columns=columns)
    shifted.write_h5ad(work / "query.h5ad")


def prepare_imputation(data: Path, work: Path, seed: int, subset: int | None) -> None:
    """Writes ``study_A.h5ad`` (every protein) and ``study_B.h5ad`` (``WITHHELD`` removed) into ``work``, plus
    ``withheld.npz``: study B's withheld counts, for scoring."""
    adata = _load(data, subset)
    rng = np.random.default_rng([seed, 29])
    in_a = np.zeros(adata.n_obs, dtype=bool)
    in_a[rng.permutation(adata.n_obs)[: adata.n_obs // 2]] = True
    adata.obs["study"] = np.where(in_a, "study_A", "study_B")
    adata[in_a].copy().write_h5ad(work / "study_A.h5ad")
    b = adata[~in_a].copy()
    np.savez(work / "withheld.npz", counts=b.obsm["protein_expression"][list(WITHHELD)].to_numpy(),
             names=np.asarray(WITHHELD))
    b.obsm["protein_expression"] = b.obsm["protein_expression"].drop(columns=list(WITHHELD))
    b.write_h5ad(work / "study_B.h5ad")


# ---------------------------------------------------------------------------------------------- scoring

def score_labels(truth: np.ndarray, predicted: np.ndarray) -> dict:
    from sklearn.metrics import accuracy_score, f1_score

    coarse_truth = np.asarray([COARSE.get(t, t) for t in truth])
    coarse_pred = np.asarray([COARSE.get(p, p) for p in predicted])
    return {"accuracy": float(accuracy_score(truth, predicted)),
            "macro_f1": float(f1_score(truth, predicted, average="macro")),
            "coarse_accuracy": float(accuracy_score(coarse_truth, coarse_pred)),
            "coarse_macro_f1": float(f1_score(coarse_truth, coarse_pred, average="macro"))}


def score_imputation(imputed: np.ndarray, work: Path) -> dict:
    """Pearson and Spearman of log1p(imputed) with log1p(withheld), per protein and averaged."""
    from scipy.stats import pearsonr, spearmanr

    withheld = np.load(work / "withheld.npz")
    truth, names = np.log1p(withheld["counts"]), [str(n) for n in withheld["names"]]
    values = np.log1p(np.asarray(imputed, dtype=np.float64))
    per = {name: {"pearson": float(pearsonr(values[:, i], truth[:, i])[0]),
                  "spearman": float(spearmanr(values[:, i], truth[:, i])[0])} for i, name in enumerate(names)}
    return {"per_protein": per, "pearson": float(np.mean([v["pearson"] for v in per.values()])),
            "spearman": float(np.mean([v["spearman"] for v in per.values()]))}


# ---------------------------------------------------------------------------------------------- methods

def run_streamtotal_labels(work: Path, epochs: int, seed: int, absent_genes: str) -> dict:
    import anndata as ad

    from loaders.ingest import ingest
    from streamtotal.config import DataConfig, RunConfig, TrainConfig
    from streamtotal.model.config import ModelConfig
    from streamtotal.surgery.map_query import map_query
    from streamtotal.training.trainer import Trainer

    query_store = work / f"query_{absent_genes}.zarr"  # --predict writes into it: one copy per method
    ingest(work / "reference.h5ad", work / "reference.zarr", batch_key="batch", progress=False, overwrite=True)
    ingest(work / "query.h5ad", query_store, batch_key="batch", progress=False, overwrite=True)
    reference, query = work / f"st_reference_{absent_genes}", work / f"st_query_{absent_genes}"
    t0 = time.perf_counter()
    config = RunConfig(data=DataConfig(stores=(str(work / "reference.zarr"),), batch_key="batch",
                                       labels_key="cell_type", absent_genes=absent_genes),
                       model=ModelConfig(label_classifier=True),
                       train=TrainConfig(max_epochs=epochs, progress=False, checkpoint_every_steps=10**9, seed=seed))
    Trainer(config, reference).fit()
    t1 = time.perf_counter()
    result = map_query(reference, [str(query_store)], query, epochs=epochs, predict=True, verbose=False,
                       absent_genes=absent_genes)
    t2 = time.perf_counter()
    truth = ad.read_h5ad(work / "query.h5ad").obs["true_cell_type"].astype(str).to_numpy()
    predicted = ad.read_zarr(query_store).obs["streamtotal_label"].astype(str).to_numpy()
    study = result.report["studies"][0]
    return {**score_labels(truth, predicted), "reference_seconds": t1 - t0, "query_seconds": t2 - t1,
            "alignment": {"absent_genes": result.report["absent_genes"]["mode"],
                          "gene_overlap": study["gene_overlap"], "proteins_masked": study["proteins_masked"],
                          "proteins_dropped": len(study["proteins_dropped"])}}


def _scvi_setup(cls, adata) -> None:
    cls.setup_anndata(adata, protein_expression_obsm_key="protein_expression", batch_key="batch",
                      labels_key="cell_type", unlabeled_category="unlabeled")


def run_scvi_labels(work: Path, epochs: int, seed: int, variant: str) -> dict:
    import anndata as ad
    import scvi
    from scvi.external import TOTALANVI

    scvi.settings.seed = seed
    ref, query = ad.read_h5ad(work / "reference.h5ad"), ad.read_h5ad(work / "query.h5ad")
    truth = query.obs["true_cell_type"].astype(str).to_numpy()
    ref_proteins = list(ref.obsm["protein_expression"].columns)
    if variant == "shared":
        genes = ref.var_names.intersection(query.var_names)
        proteins = [p for p in ref_proteins if p in set(query.obsm["protein_expression"].columns)]
        ref = ref[:, genes].copy()
        ref.obsm["protein_expression"] = ref.obsm["protein_expression"][proteins]
        query = query[:, genes].copy()
        query.obsm["protein_expression"] = query.obsm["protein_expression"][proteins]
    kwargs = dict(accelerator="cpu", devices=1, enable_progress_bar=False)
    t0 = time.perf_counter()
    _scvi_setup(TOTALANVI, ref)
    model = TOTALANVI(ref)
    model.train(max_epochs=epochs, **kwargs)
    t1 = time.perf_counter()
    if variant == "zero_filled":
        query = TOTALANVI.prepare_query_anndata(query, model, inplace=False)
        # Its panel must equal the reference's (scvi-tools #3320): extra antibodies dropped, missing ones zero.
        protein = query.obsm["protein_expression"]
        query.obsm["protein_expression"] = protein.reindex(columns=ref_proteins, fill_value=0.0)
    query_model = TOTALANVI.load_query_data(query, model)
    query_model.train(max_epochs=epochs, plan_kwargs={"weight_decay": 0.0}, **kwargs)
    t2 = time.perf_counter()
    predicted = np.asarray(query_model.predict(query)).astype(str)
    return {**score_labels(truth, predicted), "reference_seconds": t1 - t0, "query_seconds": t2 - t1,
            "n_genes": int(ref.n_vars), "n_proteins": len(ref.obsm["protein_expression"].columns),
            "version": scvi.__version__}


def run_streamtotal_impute(work: Path, epochs: int, seed: int) -> dict:
    from loaders.ingest import ingest
    from streamtotal.config import DataConfig, RunConfig, TrainConfig
    from streamtotal.inference.expression import ExpressionOptions, StorePosterior
    from streamtotal.training.trainer import Trainer

    stores = []
    for study in ("study_A", "study_B"):
        ingest(work / f"{study}.h5ad", work / f"{study}.zarr", progress=False, overwrite=True)
        stores.append(str(work / f"{study}.zarr"))
    run = work / "st_impute"
    t0 = time.perf_counter()
    config = RunConfig(data=DataConfig(stores=tuple(stores)),
                       train=TrainConfig(max_epochs=epochs, progress=False, checkpoint_every_steps=10**9, seed=seed))
    Trainer(config, run).fit()
    t1 = time.perf_counter()
    post = StorePosterior(run, stores[1], progress=False)
    registry = post.registry
    study_a = [b for b in registry.batch_categories if "study_A" in b]
    options = ExpressionOptions(n_samples=IMPUTE_SAMPLES, return_mean=True, include_protein_background=True,
                                transform_batch=study_a, proteins=list(WITHHELD), seed=seed)
    values = post.denoised_protein(None, options)
    return {**score_imputation(values, work), "train_seconds": t1 - t0, "transform_batch": study_a}


def run_scvi_impute(work: Path, epochs: int, seed: int) -> dict:
    import anndata as ad
    import scvi

    scvi.settings.seed = seed
    a, b = ad.read_h5ad(work / "study_A.h5ad"), ad.read_h5ad(work / "study_B.h5ad")
    proteins = list(a.obsm["protein_expression"].columns)
    b.obsm["protein_expression"] = b.obsm["protein_expression"].reindex(columns=proteins, fill_value=0.0)
    adata = ad.concat([a, b])
    adata.obsm["protein_expression"] = adata.obsm["protein_expression"][proteins]
    scvi.model.TOTALVI.setup_anndata(adata, protein_expression_obsm_key="protein_expression", batch_key="study")
    model = scvi.model.TOTALVI(adata)
    t0 = time.perf_counter()
    model.train(max_epochs=epochs, accelerator="cpu", devices=1, enable_progress_bar=False)
    t1 = time.perf_counter()
    indices = np.flatnonzero((adata.obs["study"] == "study_B").to_numpy())
    # protein_list is not passed: scvi-tools 1.4 indexes its tuple of protein names with a list there (TypeError).
    _, protein = model.get_normalized_expression(indices=indices, n_samples=IMPUTE_SAMPLES, return_mean=True,
                                                 include_protein_background=True, transform_batch=["study_A"],
                                                 return_numpy=True)
    values = np.asarray(protein)[:, [proteins.index(p) for p in WITHHELD]]
    return {**score_imputation(values, work), "train_seconds": t1 - t0, "version": scvi.__version__}


def run_one(method: str, work: Path, epochs: int, seed: int) -> dict:
    if method == "streamtotal":
        return run_streamtotal_labels(work, epochs, seed, "mask")
    if method == "streamtotal_zero_filled":
        return run_streamtotal_labels(work, epochs, seed, "zero")
    if method.startswith("scvi_totalanvi_"):
        return run_scvi_labels(work, epochs, seed, method[len("scvi_totalanvi_"):])
    if method == "streamtotal_impute":
        return run_streamtotal_impute(work, epochs, seed)
    return run_scvi_impute(work, epochs, seed)


# ---------------------------------------------------------------------------------------------- driver

def _mean(runs: list[dict], keys: tuple[str, ...]) -> dict:
    ok = [r for r in runs if keys[0] in r]
    if not ok:
        return {"error": "no run finished"}
    return {**{k: float(np.mean([r[k] for r in ok])) for k in keys}, "n_seeds": len(ok),
            f"{keys[0]}_per_seed": [r[keys[0]] for r in ok]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(DEFAULT_DATA))
    p.add_argument("--epochs", type=int, default=50, help="epochs of every training (reference, query, imputation)")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds; means over them are compared")
    p.add_argument("--quick", action="store_true", help="smoke run: seed 0, 3 epochs, a 1,500-cell subset")
    p.add_argument("--subset", type=int, help="use a random subset of this many cells (default: all)")
    p.add_argument("--workdir")
    p.add_argument("--only", help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.quick:
        args.seeds, args.epochs, args.subset = "0", 3, args.subset or 1500
    if args.only:
        print("RESULT " + json.dumps(run_one(args.only, Path(args.workdir), args.epochs, args.seed)))
        return
    seeds = [int(v) for v in args.seeds.split(",")]
    results: dict[str, list] = {m: [] for m in LABEL_METHODS + IMPUTE_METHODS}
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(args.workdir or tmp)
        for seed in seeds:
            work = base / f"seed{seed}"
            work.mkdir(parents=True, exist_ok=True)
            prepare_label_transfer(Path(args.data), work, seed, args.subset)
            prepare_imputation(Path(args.data), work, seed, args.subset)
            for method in LABEL_METHODS + IMPUTE_METHODS:
                proc = subprocess.run([sys.executable, __file__, "--only", method, "--workdir", str(work),
                                       "--epochs", str(args.epochs), "--seed", str(seed)],
                                      capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
                result = child_result(proc.stdout) or {"error": (proc.stderr or proc.stdout)[-2000:]}
                results[method].append({"seed": seed, **result})
                print(json.dumps({"seed": seed, "method": method, **result}), file=sys.stderr, flush=True)
    labels = {m: _mean(results[m], ("accuracy", "macro_f1", "coarse_accuracy", "coarse_macro_f1"))
              for m in LABEL_METHODS}
    impute = {m: _mean(results[m], ("pearson", "spearman")) for m in IMPUTE_METHODS}
    best_scvi = max((labels[m] for m in ("scvi_totalanvi_zero_filled", "scvi_totalanvi_shared")),
                    key=lambda s: s.get("accuracy", -1.0))
    ours, scvi_impute = labels["streamtotal"], impute["scvi_totalvi_impute"]
    print(json.dumps({
        "benchmark": "cross_study", "data": args.data, "epochs": args.epochs, "seeds": seeds, "subset": args.subset,
        "query_shift": {"rna_keep": RNA_KEEP, "protein_keep": PROTEIN_KEEP, "genes_removed": GENE_DROP_FRACTION,
                        "proteins_removed": list(DROPPED_PROTEINS), "extra_proteins": N_EXTRA_PROTEINS},
        "withheld_proteins": list(WITHHELD),
        "label_transfer_mean_over_seeds": labels, "imputation_mean_over_seeds": impute,
        "streamtotal_at_least_best_scvi_label_transfer": {
            k: ours.get(k, -1.0) >= best_scvi.get(k, 2.0) for k in ("accuracy", "macro_f1")},
        "streamtotal_at_least_scvi_imputation": {
            k: impute["streamtotal_impute"].get(k, -1.0) >= scvi_impute.get(k, 2.0) for k in ("pearson", "spearman")},
        "runs": results,
    }, indent=1))


if __name__ == "__main__":
    main()
