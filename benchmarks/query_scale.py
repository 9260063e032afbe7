"""Query mapping at scale: a 1,000,000-cell query mapped onto a small reference, streamed and checkpointed, with a
SIGKILL in the middle and a ``--resume`` that must end exactly where an uninterrupted run ends.

1. Reference: ``--reference-cells`` simulated cells (its batches renamed ``ref_k``, so every query batch is new),
   trained briefly with ``streamtotal train``.
2. Query: ``--query-cells`` cells x ``--genes`` x ``--proteins`` simulated into a Zarr store block by block
   (``streamtotal simulate``, same simulator settings and seed as the reference: same cell types, genes and
   proteins; the settings are those of ``benchmarks/ddp_scaling.py``, whose store ``--query-store`` can reuse).
3. Uninterrupted map (scArches recipe: only the new batches' covariate weights train), checkpointing every
   ``--checkpoint-every`` steps: cells/s, peak RSS (VmHWM of the mapping process) and the checkpoint overhead,
   measured as the wall time spent inside the trainer's checkpoint writes over the time of the whole fit.
4. Kill and resume: the same map in a fresh run directory, killed with SIGKILL at step ``--kill-fraction`` of
   the run (not at a checkpoint: the steps after the last checkpoint are lost, as in a real crash), then
   ``--resume``. Checked: the resumed run ends at the same step with bit-identical weights, and the cells
   trained (the killed run's up to its last checkpoint + the resumed run's) are exactly the uninterrupted run's,
   in the same order, every training cell once per epoch.

Every map runs in its own process, so peak RSS is the mapping's own. Prints one JSON object.

    python benchmarks/query_scale.py [--query-cells 1000000 --reference-cells 20000 --genes 2000 --proteins 100
                                      --epochs 1 --workdir /tmp/streamtotal_query_scale --query-store STORE]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from _common import child_result, peak_rss_mib

SIM_ARGS = {"cell_types": 6, "batches": 8, "missing_proteins": 5, "seed": 0}  # as benchmarks/ddp_scaling.py


# ---------------------------------------------------------------------------------------------- the child process
def child(args: argparse.Namespace) -> None:
    """One map in this process: build the query trainer, time its checkpoints, record the cells of every step."""
    from streamtotal.surgery.map_query import build_query_trainer

    t0 = time.perf_counter()
    trainer, _ = build_query_trainer(args.reference, [args.query], args.out, epochs=args.epochs, batch_key="batch",
                                     train={"progress": False, "checkpoint_every_steps": args.checkpoint_every},
                                     resume=args.resume, verbose=False)
    setup_seconds = time.perf_counter() - t0
    timing = {"seconds": 0.0, "count": 0}
    write_checkpoint = trainer._checkpoint

    def timed_checkpoint() -> None:
        t = time.perf_counter()
        write_checkpoint()
        timing["seconds"] += time.perf_counter() - t
        timing["count"] += 1

    trainer._checkpoint = timed_checkpoint
    seen: list[np.ndarray] = []
    train_step = trainer._train_step

    def recording_step(batch, weight):
        seen.append(batch.cell_id.cpu().numpy().astype(np.int32))
        return train_step(batch, weight)

    trainer._train_step = recording_step
    start_step = trainer.step
    kill_at = None
    if args.kill_fraction:
        kill_at = max(1, int(trainer.total_steps * args.kill_fraction))
        if kill_at % args.checkpoint_every == 0:  # a kill right after a checkpoint would lose nothing
            kill_at += 1
    t1 = time.perf_counter()
    summary = trainer.fit(stop_after_steps=kill_at)
    fit_seconds = time.perf_counter() - t1
    np.savez(Path(args.out) / f"seen-{args.tag}.npz", ids=np.concatenate(seen) if seen else np.zeros(0, np.int32),
             lengths=np.asarray([len(s) for s in seen], dtype=np.int64))
    cells = int(sum(len(s) for s in seen))
    print("RESULT " + json.dumps({
        "start_step": start_step, "steps": summary.steps, "total_steps": trainer.total_steps,
        "steps_per_epoch": trainer.steps_per_epoch, "train_cells": len(trainer.train_ids),
        "cells_trained": cells, "setup_seconds": setup_seconds, "fit_seconds": fit_seconds,
        "cells_per_s": summary.cells_per_second, "checkpoint_seconds": timing["seconds"],
        "checkpoints": timing["count"], "peak_rss_mib": peak_rss_mib(), "killed_at_step": kill_at,
    }), flush=True)
    if kill_at is not None:
        os.kill(os.getpid(), signal.SIGKILL)  # no graceful stop: the steps since the last checkpoint are lost


def run_child(tag: str, args: argparse.Namespace, reference: Path, query: Path, out: Path, *, resume: bool = False,
              kill_fraction: float = 0.0) -> dict:
    cmd = [sys.executable, __file__, "--child", "--tag", tag, "--reference", str(reference), "--query", str(query),
           "--out", str(out), "--epochs", str(args.epochs), "--checkpoint-every", str(args.checkpoint_every),
           "--kill-fraction", str(kill_fraction)] + (["--resume"] if resume else [])
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    wall = time.perf_counter() - t
    result = child_result(proc.stdout)
    expected = -signal.SIGKILL if kill_fraction else 0
    if proc.returncode != expected or result is None:
        raise SystemExit(f"map {tag} exited with {proc.returncode} (expected {expected}):\n{proc.stderr[-4000:]}")
    return {**result, "returncode": proc.returncode, "wall_seconds": wall}


# ---------------------------------------------------------------------------------------------- data and reference
def simulate_query(path: Path, cells: int, genes: int, proteins: int) -> float:
    if path.exists():
        return 0.0
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "streamtotal", "simulate", str(path), "--cells", str(cells), "--genes",
                    str(genes), "--proteins", str(proteins), "--cell-types", str(SIM_ARGS["cell_types"]),
                    "--batches", str(SIM_ARGS["batches"]), "--missing-proteins", str(SIM_ARGS["missing_proteins"]),
                    "--seed", str(SIM_ARGS["seed"])], check=True, capture_output=True)
    return time.perf_counter() - t


def simulate_reference(path: Path, cells: int, genes: int, proteins: int) -> float:
    """The reference store, batches renamed ``ref_k`` so that the query's ``batch_k`` are all new batches."""
    from loaders.store_writer import ZarrStoreWriter
    from streamtotal.simulate import CiteSimulator, SimulationConfig

    if path.exists():
        return 0.0
    t = time.perf_counter()
    sim = CiteSimulator(SimulationConfig(n_cells=cells, n_genes=genes, n_proteins=proteins,
                                         n_cell_types=SIM_ARGS["cell_types"], n_batches=SIM_ARGS["batches"],
                                         n_missing_proteins=SIM_ARGS["missing_proteins"], seed=SIM_ARGS["seed"]))
    writer = ZarrStoreWriter(path, sim.gene_names, sim.protein_names, panel_key="batch", source_file="query_scale")
    for rna, protein, obs in sim.blocks():
        obs = obs.copy()
        obs["batch"] = obs["batch"].astype(str).str.replace("batch_", "ref_").astype("category")
        writer.append(rna, protein, obs)
    writer.close()
    return time.perf_counter() - t


