"""DDP scaling and memory flatness of streaming training.

1. Scaling: one epoch on the 100k-cell store with torchrun on 1 and 2 processes (CPU, gloo; threads split so the
   cores are not oversubscribed), cells/s of each and their ratio. On the GPU machine add ``--device cuda``.
2. Flatness: one epoch end to end (open, priors, train, validate, checkpoint) on a 100,000-cell and a 1,000,000-cell
   store (2,000 genes x 100 proteins), single process: cells/s and peak RSS of each; the RSS ratio must stay near 1
   because nothing but buffers lives in memory.

Stores are simulated with ``streamtotal simulate`` (block by block) in a subprocess, and every run is a subprocess,
so this process stays small and peak RSS (RUSAGE_CHILDREN: the largest finished descendant) is the training
process's own. Prints one JSON object.

    python benchmarks/ddp_scaling.py [--small 100000 --large 1000000 --genes 2000 --proteins 100 --workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path


def children_peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0


def run(cmd: list[str], env: dict | None = None) -> tuple[dict, float]:
    """Runs a command in a fresh process whose children's peak RSS is read from a sub-shell."""
    probe = ("import json,resource,subprocess,sys,time;t=time.perf_counter();"
             "p=subprocess.run(sys.argv[1:],capture_output=True,text=True);"
             "print(json.dumps({'rc':p.returncode,'out':p.stdout[-4000:],'err':p.stderr[-4000:],"
             "'seconds':time.perf_counter()-t,"
             "'rss':resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss/1024}))")
    proc = subprocess.run([sys.executable, "-c", probe, *cmd], capture_output=True, text=True,
                          env={**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})})
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if result["rc"] != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{result['err']}")
    summary = json.loads([l for l in result["out"].splitlines() if l.startswith("{")][-1])
    return {**summary, "wall_seconds": result["seconds"]}, result["rss"]


def simulate(path: Path, cells: int, genes: int, proteins: int) -> float:
    if path.exists():
        return 0.0
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "streamtotal", "simulate", str(path), "--cells", str(cells), "--genes",
                    str(genes), "--proteins", str(proteins), "--batches", "8", "--missing-proteins", "5"],
                   check=True, capture_output=True)
    return time.perf_counter() - t


def train_cmd(store: Path, out: Path, nproc: int, device: str, threads: int) -> list[str]:
    args = ["train", str(store), "--out", str(out), "--batch-key", "batch", "--epochs", "1", "--no-progress",
            "--checkpoint-every", "1000000", "--device", device, "--threads", str(threads)]
    if nproc == 1:
        return [sys.executable, "-m", "streamtotal", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "streamtotal", *args]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", type=int, default=100_000)
    p.add_argument("--large", type=int, default=1_000_000)
    p.add_argument("--genes", type=int, default=2000)
    p.add_argument("--proteins", type=int, default=100)
    p.add_argument("--device", default="cpu")
    p.add_argument("--workdir", default="/tmp/streamtotal_ddp_scaling")
    p.add_argument("--parts", default="scaling,flatness", help="comma-separated subset of scaling,flatness")
    args = p.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    cores = os.cpu_count() or 1
    out: dict = {"benchmark": "ddp_scaling", "cpu_count": cores, "device": args.device,
                 "data": {"genes": args.genes, "proteins": args.proteins, "small_cells": args.small,
                          "large_cells": args.large}}
    small, large = work / f"sim{args.small}.zarr", work / f"sim{args.large}.zarr"
    out["simulate_seconds"] = {"small": simulate(small, args.small, args.genes, args.proteins),
                               "large": simulate(large, args.large, args.genes, args.proteins)}

    parts = set(args.parts.split(","))
    scaling = {}
    for nproc in (1, 2) if "scaling" in parts else ():
        run_dir = work / f"run_small_np{nproc}"
        subprocess.run(["rm", "-rf", str(run_dir)], check=True)
        summary, rss = run(train_cmd(small, run_dir, nproc, args.device, max(1, cores // nproc)),
                           env={"OMP_NUM_THREADS": str(max(1, cores // nproc))})
        scaling[f"{nproc}_process"] = {"cells_per_s": summary["cells_per_s"], "wall_seconds": summary["wall_seconds"],
                                       "peak_rss_mib_largest_process": rss,
                                       "validation_neg_elbo": summary["validation_neg_elbo"]}
    if scaling:
        scaling["speedup_2_vs_1"] = scaling["2_process"]["cells_per_s"] / scaling["1_process"]["cells_per_s"]
        out["scaling_small"] = scaling

    flat = {}
    for name, store in (("small", small), ("large", large)) if "flatness" in parts else ():
        run_dir = work / f"run_{name}_flat"
        subprocess.run(["rm", "-rf", str(run_dir)], check=True)
        summary, rss = run(train_cmd(store, run_dir, 1, args.device, cores))
        cells = args.small if name == "small" else args.large
        flat[name] = {"cells": cells, "train_cells_per_s": summary["cells_per_s"],
                      "end_to_end_cells_per_s": cells / summary["wall_seconds"],
                      "wall_seconds": summary["wall_seconds"], "peak_rss_mib": rss}
    if flat:
        flat["peak_rss_ratio_large_vs_small"] = flat["large"]["peak_rss_mib"] / flat["small"]["peak_rss_mib"]
        out["memory_flatness"] = flat
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
