"""Loader throughput, memory and shuffle quality: one shuffled epoch of RNA + protein from every backend.

Simulated data (default 100,000 cells x 2,000 genes x 100 proteins, 4 batches stored contiguously, as studies
are) is written once per backend; each measurement then runs in its own process, so its peak RSS (VmHWM) is its
own, one after the other, so they do not compete for cores:

- streamtotal from a local Zarr store, a backed h5ad file, a TileDB-SOMA Experiment and a LaminDB collection (when
  those backends are installed);
- object storage: the Zarr store as ingested for object storage (``ingest --out s3://...``: 2,048-cell chunks, each
  one request; also measured on local disk), the default Zarr store (64-cell chunks, through the proxy only: what
  object storage costs without that layout) and the SOMA Experiment on S3 (a moto server on 127.0.0.1, in its own
  process), read directly and through ``latency_proxy.LatencyProxy`` (``--s3-latency-ms``, 20 ms per request by default: real
  S3's round trip, loopback only), with the requests issued and bytes read per cell the proxy counted, and
  ``s3_proxy_zarr_vs_local_ratio`` / ``s3_proxy_soma_vs_local_ratio`` (cells/s through the proxy over the default
  store of the same backend on local disk, in the same run; for Zarr also over the object-storage layout on local
  disk, ``s3_proxy_zarr_vs_local_same_layout_ratio``);
- the peers on the same files: tiledbsoma-ml 0.1.0 (RNA only: it has no protein path) on the same SOMA store,
  as its users run it (the criterion) and again with the TileDB read settings streamtotal's SomaSource uses
  (``READ_CONFIG_DEFAULTS``: no heap trim after each query), and LaminDB's MappedCollection on the same h5ad.

Shuffle quality: for every minibatch, the total-variation distance between its batch (study) composition and the
whole data's; averaged, and scaled so 0 = as mixed as a full random permutation and 1 = as unmixed as reading in
order. Prints one JSON object.

    python benchmarks/loader_throughput.py [--cells 100000 --genes 2000 --proteins 100] [--s3-latency-ms 20]
    python benchmarks/loader_throughput.py --object-storage-only   # local Zarr/SOMA and the S3 part, no peers
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from _common import child_result, peak_rss_mib
from latency_proxy import LatencyProxy

BATCH_SIZE = 256


def mixing_tvd(batch_codes: np.ndarray, order: np.ndarray, batch_size: int) -> float:
    """Mean total-variation distance between each minibatch's batch composition and the global one."""
    n_cat = int(batch_codes.max()) + 1
    overall = np.bincount(batch_codes, minlength=n_cat) / len(batch_codes)
    tvds = []
    for start in range(0, len(order) - batch_size + 1, batch_size):
        counts = np.bincount(batch_codes[order[start : start + batch_size]], minlength=n_cat) / batch_size
        tvds.append(0.5 * np.abs(counts - overall).sum())
    return float(np.mean(tvds))


# ----------------------------------------------------------------------------- data
def prepare(args: argparse.Namespace, work: Path) -> dict:
    from loaders.ingest import ingest
    from loaders.store_layout import StoreLayoutConfig
    from streamtotal.simulate import CiteSimulator, SimulationConfig

    sim = CiteSimulator(SimulationConfig(n_cells=args.cells, n_genes=args.genes, n_proteins=args.proteins,
                                         n_batches=4, n_missing_proteins=0, seed=0))
    adata = sim.to_anndata()
    adata.obsm["protein_expression"] = adata.obsm["protein_expression"].to_numpy()
    adata.write_h5ad(work / "data.h5ad")
    np.save(work / "batch_codes.npy", adata.obs["batch"].cat.codes.to_numpy().astype(np.int64))
    del adata
    ingest(work / "data.h5ad", work / "data.zarr", batch_key="batch", progress=False, overwrite=True)
    # What a store on object storage is: ingested there (`ingest --out s3://...`), or locally with
    # `--chunk-cells 2048` and uploaded; its chunks are ~2,048 cells, as each one costs a request.
    ingest(work / "data.h5ad", work / "data_object_layout.zarr", batch_key="batch", progress=False, overwrite=True,
           layout=StoreLayoutConfig.for_destination("s3://bench/data.zarr"))
    made = {"zarr": str(work / "data.zarr"), "zarr_object_layout": str(work / "data_object_layout.zarr"),
            "h5ad": str(work / "data.h5ad")}
    try:
        from loaders.ingest.soma_ingest import ingest_soma  # the TileDB-SOMA backend, when installed

        ingest_soma(work / "data.h5ad", str(work / "data.soma"), batch_key="batch", progress=False, overwrite=True)
        made["soma"] = str(work / "data.soma")
    except ImportError:
        pass
    return made


