# %% [markdown]
# # totalVI on PBMC 10k with streamtotal's Python API
#
# The calls of scvi-tools' totalVI tutorial, run on streamtotal: only the import line differs
# (``from scvi.model import TOTALVI`` / ``from scvi.external import TOTALANVI`` become
# ``from streamtotal import TOTALVI, TOTALANVI``). Cells are marked ``# %%``: open the file as a notebook
# (VS Code, Jupytext) or run it as a script:
#
#     python examples/pbmc10k_totalvi.py --n-cells 3000 --epochs 50 --out pbmc10k_out
#
# The data is 10x Genomics' PBMC 10k CITE-seq (4,000 highly variable genes, 14 TotalSeq-B antibodies, cell types
# matched from a published clustering; ``unlabeled`` where none matched). It holds one batch; to show query mapping
# the cells are split at random into a reference and a "query" that plays a second batch (a new donor or site).
#
# What it writes into ``--out`` (all files appear together, or none): ``umap_cell_types.png``,
# ``umap_denoised_proteins.png``, ``umap_foreground.png``, ``umap_query.png``, ``de_B_vs_rest.csv``, the model's
# run directory ``model/`` (the directory every ``streamtotal`` command reads) and ``summary.json``.

# %%
import argparse
import atexit
import json
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from streamtotal import TOTALANVI, TOTALVI  # scvi-tools: from scvi.model import TOTALVI

# The library reports through the "streamtotal" logger and never configures logging itself: a notebook chooses.
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
logging.getLogger("streamtotal").setLevel(logging.INFO)

REPO = Path(__file__).resolve().parents[1] if "__file__" in globals() else Path.cwd()
DEFAULT_DATA = REPO / ".." / "shared" / "data" / "pbmc10k_cite.h5ad"
PROTEINS_SHOWN = ["CD19_TotalSeqB", "CD14_TotalSeqB", "CD3_TotalSeqB", "CD56_TotalSeqB"]
"""Antibodies drawn on the UMAPs: B cells, monocytes, T cells, NK cells."""


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="totalVI / totalANVI on PBMC 10k with streamtotal's Python API")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the PBMC 10k CITE-seq .h5ad")
    parser.add_argument("--n-cells", type=int, default=None, help="a random subset of this many cells (default all)")
    parser.add_argument("--epochs", type=int, default=50, help="training epochs of each model (default 50)")
    parser.add_argument("--query-fraction", type=float, default=0.25,
                        help="fraction of the cells set aside as the query batch (default 0.25)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the subset, the split and training")
    parser.add_argument("--out", type=Path, default=Path("pbmc10k_out"), help="output directory")
    args = parser.parse_args(argv)
    if not args.data.exists():
        parser.error(f"--data {args.data} does not exist (the PBMC 10k CITE-seq h5ad)")
    if args.n_cells is not None and args.n_cells < 100:
        parser.error(f"--n-cells {args.n_cells}: take at least 100 cells")
    if args.epochs < 1:
        parser.error(f"--epochs {args.epochs}: train for at least one epoch")
    if not 0.05 <= args.query_fraction <= 0.5:
        parser.error(f"--query-fraction {args.query_fraction}: choose between 0.05 and 0.5")
    return args


# In a notebook kernel sys.argv holds the kernel's own arguments: use the defaults there.
args = parse_args([] if "ipykernel" in sys.modules else None)
# Everything is written into a staging directory next to --out and renamed into place at the end.
args.out.parent.mkdir(parents=True, exist_ok=True)
staging = Path(tempfile.mkdtemp(prefix=f".{args.out.name}.", dir=args.out.parent))
atexit.register(shutil.rmtree, staging, ignore_errors=True)  # a failed run leaves no half-written staging

# %% [markdown]
# ## Data: one AnnData in memory, split into a reference and a query batch

