"""``examples/pbmc10k_totalvi.py`` runs end to end as a user runs it (a real subprocess) on a small subset of PBMC
10k, and writes every figure, the DE table, the model's run directory and a summary with sensible values."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "pbmc10k_totalvi.py"
PBMC = REPO / ".." / "shared" / "data" / "pbmc10k_cite.h5ad"
FIGURES = ("umap_cell_types.png", "umap_denoised_proteins.png", "umap_foreground.png", "umap_query.png")


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    # One OpenMP / torch thread: the machine running the tests is shared; results do not depend on it.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    return subprocess.run([sys.executable, str(EXAMPLE), *args], cwd=cwd, env=env, capture_output=True, text=True)


@pytest.mark.skipif(not PBMC.exists(), reason=f"the PBMC 10k data is not at {PBMC}")
def test_example_runs_end_to_end(tmp_path):
    out = tmp_path / "pbmc_out"
    proc = _run("--data", str(PBMC), "--n-cells", "600", "--epochs", "2", "--out", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]

    for name in FIGURES:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert {"config.toml", "registry.json", "model.pt"} <= {p.name for p in (out / "model").iterdir()}
    de = pd.read_csv(out / "de_B_vs_rest.csv", index_col=0)
    assert set(de["group1"]) == {"B"} and set(de["modality"]) == {"rna", "protein"}
    assert len(de) == 4000 + 14 and de["proba_de"].between(0, 1).all()
    # Everything was staged and renamed into place: no staging directory is left next to the output.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pbmc_out"]

    summary = json.loads((out / "summary.json").read_text())
    for key, value in summary.items():
        if isinstance(value, float):
            assert math.isfinite(value), key
    assert summary["n_cells_reference"] + summary["n_cells_query"] == 600
    assert 0 < summary["n_cells_query"] < summary["n_cells_reference"]
    assert (summary["n_genes"], summary["n_proteins"]) == (4000, 14)
    assert summary["latent_shape"] == [summary["n_cells_reference"], 20]
    assert summary["umap_backend"] in ("scanpy", "umap-learn")
    assert summary["elbo_train_last"] < summary["elbo_train_first"]
    assert summary["rna_denoised_row_sum_mean"] == pytest.approx(1.0, rel=1e-4)
    for key in ("cd19_foreground_b", "cd19_foreground_rest", "label_accuracy_query"):
        assert 0.0 <= summary[key] <= 1.0, key
    assert summary["label_probability_row_sum_mean"] == pytest.approx(1.0, rel=1e-5)
    assert 0 < summary["de_n_b_cells"] < summary["n_cells_reference"]
    assert 1 <= summary["de_cd19_protein_rank"] <= 14
    assert all(name.endswith("_TotalSeqB") for name in summary["de_top_proteins_up"])
    # The saved run directory reopens to the same latent; query training leaves the reference frozen.
    assert summary["reload_latent_max_abs_diff"] < 1e-5
    assert summary["reference_latent_moved_by_query"] < 1e-5
    assert summary["query_latent_finite"] is True
    assert 0 < summary["n_labelled_query_cells"] <= summary["n_cells_query"]


def test_example_refuses_missing_data(tmp_path):
    missing = tmp_path / "nowhere.h5ad"
    proc = _run("--data", str(missing), "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert proc.returncode == 2
    assert str(missing) in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()
