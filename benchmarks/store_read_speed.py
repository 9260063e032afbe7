"""Read speed of ZarrSource on a simulated store, against H5adSource and anndata's backed sparse reads.

Simulates an ``n_cells x n_genes`` count matrix (~``density`` non-zero) with ``n_proteins`` proteins,
writes it with ``ZarrStoreWriter`` (and as an h5ad with anndata's defaults for the peers), then times
reads the way training does them: ``chunks_per_read`` random fixed-size chunks of ``chunk_size``
consecutive cells, ids sorted, one ``read`` call each. Prints one JSON object.

    python benchmarks/store_read_speed.py [--cells 50000 --genes 2000 --density 0.1 ...]
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

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import zarr

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loaders.h5ad_source import H5adSource  # noqa: E402
from loaders.store_layout import StoreLayoutConfig  # noqa: E402
from loaders.store_writer import ZarrStoreWriter  # noqa: E402
from loaders.zarr_source import ZarrSource  # noqa: E402


def simulate_block(rng, n, n_genes, density, n_proteins):
    mask = rng.random((n, n_genes)) < density
    rows, cols = np.nonzero(mask)
    data = rng.geometric(0.5, rows.size).astype(np.float32)
    rna = sp.csr_matrix((data, (rows, cols)), shape=(n, n_genes), dtype=np.float32)
    protein = rng.poisson(rng.gamma(2.0, 20.0, (n, n_proteins))).astype(np.float32)
    return rna, protein


def read_ids(rng, n_cells, chunk_size, chunks_per_read):
    n_chunks = n_cells // chunk_size
    picked = np.sort(rng.choice(n_chunks, min(chunks_per_read, n_chunks), replace=False))
    return (picked[:, None] * chunk_size + np.arange(chunk_size)[None, :]).ravel().astype(np.int64)


def time_reads(read, rng, args) -> float:
    read(read_ids(rng, args.cells, args.chunk_size, args.chunks_per_read))  # warm-up (opens, caches)
    cells, t0 = 0, time.perf_counter()
    for _ in range(args.reads):
        ids = read_ids(rng, args.cells, args.chunk_size, args.chunks_per_read)
        read(ids)
        cells += ids.size
    return cells / (time.perf_counter() - t0)


def dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cells", type=int, default=50_000)
    p.add_argument("--genes", type=int, default=2_000)
    p.add_argument("--proteins", type=int, default=100)
    p.add_argument("--density", type=float, default=0.1)
    p.add_argument("--chunk-size", type=int, default=64, help="cells per random chunk")
    p.add_argument("--chunks-per-read", type=int, default=64, help="chunks per read call")
    p.add_argument("--reads", type=int, default=20, help="timed read calls per reader")
    p.add_argument("--chunk-cells", type=int, default=StoreLayoutConfig().chunk_cells, help="store layout")
    p.add_argument("--codec", default="lz4", help="Blosc codec of the store, or 'none'")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-peers", action="store_true", help="time ZarrSource only")
    args = p.parse_args()
    rng = np.random.default_rng(args.seed)

    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "sim.zarr"
        genes = [f"g{i}" for i in range(args.genes)]
        proteins = [f"p{i}" for i in range(args.proteins)]
        codec = None if args.codec == "none" else args.codec
        layout = StoreLayoutConfig(chunk_cells=args.chunk_cells, codec=codec)
        t0 = time.perf_counter()
        blocks = []
        with ZarrStoreWriter(store, genes, proteins, layout=layout) as w:
            for start in range(0, args.cells, 2048):
                n = min(2048, args.cells - start)
                rna, protein = simulate_block(rng, n, args.genes, args.density, args.proteins)
                w.append(rna, protein, pd.DataFrame(index=[f"c{i}" for i in range(start, start + n)]))
                if not args.no_peers:
                    blocks.append((rna, protein))
        write_s = time.perf_counter() - t0
        nnz = int(zarr.open_group(str(store), mode="r")["X/indptr"][-1])
        source = ZarrSource(store)
        result = {
            "benchmark": "store_read_speed",
            "cells": args.cells, "genes": args.genes, "proteins": args.proteins, "nnz": nnz,
            "chunk_size": args.chunk_size, "chunks_per_read": args.chunks_per_read, "reads": args.reads,
            "store_chunk_cells": args.chunk_cells, "store_codec": args.codec,
            "store_mb": round(dir_size(store) / 1e6, 1),
            "write_cells_per_s": round(args.cells / write_s),
            "zarr_source_cells_per_s": round(time_reads(source.read, rng, args)),
        }
        if not args.no_peers:
            h5ad = Path(tmp) / "sim.h5ad"
            adata = ad.AnnData(
                sp.vstack([b[0] for b in blocks]).tocsr(),
                obs=pd.DataFrame(index=[f"c{i}" for i in range(args.cells)]),
                var=pd.DataFrame(index=genes),
                obsm={"protein_expression": np.vstack([b[1] for b in blocks])},
                uns={"protein_names": np.array(proteins, dtype=object)},
            )
            del blocks
            adata.write_h5ad(h5ad)  # anndata's defaults: no compression
            result["h5ad_source_cells_per_s"] = round(time_reads(H5adSource(h5ad).read, rng, args))
            backed = ad.io.sparse_dataset(zarr.open_group(str(store), mode="r")["X"])
            protein_arr = zarr.open_group(str(store), mode="r")["obsm/protein_expression"]

            def anndata_read(ids):
                return backed[ids], protein_arr.get_orthogonal_selection((ids, slice(None)))

            result["anndata_sparse_dataset_cells_per_s"] = round(time_reads(anndata_read, rng, args))
        result.update(
            cpus=os.cpu_count(), python=platform.python_version(),
            zarr=metadata.version("zarr"), anndata=metadata.version("anndata"),
        )
        print(json.dumps(result))


if __name__ == "__main__":
    main()