# %%
adata = ad.read_h5ad(args.data)
rng = np.random.default_rng(args.seed)
if args.n_cells is not None and args.n_cells < adata.n_obs:
    adata = adata[np.sort(rng.choice(adata.n_obs, size=args.n_cells, replace=False))].copy()
adata.obs["cell_type"] = adata.obs["cell_type"].astype(str)
is_query = rng.random(adata.n_obs) < args.query_fraction
adata.obs["batch"] = np.where(is_query, "query", "reference")
reference = adata[~is_query].copy()
query = adata[is_query].copy()
print(f"reference: {reference.n_obs} cells, query: {query.n_obs} cells, {adata.n_vars} genes, "
      f"{adata.obsm['protein_expression'].shape[1]} proteins")

# %% [markdown]
# ## Setup and training (scvi-tools' calls)
#
# ``setup_anndata`` records where the counts are; the model trains from the AnnData in memory (nothing is
# written to disk but the run directory, a temporary one unless ``run_dir=`` is given).

# %%
TOTALVI.setup_anndata(reference, protein_expression_obsm_key="protein_expression", batch_key="batch")
vae = TOTALVI(reference, latent_distribution="normal")
vae.train(max_epochs=args.epochs, seed=args.seed)
print(vae)
history = vae.history
elbo_train = history["elbo_train"]["elbo_train"]
elbo_validation = history["elbo_validation"]["elbo_validation"]

# %% [markdown]
# ## Latent space and UMAP
#
# With scanpy installed, its neighbours graph and UMAP; otherwise umap-learn (a streamtotal dependency).

# %%
import matplotlib

if "ipykernel" not in sys.modules:
    matplotlib.use("Agg")  # a script draws into files, with or without a display
import matplotlib.pyplot as plt

reference.obsm["X_totalVI"] = vae.get_latent_representation()
try:
    import scanpy as sc

    UMAP_BACKEND = "scanpy"
except ImportError:
    sc = None
    UMAP_BACKEND = "umap-learn"


def umap_of(latent: np.ndarray) -> np.ndarray:
    """2-D UMAP coordinates of a latent representation (scanpy if installed, else umap-learn)."""
    if sc is not None:
        view = ad.AnnData(obsm={"X_totalVI": latent}, obs=pd.DataFrame(index=[str(i) for i in range(len(latent))]))
        sc.pp.neighbors(view, use_rep="X_totalVI", random_state=args.seed)
        sc.tl.umap(view, random_state=args.seed)
        return view.obsm["X_umap"]
    import umap

    return umap.UMAP(random_state=args.seed).fit_transform(latent)


def scatter(ax, xy: np.ndarray, values, title: str) -> None:
    """One UMAP panel coloured by categories (strings) or by values (numbers, with a colour bar)."""
    values = np.asarray(values)
    if values.dtype.kind in "OUS":
        for name in sorted(set(values)):
            keep = values == name
            ax.scatter(xy[keep, 0], xy[keep, 1], s=3, label=name)
        ax.legend(markerscale=4, fontsize=6, loc="best")
    else:
        points = ax.scatter(xy[:, 0], xy[:, 1], s=3, c=values, cmap="viridis")
        plt.colorbar(points, ax=ax)
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])


reference.obsm["X_umap"] = umap_of(reference.obsm["X_totalVI"])
fig, ax = plt.subplots(figsize=(6, 5))
scatter(ax, reference.obsm["X_umap"], reference.obs["cell_type"], "totalVI latent (reference), cell types")
fig.savefig(staging / "umap_cell_types.png", dpi=120, bbox_inches="tight")
plt.close(fig)

# %% [markdown]
# ## Denoised expression and protein foreground probability
#
# ``get_normalized_expression`` returns two DataFrames (cells x genes, cells x proteins) with the AnnData's names;
# the denoised protein is the foreground signal, background removed. ``get_protein_foreground_probability`` gives
# P(foreground) per cell and antibody. On a store, ``write_to="denoised"`` would stream both into the store's
# ``obsm`` chunk by chunk instead of returning them.

