"""The demo: simulate a small CITE-seq atlas, ingest it, train totalVI streaming, embed, and plot.

Everything a new user runs first, end to end on built-in data, local files only.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from streamtotal.config import DataConfig, RunConfig, TrainConfig
from streamtotal.simulate import CiteSimulator, SimulationConfig


@dataclass(frozen=True)
class DemoConfig:
    """What the demo runs."""

    out: str = "demo_out"
    """Output folder (replaced if it holds a previous demo)."""
    n_cells: int = 6000
    """Simulated cells."""
    n_genes: int = 1000
    """Simulated genes."""
    n_proteins: int = 20
    """Simulated proteins; the last batch misses 3 of them."""
    epochs: int = 25
    """Training epochs."""
    seed: int = 0
    """Seed of the simulation and the training."""
    progress: bool = True
    """Show progress bars."""


def latent_quality(latent: np.ndarray, cell_type: np.ndarray, batch: np.ndarray, k: int = 15) -> dict[str, float]:
    """Two quick figures of an embedding: how pure each cell's neighbourhood is in cell type (higher is better)
    and how mixed it is in batch (entropy of batches among neighbours / log(n_batches); 1 = perfectly mixed).
    """
    from sklearn.neighbors import NearestNeighbors

    nn = NearestNeighbors(n_neighbors=k + 1).fit(latent)
    idx = nn.kneighbors(latent, return_distance=False)[:, 1:]
    purity = float((cell_type[idx] == cell_type[:, None]).mean())
    cats = np.unique(batch)
    if len(cats) < 2:
        return {"knn_cell_type_purity": purity}
    counts = np.stack([(batch[idx] == c).mean(axis=1) for c in cats], axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        entropy = -np.nansum(np.where(counts > 0, counts * np.log(counts), 0.0), axis=1)
    return {"knn_cell_type_purity": purity, "batch_mixing_entropy": float(entropy.mean() / np.log(len(cats)))}


def run_demo(config: DemoConfig = DemoConfig()) -> dict:
    """Runs the demo and returns its summary (also written to ``<out>/summary.json``).

    Returns:
        Paths of what was written, training figures, and latent quality figures.
    """
    import shutil

    from loaders.ingest import ingest
    from streamtotal.simulate_writer import write_simulation
    from streamtotal.inference.embed import embed
    from streamtotal.plots import plot_training_curves, plot_umap, umap_coordinates
    from streamtotal.training.trainer import Trainer

    out = Path(config.out)
    if out.exists():
        if not (out / "summary.json").exists() and any(out.iterdir()):
            from streamtotal.errors import ConfigError

            raise ConfigError(f"{out} exists and is not a previous demo folder; choose another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    started = time.perf_counter()
    say = print  # the step lines are the demo's output; --no-progress only silences the bars

    sim = CiteSimulator(SimulationConfig(n_cells=config.n_cells, n_genes=config.n_genes,
                                         n_proteins=config.n_proteins, seed=config.seed))
    h5ad = write_simulation(sim, out / "simulated.h5ad", progress=config.progress)
    say(f"[1/5] simulated {config.n_cells} cells x {config.n_genes} genes x {config.n_proteins} proteins -> {h5ad}")

    store = out / "simulated.zarr"
    report = ingest(h5ad, store, batch_key="batch", progress=config.progress)
    say(f"[2/5] ingested -> {store}\n{report}")

    run_dir = out / "run"
    run_config = RunConfig(
        data=DataConfig(stores=(str(store),), batch_key="batch", labels_key="cell_type"),
        train=TrainConfig(max_epochs=config.epochs, seed=config.seed, progress=config.progress,
                          checkpoint_every_steps=100),
    )
    summary = Trainer(run_config, run_dir).fit()
    say(f"[3/5] trained {summary.epochs} epochs ({summary.steps} steps) at {summary.cells_per_second:.0f} cells/s; "
        f"validation -ELBO {summary.validation.get('neg_elbo', float('nan')):.1f}")

    result = embed(run_dir, str(store), export_h5ad=out / "latent.h5ad", return_latent=True,
                   progress=config.progress)
    say(f"[4/5] wrote the latent into {store} obsm['X_streamtotal'] and {result.exported}")

    adata = sim.to_anndata()
    true_type = adata.obs["true_cell_type"].to_numpy().astype(str)
    batch = adata.obs["batch"].to_numpy().astype(str)
    quality = latent_quality(result.latent, true_type, batch)
    coords = umap_coordinates(result.latent, seed=config.seed)
    umap_png = plot_umap(coords, {"cell type (simulated truth)": true_type, "batch": batch}, out / "umap.png",
                         title="streamtotal totalVI latent (demo)")
    curves_png = plot_training_curves(run_dir / "metrics.jsonl", out / "training_curves.png")
    say(f"[5/5] plots: {umap_png}, {curves_png}")

    summary_dict = {
        "store": str(store), "run_dir": str(run_dir), "umap_png": str(umap_png), "training_curves_png": str(curves_png),
        "epochs": summary.epochs, "steps": summary.steps, "train_cells_per_s": round(summary.cells_per_second, 1),
        "validation": summary.validation, "latent_quality": quality,
        "seconds": round(time.perf_counter() - started, 1),
    }
    (out / "summary.json").write_text(json.dumps(summary_dict, indent=1))
    say(json.dumps({k: summary_dict[k] for k in ("latent_quality", "train_cells_per_s", "seconds")}))
    return summary_dict