LAMIN_INSTANCE = "streamtotal-bench"


def lamin_env(work: Path) -> dict:
    """lamindb settings, cache and HOME inside the work dir, so the benchmark leaves nothing behind."""
    base = work / "lamin"
    return {"LAMIN_SETTINGS_DIR": str(base / "settings"), "LAMIN_CACHE_DIR": str(base / "cache"),
            "HOME": str(base / "home")}


def setup_lamin(work: Path) -> dict:
    """A local LaminDB instance (SQLite) holding the h5ad and the Zarr store as artifacts of two collections."""
    import shutil

    base = work / "lamin"
    for sub in ("settings", "cache", "home", "storage"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    # Offline, lamindb registers files in place only under its storage root.
    shutil.copy(work / "data.h5ad", base / "storage" / "data.h5ad")
    shutil.copytree(work / "data.zarr", base / "storage" / "data.zarr", dirs_exist_ok=True)
    os.chdir(base)
    import lamindb_setup as ln_setup

    ln_setup.init(storage=str(base / "storage"), name=LAMIN_INSTANCE)
    import lamindb as ln

    h5ad = ln.Artifact(str(base / "storage" / "data.h5ad"), key="bench/data.h5ad").save()
    zarr_artifact = ln.Artifact(str(base / "storage" / "data.zarr"), key="bench/data.zarr").save()
    ln.Collection([h5ad], key="bench-h5ad").save()
    ln.Collection([zarr_artifact], key="bench-zarr").save()
    return {"slug": ln_setup.settings.instance.slug}


def start_s3(work: Path, uploads: dict[str, str]) -> tuple[subprocess.Popen, dict]:
    """Starts moto's S3 server in its own process on a free loopback port and uploads ``uploads`` (key under bucket
    ``bench`` -> local store directory)."""
    import s3fs

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    for _ in range(100):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                break
        except OSError:
            time.sleep(0.1)
    fs = s3fs.S3FileSystem(key="bench", secret="bench", client_kwargs={"endpoint_url": env["AWS_ENDPOINT_URL"]})
    fs.mkdir("bench")
    for key, path in uploads.items():
        fs.put(path, f"bench/{key}", recursive=True)
    return server, env


def measure_object_storage(made: dict, work: Path, num_workers: int, latency_ms: float) -> dict:
    """The Zarr store (in its object-storage layout, and in the local one for comparison) and the SOMA Experiment
    on moto's S3, read directly and through the latency proxy."""
    uploads = {"data.zarr": made["zarr_object_layout"], "data_64_cell_chunks.zarr": made["zarr"]}
    if "soma" in made:
        uploads["data.soma"] = made["soma"]
    server, env = start_s3(work, uploads)
    results = {}
    try:
        port = int(env["AWS_ENDPOINT_URL"].rsplit(":", 1)[1])
        targets = [("zarr", "s3://bench/data.zarr", True), ("zarr_64_cell_chunks", "s3://bench/data_64_cell_chunks.zarr",
                                                              False)]
        if "soma" in made:
            targets.append(("soma", "s3://bench/data.soma", True))
        for backend, url, direct in targets:
            if direct:
                results[f"streamtotal_s3_{backend}"] = measure("s3", "streamtotal", url, work, num_workers, env)
            # A proxy per measurement: its counts are this measurement's own.
            with LatencyProxy("127.0.0.1", port, latency_s=latency_ms / 1000, max_connections=512,
                              lifetime_s=3600) as proxy:
                proxied = {**env, "AWS_ENDPOINT_URL": proxy.endpoint_url}
                r = measure("s3", "streamtotal", url, work, num_workers, proxied)
                stats = proxy.stats
            if "cells" in r:
                r.update(latency_ms=latency_ms, requests=stats.requests, bytes_read=stats.bytes_to_client,
                         requests_per_cell=stats.requests / r["cells"],
                         bytes_per_cell=stats.bytes_to_client / r["cells"])
            results[f"streamtotal_s3_proxy_{backend}"] = r
    finally:
        server.terminate()
        server.wait()
    return results


# ----------------------------------------------------------------------------- one measurement per process
def run_streamtotal(target: str, work: Path, num_workers: int) -> dict:
    import torch

    from loaders import Collection, StreamConfig, StreamLoader

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    from streamtotal.data import open_sources

    sources, _ = open_sources([target])
    collection = Collection(sources, batch_key="batch")
    loader = StreamLoader(collection, np.arange(collection.n_obs),
                          StreamConfig(batch_size=BATCH_SIZE, seed=0, num_workers=num_workers))
    loader.set_epoch(1)
    t1 = time.perf_counter()
    order, n = [], 0
    for batch in loader:
        n += len(batch)
        order.append(batch.cell_id.numpy())
        assert batch.protein.shape[1] > 0
    t2 = time.perf_counter()
    order = np.concatenate(order)
    assert np.array_equal(np.sort(order), np.arange(collection.n_obs)), "an epoch must see every cell once"
    np.save(work / f"order_{os.getpid()}.npy", order)
    return {"cells_per_s": n / (t2 - t1), "open_seconds": t1 - t0, "cells": n, "modalities": "rna+protein",
            "peak_rss_mib": peak_rss_mib(), "order_file": str(work / f"order_{os.getpid()}.npy"),
            "chunk_size": loader.config.chunk_size, "io_chunks": loader.config.io_chunks}


def run_tiledbsoma_ml(target: str, work: Path, num_workers: int, tiledb_config: dict | None = None) -> dict:
    import tiledbsoma
    import tiledbsoma_ml
    import torch

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    context = tiledbsoma.SOMATileDBContext(tiledb_config=tiledb_config) if tiledb_config else None
    with tiledbsoma.Experiment.open(target, context=context) as exp:
        with exp.axis_query(measurement_name="RNA") as query:
            dataset = tiledbsoma_ml.ExperimentDataset(query, layer_name="data", batch_size=BATCH_SIZE, shuffle=True,
                                                      seed=0, obs_column_names=["soma_joinid"])
            loader = tiledbsoma_ml.experiment_dataloader(dataset, num_workers=num_workers)
            t1 = time.perf_counter()
            n, order = 0, []
            for x, obs in loader:
                n += x.shape[0]
                order.append(obs["soma_joinid"].to_numpy())
            t2 = time.perf_counter()
    order = np.concatenate(order)
    np.save(work / f"order_{os.getpid()}.npy", order)
    return {"cells_per_s": n / (t2 - t1), "open_seconds": t1 - t0, "cells": n, "modalities": "rna",
            "version": tiledbsoma_ml.__version__, "peak_rss_mib": peak_rss_mib(),
            "order_file": str(work / f"order_{os.getpid()}.npy")}


def run_mapped_collection(target: str, work: Path, num_workers: int) -> dict:
    import lamindb as ln
    import torch

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    collection = ln.DB(target).Collection.get(key="bench-h5ad")
    mapped = collection.mapped(obsm_keys=["protein_expression"], obs_keys=["batch"])
    order = np.random.default_rng(0).permutation(len(mapped))  # its shuffle: a full random permutation
    loader = torch.utils.data.DataLoader(mapped, batch_size=BATCH_SIZE, sampler=order.tolist(),
                                         num_workers=num_workers)
    t1 = time.perf_counter()
    n = 0
    for batch in loader:
        n += batch["X"].shape[0]
        assert batch["obsm_protein_expression"].shape[0] == batch["X"].shape[0]
    t2 = time.perf_counter()
    mapped.close()
    np.save(work / f"order_{os.getpid()}.npy", order)
    return {"cells_per_s": n / (t2 - t1), "open_seconds": t1 - t0, "cells": n, "modalities": "rna+protein",
            "version": ln.__version__, "peak_rss_mib": peak_rss_mib(),
            "order_file": str(work / f"order_{os.getpid()}.npy")}


def run_tiledbsoma_ml_tuned(target: str, work: Path, num_workers: int) -> dict:
    """tiledbsoma-ml with the TileDB read settings SomaSource uses (READ_CONFIG_DEFAULTS): what it gains from them."""
    from loaders.soma_source import READ_CONFIG_DEFAULTS

    return {**run_tiledbsoma_ml(target, work, num_workers, dict(READ_CONFIG_DEFAULTS)),
            "tiledb_config": dict(READ_CONFIG_DEFAULTS)}


def run_lamin_setup(target: str, work: Path, num_workers: int) -> dict:
    return setup_lamin(work)


RUNNERS = {"streamtotal": run_streamtotal, "tiledbsoma_ml": run_tiledbsoma_ml,
           "tiledbsoma_ml_tuned": run_tiledbsoma_ml_tuned,
           "mapped_collection": run_mapped_collection, "lamin_setup": run_lamin_setup}


def child(args: argparse.Namespace) -> None:
    result = RUNNERS[args.runner](args.target, Path(args.workdir), args.num_workers)
    print("RESULT " + json.dumps(result))


def measure(name: str, runner: str, target: str, work: Path, num_workers: int, env: dict | None = None) -> dict:
    cmd = [sys.executable, __file__, "--child", runner, "--target", target, "--workdir", str(work),
           "--num-workers", str(num_workers)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {}),
                                                                    "PYTHONWARNINGS": "ignore"})
    result = child_result(proc.stdout)
    if proc.returncode != 0 or result is None:
        return {"error": (proc.stderr or proc.stdout)[-1500:]}
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cells", type=int, default=100_000)
    p.add_argument("--genes", type=int, default=2000)
    p.add_argument("--proteins", type=int, default=100)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--s3-latency-ms", type=float, default=20.0, help="latency the proxy adds to each S3 request")
    p.add_argument("--object-storage-only", action="store_true",
                   help="measure local Zarr and SOMA and the object-storage part only (no h5ad, no peers)")
    p.add_argument("--workdir")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--target", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        args.runner = args.child
        return child(args)

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        made = prepare(args, work)
        results = {}
        for backend in ("zarr", "zarr_object_layout", "h5ad", "soma"):
            if backend in made and not (args.object_storage_only and backend == "h5ad"):
                results[f"streamtotal_{backend}"] = measure(backend, "streamtotal", made[backend], work,
                                                            args.num_workers)
        results.update(measure_object_storage(made, work, args.num_workers, args.s3_latency_ms))
        if "soma" in made and not args.object_storage_only:
            results["tiledbsoma_ml_rna_only"] = measure("soma", "tiledbsoma_ml", made["soma"], work,
                                                        args.num_workers)
            # The peer as its users run it (above, the criterion) and with our TileDB read settings (for fairness).
            results["tiledbsoma_ml_rna_only_our_tiledb_settings"] = measure("soma", "tiledbsoma_ml_tuned", made["soma"],
                                                                            work, args.num_workers)
        if not args.object_storage_only:
            try:
                import lamindb  # noqa: F401 - only to know whether the LaminDB backend can be measured

                env = lamin_env(work)
                slug = measure("lamin", "lamin_setup", "", work, 0, env)["slug"]
                results["streamtotal_lamindb_zarr"] = measure("lamin", "streamtotal", f"lamin://{LAMIN_INSTANCE}/bench-zarr",
                                                              work, args.num_workers, env)
                results["lamindb_mapped_collection_h5ad"] = measure("lamin", "mapped_collection", slug, work,
                                                                    args.num_workers, env)
            except ImportError:
                pass

        codes = np.load(work / "batch_codes.npy")
        rng = np.random.default_rng(0)
        tvd_random = mixing_tvd(codes, rng.permutation(len(codes)), BATCH_SIZE)
        tvd_ordered = mixing_tvd(codes, np.arange(len(codes)), BATCH_SIZE)
        for r in results.values():
            if "order_file" in r:
                tvd = mixing_tvd(codes, np.load(r.pop("order_file")), BATCH_SIZE)
                r["shuffle_tvd"] = tvd
                r["shuffle_unmixed_score"] = (tvd - tvd_random) / (tvd_ordered - tvd_random)
        ratios = {}
        for peer_key in ("tiledbsoma_ml_rna_only", "tiledbsoma_ml_rna_only_our_tiledb_settings",
                         "lamindb_mapped_collection_h5ad"):
            peer = results.get(peer_key, {}).get("cells_per_s")
            for key in ("streamtotal_zarr", "streamtotal_soma", "streamtotal_h5ad", "streamtotal_lamindb_zarr"):
                if peer and "cells_per_s" in results.get(key, {}):
                    ratios[f"{key}_vs_{peer_key}"] = results[key]["cells_per_s"] / peer
        # Object storage through the proxy against local disk, in this run. The criterion compares with the default
        # local store (64-cell chunks, 64-cell runs); the same-layout ratio isolates the cost of the network.
        for name, remote_key, local_key in (
                ("s3_proxy_zarr_vs_local_ratio", "streamtotal_s3_proxy_zarr", "streamtotal_zarr"),
                ("s3_proxy_zarr_vs_local_same_layout_ratio", "streamtotal_s3_proxy_zarr",
                 "streamtotal_zarr_object_layout"),
                ("s3_proxy_zarr_64_cell_chunks_vs_local_ratio", "streamtotal_s3_proxy_zarr_64_cell_chunks",
                 "streamtotal_zarr"),
                ("s3_proxy_soma_vs_local_ratio", "streamtotal_s3_proxy_soma", "streamtotal_soma")):
            local = results.get(local_key, {}).get("cells_per_s")
            remote = results.get(remote_key, {}).get("cells_per_s")
            if local and remote:
                ratios[name] = remote / local
        print(json.dumps({
            "benchmark": "loader_throughput",
            "data": {"cells": args.cells, "genes": args.genes, "proteins": args.proteins, "batch_size": BATCH_SIZE,
                     "batches_stored_contiguously": 4},
            "num_workers": args.num_workers, "cpu_count": os.cpu_count(),
            "shuffle_reference": {"random_permutation_tvd": tvd_random, "in_order_tvd": tvd_ordered},
            "results": results, "ratios": ratios,
        }, indent=1))


if __name__ == "__main__":
    main()
