"""Read speed of SomaSource on a simulated TileDB-SOMA Experiment, against ZarrSource on the same data and
tiledbsoma's own ExperimentAxisQuery.

Simulates an ``n_cells x n_genes`` count matrix (~``density`` non-zero) with ``n_proteins`` proteins,
writes it with ``SomaExperimentWriter`` and ``ZarrStoreWriter``, then times reads the way training does
them: ``chunks_per_read`` random chunks of ``chunk_size`` consecutive cells, ids sorted, one ``read``
call each (RNA and protein). Prints one JSON object.

    python benchmarks/soma_read_speed.py [--cells 20000 --genes 2000 --density 0.1 ...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

import numpy as np
import pandas as pd
import tiledbsoma

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.store_read_speed import dir_size, simulate_block, time_reads  # noqa: E402
from loaders.ingest.soma_writer import SomaExperimentWriter  # noqa: E402
from loaders.soma_layout import SomaLayoutConfig  # noqa: E402
from loaders.soma_source import SomaSource  # noqa: E402
from loaders.store_writer import ZarrStoreWriter  # noqa: E402
from loaders.zarr_source import ZarrSource  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cells", type=int, default=20_000)
    p.add_argument("--genes", type=int, default=2_000)
    p.add_argument("--proteins", type=int, default=100)
    p.add_argument("--density", type=float, default=0.1)
    p.add_argument("--chunk-size", type=int, default=64, help="cells per random chunk")
    p.add_argument("--chunks-per-read", type=int, default=64, help="chunks per read call")
    p.add_argument("--reads", type=int, default=10, help="timed read calls per reader")
    p.add_argument("--tile-cells", type=int, default=SomaLayoutConfig().tile_cells, help="SOMA layout")
    p.add_argument("--codec", default=SomaLayoutConfig().codec, help="SOMA codec: zstd or lz4")
    p.add_argument("--block-cells", type=int, default=8192, help="cells per written block (fragment)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-peers", action="store_true", help="time SomaSource only")
    args = p.parse_args()
    rng = np.random.default_rng(args.seed)

    with tempfile.TemporaryDirectory() as tmp:
        genes = [f"g{i}" for i in range(args.genes)]
        proteins = [f"p{i}" for i in range(args.proteins)]
        obs = pd.DataFrame(index=[f"c{i}" for i in range(args.cells)])
        uri, zpath = Path(tmp) / "sim.soma", Path(tmp) / "sim.zarr"
        blocks = [
            simulate_block(rng, min(args.block_cells, args.cells - s), args.genes, args.density, args.proteins)
            for s in range(0, args.cells, args.block_cells)
        ]
        t0 = time.perf_counter()
        layout = SomaLayoutConfig(tile_cells=args.tile_cells, codec=args.codec)
        with SomaExperimentWriter(uri, genes, proteins, obs, study_name="sim", layout=layout) as w:
            for rna, protein in blocks:
                w.append(rna, protein)
        write_s = time.perf_counter() - t0
        source = SomaSource(uri)
        result = {
            "benchmark": "soma_read_speed",
            "cells": args.cells, "genes": args.genes, "proteins": args.proteins,
            "nnz": int(sum(b[0].nnz for b in blocks)),
            "chunk_size": args.chunk_size, "chunks_per_read": args.chunks_per_read, "reads": args.reads,
            "tile_cells": args.tile_cells, "codec": args.codec, "block_cells": args.block_cells,
            "soma_mb": round(dir_size(uri) / 1e6, 1),
            "soma_write_cells_per_s": round(args.cells / write_s),
            "soma_source_cells_per_s": round(time_reads(source.read, rng, args)),
        }
        if not args.no_peers:
            with ZarrStoreWriter(zpath, genes, proteins) as w:
                start = 0
                for rna, protein in blocks:
                    w.append(rna, protein, obs.iloc[start : start + rna.shape[0]])
                    start += rna.shape[0]
            result["zarr_mb"] = round(dir_size(zpath) / 1e6, 1)
            result["zarr_source_cells_per_s"] = round(time_reads(ZarrSource(zpath).read, rng, args))
            exp = tiledbsoma.Experiment.open(str(uri))

            def axis_query_read(ids):
                # The tiledbsoma way: one query per measurement, X as a scipy matrix re-indexed to the query.
                out = []
                for ms in ("RNA", "prot"):
                    with exp.axis_query(ms, obs_query=tiledbsoma.AxisQuery(coords=(ids,))) as q:
                        out.append(q.to_anndata("data").X)
                return out

            result["tiledbsoma_axis_query_cells_per_s"] = round(time_reads(axis_query_read, rng, args))
        result.update(
            cpus=os.cpu_count(), python=platform.python_version(), tiledbsoma=metadata.version("tiledbsoma"),
            zarr=metadata.version("zarr"),
        )
        print(json.dumps(result))


if __name__ == "__main__":
    main()
