"""PNG figures: training curves and UMAPs of the latent space (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from streamtotal.training.metrics_log import read_metrics  # noqa: E402


def plot_training_curves(metrics_path: str | Path, out_png: str | Path) -> Path:
    """Plots training loss (per logged window) and validation negative ELBO (per epoch), and the KL weight.

    Args:
        metrics_path: a run's ``metrics.jsonl``.
        out_png: where to write the PNG.

    Returns:
        The PNG path.
    """
    records = read_metrics(metrics_path)
    train = [r for r in records if r.get("kind") == "train"]
    val = [r for r in records if r.get("kind") == "validation"]
    fig, (ax_loss, ax_kl) = plt.subplots(1, 2, figsize=(11, 4))
    if train:
        ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss (warm-up weighted)",
                     lw=1)
    if val:
        ax_loss.plot([r["step"] for r in val], [r["val_neg_elbo"] for r in val], "o-", label="validation -ELBO")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("per-cell loss")
    ax_loss.set_yscale("log")
    ax_loss.legend()
    ax_loss.set_title("training curves")
    if train:
        ax_kl.plot([r["step"] for r in train], [r["kl_weight"] for r in train], label="KL weight")
        ax_kl.plot([r["step"] for r in train], [r["lr"] / max(r["lr"] for r in train) for r in train],
                   label="lr / max lr")
    ax_kl.set_xlabel("step")
    ax_kl.set_ylim(0, 1.05)
    ax_kl.legend()
    ax_kl.set_title("schedules")
    fig.tight_layout()
    out_png = Path(out_png)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def umap_coordinates(latent: np.ndarray, seed: int = 0) -> np.ndarray:
    """2-D UMAP of a latent matrix (15 neighbours, as scanpy's default)."""
    import umap

    return umap.UMAP(n_neighbors=15, random_state=seed, n_jobs=1).fit_transform(latent)


def plot_umap(coords: np.ndarray, colorings: dict[str, np.ndarray], out_png: str | Path, title: str = "") -> Path:
    """Scatter plots of UMAP coordinates, one panel per coloring (categorical values).

    Args:
        coords: ``[n, 2]`` coordinates.
        colorings: panel title → ``[n]`` category values.
        out_png: where to write the PNG.
        title: figure title.

    Returns:
        The PNG path.
    """
    fig, axes = plt.subplots(1, len(colorings), figsize=(6 * len(colorings), 5), squeeze=False)
    order = np.random.default_rng(0).permutation(len(coords))  # so no category is painted over the others
    for ax, (name, values) in zip(axes[0], colorings.items()):
        values = np.asarray(values).astype(str)
        cats = sorted(set(values))
        cmap = plt.get_cmap("tab20" if len(cats) > 10 else "tab10")
        color_of = {c: cmap(i % cmap.N) for i, c in enumerate(cats)}
        ax.scatter(coords[order, 0], coords[order, 1], s=2, c=[color_of[v] for v in values[order]], linewidths=0)
        for c in cats:
            ax.scatter([], [], s=20, color=color_of[c], label=c)
        ax.legend(markerscale=1, fontsize=7, loc="center left", bbox_to_anchor=(1, 0.5), frameon=False)
        ax.set_title(name)
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out_png = Path(out_png)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png
