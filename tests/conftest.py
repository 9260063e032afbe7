"""Fixtures shared by every test directory."""

from __future__ import annotations

import importlib.util
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass
class S3Server:
    """A real S3-compatible server (moto's server mode) listening on 127.0.0.1."""

    endpoint_url: str
    key: str = "testing"
    secret: str = "testing"
    region: str = "us-east-1"

    def storage_options(self) -> dict:
        """fsspec/s3fs options that reach this server."""
        return {"key": self.key, "secret": self.secret, "client_kwargs": {"endpoint_url": self.endpoint_url}}

    def filesystem(self):
        import s3fs

        return s3fs.S3FileSystem(**self.storage_options())

    def set_environment(self, monkeypatch) -> None:
        """Points botocore's usual ``AWS_*`` variables at this server, for code given only an ``s3://`` URL."""
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", self.key)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", self.secret)
        monkeypatch.setenv("AWS_DEFAULT_REGION", self.region)
        monkeypatch.setenv("AWS_ENDPOINT_URL", self.endpoint_url)

    def new_bucket(self, prefix: str, tmp_path: Path) -> str:
        """Creates a bucket named ``prefix`` plus the test's temp folder name (unique per test); returns its name."""
        bucket = f"{prefix}-{tmp_path.name.lower().replace('_', '-')[-40:]}"
        self.filesystem().mkdir(bucket)
        return bucket

    def upload(self, local: Path, prefix: str, tmp_path: Path) -> str:
        """Copies the folder ``local`` into a ``new_bucket``; returns its ``s3://`` URL."""
        bucket = self.new_bucket(prefix, tmp_path)
        self.filesystem().put(str(local), f"{bucket}/{local.name}", recursive=True)
        return f"s3://{bucket}/{local.name}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """Starts moto's S3 server on a free loopback port for the session; stops it afterwards."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield S3Server(endpoint_url=f"http://127.0.0.1:{port}")
    finally:
        server.stop()


@dataclass
class LaminInstance:
    """A real local LaminDB instance (SQLite) in a temp dir, connected as this process's default instance."""

    name: str
    slug: str
    root: Path
    """Storage root: files written under it are registered in place (offline, no hub lookup)."""

    def save_collection(self, paths, key: str):
        """Registers ``paths`` (under ``root``; key = path relative to ``root``) and a Collection of them.

        Returns:
            ``(collection, artifacts)``.
        """
        import lamindb as ln

        artifacts = [ln.Artifact(str(p), key=Path(p).relative_to(self.root).as_posix()).save() for p in paths]
        return ln.Collection(artifacts, key=key).save(), artifacts


@pytest.fixture(scope="session")
def lamin_instance(tmp_path_factory):
    """One local LaminDB instance per session, with lamin's settings and cache in a temp dir.

    lamindb reads ``LAMIN_SETTINGS_DIR`` once, at import, so ``LAMIN_SETTINGS_DIR`` and ``LAMIN_CACHE_DIR``
    are set before lamindb is first imported and kept for the session (every lamin test shares them). HOME
    points into the temp dir only while lamindb is imported and the instance created (django's setup reads
    it), so later tests see the real HOME. Skips if lamindb is not installed.
    """
    if importlib.util.find_spec("lamindb") is None:
        pytest.skip("lamindb is not installed (pip install 'streamtotal[lamin]')")
    base = tmp_path_factory.mktemp("lamin")
    for sub in ("home", "settings", "cache"):
        (base / sub).mkdir()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LAMIN_SETTINGS_DIR", str(base / "settings"))
        mp.setenv("LAMIN_CACHE_DIR", str(base / "cache"))
        with pytest.MonkeyPatch.context() as during_init:
            during_init.setenv("HOME", str(base / "home"))
            during_init.chdir(base)  # init marks its working directory as the instance's dev dir (.lamin/)
            imported_before = "lamindb_setup" in sys.modules
            ln_setup = pytest.importorskip("lamindb_setup")
            if imported_before or Path(ln_setup.settings.settings_dir) != base / "settings" / ".lamin":
                pytest.fail("lamindb_setup was imported before the lamin_instance fixture: its settings would leak")
            ln_setup.init(storage=str(base / "storage"), name="streamtotal-test")
            pytest.importorskip("lamindb")
        yield LaminInstance(name="streamtotal-test", slug=ln_setup.settings.instance.slug, root=base / "storage")


def pytest_collection_modifyitems(config, items):
    """Tests that import JAX (scib-metrics, in the evaluation report) run last: JAX starts threads, and a later
    os.fork() (DataLoader workers, forked readers) in the same process could deadlock."""
    items.sort(key=lambda item: "test_evaluate" in item.nodeid)


@pytest.fixture
def one_torch_thread():
    """Runs a test on one torch thread: tiny models gain nothing from intra-op threads, and on a shared 2-core
    machine OpenMP threads that wait for a descheduled sibling stall a step for hundreds of milliseconds."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _small_simulation():
    # Imported here, not at the top: this conftest is loaded for every test file, most of which never simulate.
    from streamtotal.simulate import SimulationConfig

    return SimulationConfig(n_cells=700, n_genes=60, n_proteins=8, n_cell_types=3, n_batches=2, n_missing_proteins=2,
                            block_cells=300, seed=1)


@pytest.fixture(scope="session")
def small_sim():
    """A small two-batch simulation whose last batch lacks two proteins (its true cell types and parameters)."""
    from streamtotal.simulate import CiteSimulator

    return CiteSimulator(_small_simulation())


@pytest.fixture(scope="session")
def small_store(tmp_path_factory, small_sim):
    """A real Zarr store of ``small_sim``, written once per session (read-only: tests copy it before changing it).
    tests/inference has its own, smaller one."""
    from streamtotal.cli.simulate_cmd import write_simulation

    path = tmp_path_factory.mktemp("stores") / "small.zarr"
    write_simulation(small_sim, path, progress=False)
    return path

