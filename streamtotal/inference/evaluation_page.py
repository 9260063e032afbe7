"""The evaluation report's protein heat map and its ``index.html`` (self-contained: PNGs embedded)."""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def plot_foreground_heatmap(mean: np.ndarray, labels: Sequence[str], proteins: Sequence[str],
                            out_png: str | Path) -> Path:
    """Mean protein foreground probability per label (rows) and protein (columns).

    Args:
        mean: ``[n_labels, n_proteins]`` values in [0, 1].
        labels: row names.
        proteins: column names.
        out_png: where to write the PNG.

    Returns:
        The PNG path.
    """
    mean = np.asarray(mean, dtype=float)
    width = min(4 + 0.35 * len(proteins), 40)
    height = min(2.5 + 0.3 * len(labels), 30)
    fig, ax = plt.subplots(figsize=(width, height))
    image = ax.imshow(mean, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_xticks(np.arange(len(proteins)), labels=list(proteins), rotation=90, fontsize=7)
    ax.set_yticks(np.arange(len(labels)), labels=list(labels), fontsize=7)
    ax.set_xlabel("protein")
    ax.set_ylabel("label")
    ax.set_title("mean protein foreground probability (1 - pi) per label")
    fig.colorbar(image, ax=ax, label="foreground probability")
    fig.tight_layout()
    out_png = Path(out_png)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def write_index_html(out_dir: Path, metrics: dict, figures: dict[str, str]) -> Path:
    """Writes ``index.html``: a table of the scib metrics and every figure (embedded, and linked by file name).

    Args:
        out_dir: the report folder holding the PNGs.
        metrics: the ``metrics.json`` content.
        figures: caption -> PNG file name inside ``out_dir``.

    Returns:
        The page's path.
    """
    scib = metrics["scib"]
    rows = []
    for group, title in (("aggregate", "aggregate"), ("bio_conservation", "bio conservation"),
                         ("batch_correction", "batch correction")):
        for name, value in scib[group].items():
            rows.append(f"<tr><td>{html.escape(title)}</td><td>{html.escape(name)}</td><td>{_fmt(value)}</td></tr>")
    for name, why in scib.get("skipped", {}).items():
        rows.append(f"<tr><td>skipped</td><td>{html.escape(name)}</td><td>{html.escape(why)}</td></tr>")
    sections = [_imputation_table(metrics.get("protein_imputation"))]
    for caption, name in figures.items():
        data = base64.b64encode((out_dir / name).read_bytes()).decode("ascii")
        sections.append(
            f'<h2>{html.escape(caption)}</h2>\n<p><a href="{html.escape(name)}">{html.escape(name)}</a></p>\n'
            f'<img src="data:image/png;base64,{data}" alt="{html.escape(caption)}">'
        )
    facts = [("run", metrics["run_dir"]), ("store", metrics["store"]), ("labels key", metrics["labels_key"]),
             ("batch key", metrics["batch_key"] or "(the model's batches)"),
             ("cells sampled", f'{metrics["n_cells"]} of {metrics["n_labeled_cells"]} labelled '
                               f'({metrics["n_obs"]} in the store; seed {metrics["seed"]})'),
             ("scib-metrics", metrics["scib_metrics_version"])]
    fact_rows = "\n".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in facts)
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>streamtotal evaluation</title>
<style>
body {{ font-family: sans-serif; margin: 2em; max-width: 1400px; }}
table {{ border-collapse: collapse; margin-bottom: 1.5em; }}
td, th {{ border: 1px solid #ccc; padding: 3px 10px; text-align: left; }}
img {{ max-width: 100%; }}
</style></head><body>
<h1>streamtotal evaluation</h1>
<table>
{fact_rows}
</table>
<h2>scib metrics (higher is better; total = 0.6 bio + 0.4 batch)</h2>
<p><a href="metrics.json">metrics.json</a> &middot; <a href="cells.csv">cells.csv</a></p>
<table><tr><th>group</th><th>metric</th><th>value</th></tr>
{chr(10).join(rows)}
</table>
{chr(10).join(sections)}
</body></html>
"""
    path = out_dir / "index.html"
    path.write_text(page, encoding="utf-8")
    return path


def _imputation_table(imputation: dict | None) -> str:
    """Proteins some panels lack: where measured and imputed, the correlation over labels, the relative spread."""
    if not imputation:
        return ""
    rows = []
    for name, info in imputation["proteins"].items():
        measured = ", ".join(f"{k} ({v})" for k, v in info["measured_in"].items())
        imputed = ", ".join(f"{k} ({v})" for k, v in info["imputed_in"].items())
        rows.append(f"<tr><td>{html.escape(name)}</td><td>{html.escape(measured)}</td><td>{html.escape(imputed)}</td>"
                    f"<td>{_fmt(info['pearson_over_labels'])}</td><td>{_fmt(info['mean_relative_spread'])}</td></tr>")
    return (f"<h2>proteins some panels lack: imputed against measured</h2>\n<p>Per label, the mean log1p of the "
            f"measured counts (cells whose panel has the protein) against the mean log1p of the imputed values "
            f"(cells whose panel lacks it; {imputation['samples']} posterior draws, background included, decoded as "
            f"the batches that measured it). Correlation over labels with at least "
            f"{imputation['min_cells_per_side']} cells on each side; spread = standard deviation over the draws / "
            f"imputed value.</p>\n<table><tr><th>protein</th><th>measured in (cells)</th><th>imputed in (cells)</th>"
            f"<th>r over labels</th><th>mean relative spread</th></tr>\n{chr(10).join(rows)}\n</table>")


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"