# %%
rna_denoised, protein_denoised = vae.get_normalized_expression(n_samples=25, return_mean=True)
foreground = vae.get_protein_foreground_probability(n_samples=25, use_z_mean=False)
reference.obsm["denoised_protein"] = protein_denoised
reference.obsm["protein_foreground_prob"] = foreground

for name, values, title in (("umap_denoised_proteins.png", protein_denoised, "denoised {} (log1p)"),
                            ("umap_foreground.png", foreground, "P(foreground) {}")):
    fig, axes = plt.subplots(1, len(PROTEINS_SHOWN), figsize=(4.5 * len(PROTEINS_SHOWN), 4))
    for ax, protein in zip(axes, PROTEINS_SHOWN):
        shown = np.log1p(values[protein]) if "denoised" in name else values[protein]
        scatter(ax, reference.obsm["X_umap"], shown.to_numpy(), title.format(protein.split("_")[0]))
    fig.savefig(staging / name, dpi=100, bbox_inches="tight")
    plt.close(fig)

is_b = (reference.obs["cell_type"] == "B").to_numpy()
cd19_foreground_b = float(foreground["CD19_TotalSeqB"][is_b].mean())
cd19_foreground_rest = float(foreground["CD19_TotalSeqB"][~is_b].mean())
print(f"P(foreground) of CD19: {cd19_foreground_b:.3f} on B cells, {cd19_foreground_rest:.3f} elsewhere")

# %% [markdown]
# ## Differential expression: B cells against the rest
#
# scvi-tools' "change" mode and columns (``proba_de``, ``bayes_factor``, ``lfc_mean``, ``is_de_fdr_0.05``, ...),
# genes and proteins in one table (streamtotal adds a ``modality`` column). ``write_to=`` also writes the table as
# ``streamtotal de --out`` does.

# %%
de = vae.differential_expression(groupby="cell_type", group1="B", delta=0.5,
                                 write_to=staging / "de_B_vs_rest.csv")
# Up in B cells: a positive mean log fold change, most confident change first.
up = de[de["lfc_mean"] > 0].sort_values("bayes_factor", ascending=False)
up_proteins, up_genes = up[up["modality"] == "protein"], up[up["modality"] == "rna"]
print("proteins up in B cells:\n", up_proteins[["bayes_factor", "lfc_mean", "proba_de"]].head())
proteins_ranked = list(de[de["modality"] == "protein"].sort_values("lfc_mean", ascending=False).index)
cd19_rank = proteins_ranked.index("CD19_TotalSeqB") + 1  # rank by fold change among all proteins

# %% [markdown]
# ## Save: the same run directory the CLI reads
#
# ``streamtotal embed data.zarr --run model/`` or ``streamtotal train --resume --out model/`` work on it, and
# ``TOTALVI.load("model/", adata=reference)`` opens it again.

# %%
vae.save(staging / "model")
reloaded = TOTALVI.load(staging / "model", adata=reference)
reload_max_diff = float(np.abs(reloaded.get_latent_representation() - reference.obsm["X_totalVI"]).max())

# %% [markdown]
# ## Query mapping (scArches surgery)
#
# The query is aligned onto the reference's genes and proteins by name; only the weights of its new batch train,
# so the reference cells keep their place in the latent space.

# %%
TOTALVI.setup_anndata(query, protein_expression_obsm_key="protein_expression", batch_key="batch")
vae_q = TOTALVI.load_query_data(query, vae)
vae_q.train(max_epochs=args.epochs, plan_kwargs=dict(weight_decay=0.0), seed=args.seed)
query.obsm["X_totalVI"] = vae_q.get_latent_representation()
reference_after = vae_q.get_latent_representation(reference)
reference_moved = float(np.abs(reference_after - reference.obsm["X_totalVI"]).max())