def train_reference(store: Path, run: Path, epochs: int) -> float:
    if (run / "model.pt").is_file():
        return 0.0
    shutil.rmtree(run, ignore_errors=True)
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "streamtotal", "train", str(store), "--out", str(run), "--batch-key", "batch",
                    "--labels-key", "cell_type", "--epochs", str(epochs), "--no-progress"], check=True,
                   capture_output=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    return time.perf_counter() - t


# ---------------------------------------------------------------------------------------------- checks
def compare_weights(a: Path, b: Path) -> list[str]:
    import torch

    sa = torch.load(a / "model.pt", map_location="cpu", weights_only=True)["model"]
    sb = torch.load(b / "model.pt", map_location="cpu", weights_only=True)["model"]
    return sorted(k for k in set(sa) | set(sb) if k not in sa or k not in sb or not torch.equal(sa[k], sb[k]))


def compare_cells(full_dir: Path, resumed_dir: Path, resumed_from: int, steps_per_epoch: int,
                  train_cells: int) -> dict:
    full = np.load(full_dir / "seen-full.npz")
    killed = np.load(resumed_dir / "seen-killed.npz")
    resumed = np.load(resumed_dir / "seen-resumed.npz")
    kept = int(killed["lengths"][:resumed_from].sum())  # the killed run's steps up to its last checkpoint
    joined = np.concatenate([killed["ids"][:kept], resumed["ids"]])
    same = joined.shape == full["ids"].shape and bool((joined == full["ids"]).all())
    # Every training cell exactly once per epoch (of the joined, interrupted-then-resumed run).
    bounds = np.concatenate([[0], np.cumsum(np.concatenate([killed["lengths"][:resumed_from], resumed["lengths"]]))])
    once = True
    for e in range(0, len(bounds) - 1, steps_per_epoch):
        ids = joined[bounds[e]: bounds[min(e + steps_per_epoch, len(bounds) - 1)]]
        once &= len(ids) == train_cells and len(np.unique(ids)) == train_cells
    return {"cells_same_order_as_uninterrupted": same, "every_training_cell_once_per_epoch": bool(once),
            "cells_lost_to_kill_and_redone": int(killed["lengths"][resumed_from:].sum())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--query-cells", type=int, default=1_000_000)
    p.add_argument("--reference-cells", type=int, default=20_000)
    p.add_argument("--genes", type=int, default=2000)
    p.add_argument("--proteins", type=int, default=100)
    p.add_argument("--reference-epochs", type=int, default=3, help="brief reference training (default 3)")
    p.add_argument("--epochs", type=int, default=1, help="query epochs (default 1)")
    p.add_argument("--checkpoint-every", type=int, help="steps between checkpoints (default: a tenth of the run)")
    p.add_argument("--kill-fraction", type=float, default=0.6, help="where in the run the SIGKILL lands")
    p.add_argument("--query-store", help="reuse this query store (simulated with the settings above)")
    p.add_argument("--workdir", default="/tmp/streamtotal_query_scale")
    p.add_argument("--reuse-full-map", action="store_true",
                   help="keep the uninterrupted map an earlier invocation finished in WORKDIR (rerun only the "
                   "kill-and-resume stage)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    for hidden in ("--tag", "--reference", "--query", "--out"):
        p.add_argument(hidden, help=argparse.SUPPRESS)
    p.add_argument("--resume", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    ref_store = work / f"reference{args.reference_cells}_{args.genes}x{args.proteins}.zarr"
    shape = f"{args.genes}x{args.proteins}"
    query = Path(args.query_store) if args.query_store else work / f"query{args.query_cells}_{shape}.zarr"
    ref_run = work / f"reference_run{args.reference_cells}_{args.genes}x{args.proteins}"
    out: dict = {"benchmark": "query_scale", "cpu_count": os.cpu_count(),
                 "data": {"reference_cells": args.reference_cells, "query_cells": args.query_cells,
                          "genes": args.genes, "proteins": args.proteins, "query_store": str(query),
                          "simulator": SIM_ARGS}}
    if not args.reuse_full_map:
        (work / "partial.json").unlink(missing_ok=True)
    out["simulate_seconds"] = {"reference": simulate_reference(ref_store, args.reference_cells, args.genes,
                                                               args.proteins),
                               "query": simulate_query(query, args.query_cells, args.genes, args.proteins)}
    out["reference_train_seconds"] = train_reference(ref_store, ref_run, args.reference_epochs)
    if args.checkpoint_every is None:
        train_cells = int(args.query_cells * 0.9)  # the default validation fraction holds out a tenth
        steps = args.epochs * -(-train_cells // 256)
        args.checkpoint_every = max(1, steps // 10)

    full_dir, resumed_dir = work / "map_full", work / "map_killed"
    shutil.rmtree(resumed_dir, ignore_errors=True)
    earlier = reusable_full_map(work, full_dir) if args.reuse_full_map else None
    if earlier is not None:
        out["map"], full = earlier
        out["map"]["reused_from_an_earlier_invocation"] = True
    else:
        out["map"], full = map_uninterrupted(args, ref_run, query, full_dir)
    save_partial(work, out)
    killed = run_child("killed", args, ref_run, query, resumed_dir, kill_fraction=args.kill_fraction)
    resumed = run_child("resumed", args, ref_run, query, resumed_dir, resume=True)
    differ = compare_weights(full_dir, resumed_dir)
    out["kill_and_resume"] = {
        "killed_at_step": killed["killed_at_step"], "killed_returncode": killed["returncode"],
        "resumed_from_step": resumed["start_step"], "resumed_final_step": resumed["steps"],
        "uninterrupted_final_step": full["steps"], "same_final_step": resumed["steps"] == full["steps"],
        "weights_bit_identical": not differ, "tensors_differing": differ[:20],
        **compare_cells(full_dir, resumed_dir, resumed["start_step"], full["steps_per_epoch"], full["train_cells"]),
        "resumed_peak_rss_mib": resumed["peak_rss_mib"], "resumed_wall_seconds": resumed["wall_seconds"],
    }
    save_partial(work, out)
    print(json.dumps(out, indent=1))


def map_uninterrupted(args: argparse.Namespace, ref_run: Path, query: Path, full_dir: Path) -> tuple[dict, dict]:
    """The measured, uninterrupted map: its figures, and what the kill-and-resume check compares against."""
    shutil.rmtree(full_dir, ignore_errors=True)
    full = run_child("full", args, ref_run, query, full_dir)
    figures = {
        "query_cells": args.query_cells, "epochs": args.epochs, "steps": full["steps"],
        "train_cells": full["train_cells"],
        "train_cells_per_s": full["cells_per_s"],
        "end_to_end_query_cells_per_s": args.query_cells * args.epochs / full["wall_seconds"],
        "fit_seconds": full["fit_seconds"], "setup_seconds": full["setup_seconds"],
        "wall_seconds": full["wall_seconds"], "peak_rss_mib": full["peak_rss_mib"],
        "checkpoint_every_steps": args.checkpoint_every, "checkpoints_written": full["checkpoints"],
        "checkpoint_seconds": full["checkpoint_seconds"],
        "checkpoint_overhead_fraction": full["checkpoint_seconds"] / full["fit_seconds"],
    }
    (full_dir / "result.json").write_text(json.dumps({"figures": figures, "full": full}))
    return figures, full


def reusable_full_map(work: Path, full_dir: Path) -> tuple[dict, dict] | None:
    """An uninterrupted map finished by an earlier invocation (``--reuse-full-map``: when only the kill-and-resume
    stage was stopped), as ``(figures, child result)``; None when there is none."""
    if (full_dir / "result.json").is_file():
        saved = json.loads((full_dir / "result.json").read_text())
        return saved["figures"], saved["full"]
    partial = work / "partial.json"
    if not ((full_dir / "model.pt").is_file() and (full_dir / "seen-full.npz").is_file() and partial.is_file()):
        return None
    figures = json.loads(partial.read_text()).get("map")
    if figures is None:
        return None
    seen = np.load(full_dir / "seen-full.npz")
    epochs = figures["epochs"]
    full = {"steps": figures["steps"], "steps_per_epoch": figures["steps"] // epochs,
            "train_cells": len(seen["ids"]) // epochs}
    return figures, full


def save_partial(work: Path, out: dict) -> None:
    """The figures so far, in ``WORKDIR/partial.json``: a long run stopped half-way still leaves its first stage."""
    (work / "partial.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
