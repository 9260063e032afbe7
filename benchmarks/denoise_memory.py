"""Out-of-core inference memory: denoised RNA + protein and foreground probabilities for every cell of a large
store, written back chunk by chunk, with peak RSS (must stay under 2 GiB however many cells) and cells/s.

A small model is trained for one epoch on a 100,000-cell store; the 1,000,000-cell store (same genes, proteins and
batches: both come from ``streamtotal simulate`` with the same settings but the cell count) is then streamed
through it. Each step runs in its own process, so peak RSS (VmHWM) is the inference's own. The stores are the
ones ``benchmarks/ddp_scaling.py`` makes (simulated here if missing). Prints one JSON object.

    python benchmarks/denoise_memory.py [--cells 1000000 --workdir /tmp/streamtotal_ddp_scaling]
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


def child(args: argparse.Namespace) -> None:
    from streamtotal.inference.expression import StorePosterior

    t0 = time.perf_counter()
    post = StorePosterior(args.run, args.store, batch_size=2048, progress=False)
    result = post.compute(args.what.split(","), write_back=True, keep=False, library_size=1e4)
    seconds = time.perf_counter() - t0
    print("RESULT " + json.dumps({"cells": post.n_obs, "seconds": seconds, "cells_per_s": post.n_obs / seconds,
                                  "peak_rss_mib": peak_rss_mib(), "written": result.written}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cells", type=int, default=1_000_000)
    p.add_argument("--train-cells", type=int, default=100_000)
    p.add_argument("--genes", type=int, default=2000)
    p.add_argument("--proteins", type=int, default=100)
    p.add_argument("--what", default="rna,protein,foreground")
    p.add_argument("--workdir", default="/tmp/streamtotal_ddp_scaling")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--run", help=argparse.SUPPRESS)
    p.add_argument("--store", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    stores = {}
    for n in (args.train_cells, args.cells):
        stores[n] = work / f"sim{n}.zarr"
        if not stores[n].exists():
            subprocess.run([sys.executable, "-m", "streamtotal", "simulate", str(stores[n]), "--cells", str(n),
                            "--genes", str(args.genes), "--proteins", str(args.proteins), "--batches", "8",
                            "--missing-proteins", "5"], check=True, capture_output=True)
    run = work / "run_denoise_model"
    shutil.rmtree(run, ignore_errors=True)
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "streamtotal", "train", str(stores[args.train_cells]), "--out", str(run),
                    "--batch-key", "batch", "--epochs", "1", "--no-progress", "--checkpoint-every", "1000000"],
                   check=True, capture_output=True)
    train_seconds = time.perf_counter() - t
    proc = subprocess.run([sys.executable, __file__, "--child", "--run", str(run), "--store", str(stores[args.cells]),
                           "--what", args.what], capture_output=True, text=True,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    result = child_result(proc.stdout)
    if proc.returncode != 0 or result is None:
        raise SystemExit(proc.stderr[-3000:])
    print(json.dumps({"benchmark": "denoise_memory", "cpu_count": os.cpu_count(), "what": args.what.split(","),
                      "genes": args.genes, "proteins": args.proteins, "model_train_seconds": train_seconds,
                      **result, "under_2_gib": result["peak_rss_mib"] < 2048}, indent=1))


if __name__ == "__main__":
    main()