joint_latent = np.concatenate([reference.obsm["X_totalVI"], query.obsm["X_totalVI"]])
joint_batch = np.concatenate([reference.obs["batch"].to_numpy(), query.obs["batch"].to_numpy()]).astype(str)
joint_type = np.concatenate([reference.obs["cell_type"].to_numpy(), query.obs["cell_type"].to_numpy()]).astype(str)
joint_umap = umap_of(joint_latent)
fig, axes = plt.subplots(1, 2, figsize=(12, 5))
scatter(axes[0], joint_umap, joint_batch, "reference + mapped query: batch")
scatter(axes[1], joint_umap, joint_type, "reference + mapped query: cell type")
fig.savefig(staging / "umap_query.png", dpi=110, bbox_inches="tight")
plt.close(fig)

# %% [markdown]
# ## Label transfer with totalANVI
#
# ``TOTALANVI.from_totalvi_model`` starts from the totalVI weights and adds a cell-type classifier on the latent
# space, trained on the labelled reference cells (``unlabeled`` ones count as unlabelled). The query is then mapped
# onto it as above and ``predict`` labels its cells; their own labels were never shown to the model.

# %%
anvi = TOTALANVI.from_totalvi_model(vae, unlabeled_category="unlabeled", labels_key="cell_type")
anvi.train(max_epochs=args.epochs, seed=args.seed)
anvi_q = TOTALANVI.load_query_data(query, anvi)
anvi_q.train(max_epochs=args.epochs, plan_kwargs=dict(weight_decay=0.0), seed=args.seed)
query.obs["predicted"] = anvi_q.predict()
probabilities = anvi_q.predict(soft=True)
labelled = (query.obs["cell_type"] != "unlabeled").to_numpy()
accuracy = float((query.obs["predicted"].to_numpy()[labelled] == query.obs["cell_type"].to_numpy()[labelled]).mean())
print(f"query label accuracy (labelled cells): {accuracy:.3f}")

# %% [markdown]
# ## Summary, then every output into place at once

# %%
summary = {
    "data": str(args.data),
    "n_cells_reference": int(reference.n_obs),
    "n_cells_query": int(query.n_obs),
    "n_genes": int(adata.n_vars),
    "n_proteins": int(protein_denoised.shape[1]),
    "epochs": args.epochs,
    "umap_backend": UMAP_BACKEND,
    "elbo_train_first": float(elbo_train.iloc[0]),
    "elbo_train_last": float(elbo_train.iloc[-1]),
    "elbo_validation_last": float(elbo_validation.iloc[-1]),
    "latent_shape": list(reference.obsm["X_totalVI"].shape),
    "rna_denoised_row_sum_mean": float(rna_denoised.sum(axis=1).mean()),
    "cd19_foreground_b": cd19_foreground_b,
    "cd19_foreground_rest": cd19_foreground_rest,
    "de_n_b_cells": int(is_b.sum()),
    "de_top_proteins_up": list(up_proteins.index[:5]),
    "de_top_genes_up": list(up_genes.index[:10]),
    "de_cd19_protein_rank": cd19_rank,
    "de_n_significant": int(de["is_de_fdr_0.05"].sum()),
    "reload_latent_max_abs_diff": reload_max_diff,
    "query_latent_finite": bool(np.isfinite(query.obsm["X_totalVI"]).all()),
    "reference_latent_moved_by_query": reference_moved,
    "label_accuracy_query": accuracy,
    "label_probability_row_sum_mean": float(probabilities.sum(axis=1).mean()),
    "n_labelled_query_cells": int(labelled.sum()),
}
(staging / "summary.json").write_text(json.dumps(summary, indent=1))

if args.out.exists():
    previous = args.out.with_name(f".{args.out.name}.previous")
    shutil.rmtree(previous, ignore_errors=True)
    os.replace(args.out, previous)
    os.replace(staging, args.out)
    shutil.rmtree(previous, ignore_errors=True)
else:
    os.replace(staging, args.out)
print(json.dumps(summary, indent=1))
print(f"outputs in {args.out}")
