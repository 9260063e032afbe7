"""End to end: ``streamtotal train lamin://INSTANCE/KEY`` on a real local LaminDB instance (SQLite)."""

import json

import pytest

from loaders.ingest import ingest
from streamtotal.cli.main import main
from streamtotal.config import DataConfig
from streamtotal.data import open_collection, open_source
from streamtotal.errors import ConfigError

KEY = "training/cite"


@pytest.fixture(scope="module")
def lamin_cite(lamin_instance, small_sim, tmp_path_factory):
    """The small simulation split into two h5ad artifacts and one zarr store artifact, in collection ``KEY``."""
    adata = small_sim.to_anndata()
    root = lamin_instance.root / "training"
    root.mkdir()
    paths = [root / "part0.h5ad", root / "part1.h5ad"]
    adata[:250].copy().write_h5ad(paths[0])
    adata[250:500].copy().write_h5ad(paths[1])
    raw = tmp_path_factory.mktemp("lamin_training") / "part2.h5ad"
    adata[500:].copy().write_h5ad(raw)
    ingest(raw, root / "part2.zarr", progress=False)
    paths.append(root / "part2.zarr")
    return lamin_instance.save_collection(paths, KEY)


def test_train_on_a_lamin_collection_records_its_uids(lamin_instance, lamin_cite, tmp_path):
    collection, artifacts = lamin_cite
    run = tmp_path / "run"
    uri = f"lamin://{lamin_instance.name}/{KEY}"
    assert main(["train", uri, "--out", str(run), "--batch-key", "batch", "--epochs", "1", "--batch-size", "64",
                 "--n-latent", "3", "--n-hidden", "16", "--no-progress"]) == 0
    assert (run / "model.pt").is_file()
    registry = json.loads((run / "registry.json").read_text())
    assert registry["study_names"] == ["part0", "part1", "part2"]
    assert registry["extra"]["lamindb"] == [{
        "instance": lamin_instance.slug, "collection_uid": collection.uid, "collection_key": KEY,
        "artifact_uids": [a.uid for a in artifacts], "artifact_keys": [a.key for a in artifacts],
        "study_names": ["part0", "part1", "part2"],
    }]
    assert uri in (run / "config.toml").read_text()


def test_unknown_collection_is_a_clear_cli_error(lamin_instance, lamin_cite, tmp_path, capsys):
    assert main(["train", f"lamin://{lamin_instance.name}/training/nope", "--out", str(tmp_path / "run"),
                 "--no-progress"]) == 2
    assert "no collection with key 'training/nope'" in capsys.readouterr().err


def test_lamin_uri_mixes_with_plain_stores(lamin_instance, lamin_cite, small_store):
    collection = open_collection(DataConfig(stores=(f"lamin://{lamin_instance.name}/{KEY}", str(small_store))))
    assert [s.name for s in collection.sources] == ["part0", "part1", "part2", "small"]
    assert collection.n_obs == 2 * 700
    assert collection.registry.extra["lamindb"][0]["collection_uid"] == lamin_cite[0].uid
    assert open_collection(DataConfig(stores=(str(small_store),))).registry.extra == {}
    with pytest.raises(ConfigError, match="open_sources"):
        open_source(f"lamin://{lamin_instance.name}/{KEY}")
