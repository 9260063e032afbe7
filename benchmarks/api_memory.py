"""Out-of-core memory of the Python API: ``model.get_latent_representation(write_to=...)`` and
``model.get_normalized_expression(write_to=...)`` over every cell of a large store (1,000,000 cells by default),
written back into the store chunk by chunk: peak RSS (must stay under 2 GiB however many cells) and cells/s.

A model of the default architecture is trained through the API (``TOTALVI(store).train(max_epochs=1)``) on a small
store; the large store (same genes, proteins and batches: both come from ``streamtotal simulate`` with the same
settings but the cell count) is opened with ``TOTALVI.load(run, adata=STORE)`` and streamed through it. Each call
runs in its own process, so peak RSS (VmHWM) is that call's own, the model load included.

The peer, in the same run: scvi-tools' TOTALVI has no out-of-core path (its downstream methods take an AnnData in
memory and return dense arrays), so it cannot process the large store at all. It runs the same two calls on
in-memory AnnData of the ``--peer-cells`` sizes (a TOTALVI trained the same way, 1 epoch on the same small data),
and its peak RSS is extrapolated linearly to ``--cells`` from the two largest sizes. Prints one JSON object.

    python benchmarks/api_memory.py [--cells 1000000 --peer-cells 50000,100000 --workdir /tmp/streamtotal_api_memory]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from _common import child_result, peak_rss_mib

LATENT_KEY = "X_api_memory"
"""``obsm`` key the latent is written to."""
EXPRESSION_KEY = "api_memory_denoised"
"""``obsm`` prefix the denoised expression is written to (``<key>_rna``, ``<key>_protein``)."""


def child_streamtotal(args: argparse.Namespace) -> dict:
    import zarr

    from streamtotal import TOTALVI

    t0 = time.perf_counter()
    model = TOTALVI.load(args.run, adata=args.store)
    t1 = time.perf_counter()
    if args.child == "latent":
        written = model.get_latent_representation(write_to=LATENT_KEY)
    else:
        written = model.get_normalized_expression(write_to=EXPRESSION_KEY)
    seconds = time.perf_counter() - t1
    root = zarr.open_group(str(args.store), mode="r")
    shapes = {name: list(root[key].shape) for name, key in written.items()}
    n_cells = shapes[next(iter(shapes))][0]
    if any(shape[0] != n_cells for shape in shapes.values()):
        raise SystemExit(f"written {shapes} differ in their number of cells")
    return {"cells": n_cells, "seconds": seconds, "cells_per_s": n_cells / seconds, "load_seconds": t1 - t0,
            "peak_rss_mib": peak_rss_mib(), "written": shapes}


def child_train(args: argparse.Namespace) -> dict:
    from streamtotal import TOTALVI

    t0 = time.perf_counter()
    model = TOTALVI(args.store, batch_key="batch")
    model.train(max_epochs=1, run_dir=args.run, progress=False)
    return {"seconds": time.perf_counter() - t0, "peak_rss_mib": peak_rss_mib()}


def child_scvi(args: argparse.Namespace) -> dict:
    import anndata as ad
    import scvi

    scvi.settings.dl_num_workers = 0
    t0 = time.perf_counter()
    adata = ad.read_h5ad(args.store)  # scvi-tools needs the whole AnnData in memory
    if args.child == "scvi-train":
        scvi.model.TOTALVI.setup_anndata(adata, protein_expression_obsm_key="protein_expression", batch_key="batch")
        model = scvi.model.TOTALVI(adata)
        model.train(max_epochs=1, enable_progress_bar=False)
        model.save(args.run, overwrite=True)
        return {"seconds": time.perf_counter() - t0, "version": scvi.__version__}
    model = scvi.model.TOTALVI.load(args.run, adata=adata)
    t1 = time.perf_counter()
    if args.child == "scvi-latent":
        shapes = [list(model.get_latent_representation().shape)]
    else:
        shapes = [list(frame.shape) for frame in model.get_normalized_expression()]
    seconds = time.perf_counter() - t1
    return {"cells": adata.n_obs, "seconds": seconds, "cells_per_s": adata.n_obs / seconds,
            "load_seconds": t1 - t0, "peak_rss_mib": peak_rss_mib(), "shapes": shapes}


def run_child(mode: str, run: Path, store: Path) -> dict:
    """Runs one measurement in a fresh process and returns its RESULT line."""
    proc = subprocess.run([sys.executable, __file__, "--child", mode, "--run", str(run), "--store", str(store)],
                          capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    result = child_result(proc.stdout)
    if proc.returncode != 0 or result is None:
        raise SystemExit(f"{mode} on {store} failed:\n{proc.stderr[-3000:]}")
    return result


def simulate(path: Path, cells: int, args: argparse.Namespace) -> Path:
    """``streamtotal simulate`` (a Zarr store block by block, or an in-memory .h5ad), reused when present."""
    if not path.exists():
        subprocess.run([sys.executable, "-m", "streamtotal", "simulate", str(path), "--cells", str(cells),
                        "--genes", str(args.genes), "--proteins", str(args.proteins), "--batches",
                        str(args.batches), "--missing-proteins", str(args.missing_proteins)],
                       check=True, capture_output=True)
    return path


def peer(args: argparse.Namespace, work: Path, shape: str) -> dict:
    """scvi-tools' TOTALVI in memory at the ``--peer-cells`` sizes, or why it was not measured."""
    try:
        import scvi
    except ImportError:
        return {"measured": False, "why": "scvi-tools is not installed (pip install -e '.[bench]')"}
    sizes = sorted({min(int(n), args.cells) for n in args.peer_cells.split(",") if n.strip()})
    model_dir = work / "scvi_model"
    train = run_child("scvi-train", model_dir, simulate(work / f"sim{args.train_cells}_{shape}.h5ad",
                                                        args.train_cells, args))
    runs = []
    for n in sizes:
        data = simulate(work / f"sim{n}_{shape}.h5ad", n, args)
        runs.append({"cells": n, "latent": run_child("scvi-latent", model_dir, data),
                     "expression": run_child("scvi-expression", model_dir, data)})
    out = {"measured": True, "version": scvi.__version__, "model_train_seconds": train["seconds"], "runs": runs,
           "out_of_core": False,
           "why_not_at_cells": "scvi-tools' downstream methods need the AnnData in memory and return dense arrays"}
    if len(runs) >= 2:
        (a, b) = runs[-2], runs[-1]
        for what in ("latent", "expression"):
            slope = (b[what]["peak_rss_mib"] - a[what]["peak_rss_mib"]) / (b["cells"] - a["cells"])
            out[f"{what}_peak_rss_mib_extrapolated_to_cells"] = b[what]["peak_rss_mib"] + slope * (
                args.cells - b["cells"])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cells", type=int, default=1_000_000, help="cells of the large store")
    p.add_argument("--train-cells", type=int, default=20_000, help="cells of the small training store")
    p.add_argument("--genes", type=int, default=2000)
    p.add_argument("--proteins", type=int, default=50)
    p.add_argument("--batches", type=int, default=4)
    p.add_argument("--missing-proteins", type=int, default=3)
    p.add_argument("--peer-cells", default="50000,100000",
                   help="comma-separated AnnData sizes scvi-tools runs on in memory (capped at --cells)")
    p.add_argument("--no-peer", action="store_true", help="skip scvi-tools")
    p.add_argument("--workdir", default="/tmp/streamtotal_api_memory")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--run", help=argparse.SUPPRESS)
    p.add_argument("--store", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child = {"train": child_train, "latent": child_streamtotal, "expression": child_streamtotal}.get(
            args.child, child_scvi)
        print("RESULT " + json.dumps(child(args)))
        return

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    shape = f"{args.genes}x{args.proteins}x{args.batches}b{args.missing_proteins}m"
    small = simulate(work / f"sim{args.train_cells}_{shape}.zarr", args.train_cells, args)
    large = simulate(work / f"sim{args.cells}_{shape}.zarr", args.cells, args)
    run = work / "run_api_memory"
    shutil.rmtree(run, ignore_errors=True)
    train = run_child("train", run, small)
    latent = run_child("latent", run, large)
    expression = run_child("expression", run, large)
    for name, measured in (("latent", latent), ("expression", expression)):
        if measured["cells"] != args.cells:  # write_to covers every cell of the store, or the run is no measurement
            raise SystemExit(f"{name}: {measured['cells']} cells written, the store holds {args.cells}")
    peak = max(latent["peak_rss_mib"], expression["peak_rss_mib"])
    result = {"benchmark": "api_memory", "cpu_count": os.cpu_count(), "cells": args.cells, "genes": args.genes,
              "proteins": args.proteins, "batches": args.batches, "train_cells": args.train_cells,
              "model_train_seconds": train["seconds"],
              "streamtotal": {"get_latent_representation": latent, "get_normalized_expression": expression},
              "peak_rss_mib": peak, "under_2_gib": peak < 2048}
    if not args.no_peer:
        result["scvi_tools"] = peer(args, work, shape)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
