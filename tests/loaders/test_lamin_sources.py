"""Tests of loaders.lamin_sources against a real local LaminDB instance (SQLite; see ``lamin_instance``)."""

import builtins
import json
import os
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from loaders.collection import Collection
from loaders.errors import LaminError
from loaders.h5ad_source import H5adSource
from loaders.ingest import ingest
from loaders.lamin_sources import lamin_sources, parse_lamin_uri
from loaders.registry import Registry
from loaders.stream import Stream, StreamConfig
from loaders.zarr_source import ZarrSource

KEY = "loaders/cite"


def _write_h5ad(path, n, seed, proteins=("P0", "P1", "P2", "P3")):
    rng = np.random.default_rng(seed)
    rna = sp.csr_matrix((rng.poisson(1.0, (n, 15)) * (rng.random((n, 15)) < 0.4)).astype(np.float32))
    a = ad.AnnData(rna, obs=pd.DataFrame({"batch": rng.choice(["b1", "b2"], n)}, index=[f"c{i}" for i in range(n)]),
                   var=pd.DataFrame(index=[f"G{i}" for i in range(15)]))
    a.obsm["protein_expression"] = rng.poisson(20, (n, len(proteins))).astype(np.float32)
    a.uns["protein_names"] = np.array(proteins, dtype=object)
    a.write_h5ad(path)


@pytest.fixture(scope="module")
def stored(lamin_instance, tmp_path_factory):
    """Two h5ad artifacts and one ingested zarr store artifact, in a collection ``KEY``; and their paths."""
    root = lamin_instance.root / "loaders"
    root.mkdir()
    paths = [root / "s0.h5ad", root / "s1.h5ad"]
    _write_h5ad(paths[0], 40, seed=0)
    _write_h5ad(paths[1], 50, seed=1, proteins=("P1", "P2", "P4"))
    raw = tmp_path_factory.mktemp("lamin_raw") / "z.h5ad"
    _write_h5ad(raw, 35, seed=2)
    ingest(raw, root / "z.zarr", progress=False)
    paths.append(root / "z.zarr")
    collection, artifacts = lamin_instance.save_collection(paths, KEY)
    return paths, collection, artifacts


def _direct(paths):
    return [H5adSource(paths[0], name="s0"), H5adSource(paths[1], name="s1"), ZarrSource(paths[2], name="z")]


def test_uri_opens_every_artifact_in_collection_order(lamin_instance, stored):
    paths, collection, artifacts = stored
    sources, prov = lamin_sources(f"lamin://{lamin_instance.name}/{KEY}")

    assert [s.name for s in sources] == ["s0", "s1", "z"]
    assert [type(s) for s in sources] == [H5adSource, H5adSource, ZarrSource]
    assert prov == {"lamindb": {
        "instance": lamin_instance.slug, "collection_uid": collection.uid, "collection_key": KEY,
        "artifact_uids": [a.uid for a in artifacts], "artifact_keys": [a.key for a in artifacts],
        "study_names": ["s0", "s1", "z"],
    }}
    ids = np.array([0, 1, 2, 7, 8, 20, 33], dtype=np.int64)
    for got, want in zip(sources, _direct(paths)):
        assert got.n_obs == want.n_obs
        assert list(got.gene_names) == list(want.gene_names)
        assert list(got.protein_names) == list(want.protein_names)
        a, b = got.read(ids), want.read(ids)
        np.testing.assert_array_equal(a.rna.toarray(), b.rna.toarray())
        np.testing.assert_array_equal(a.protein, b.protein)


def test_collection_streams_same_batches_as_files(lamin_instance, stored):
    paths = stored[0]
    sources, prov = lamin_sources(f"lamin://{lamin_instance.name}/{KEY}")
    via_lamin = Collection(sources, batch_key="batch", provenance=prov)
    direct = Collection(_direct(paths), batch_key="batch")
    cfg = StreamConfig(batch_size=16, chunk_size=8, io_chunks=2, seed=3)
    for epoch in (0, 1):
        streams = [Stream(c, np.arange(c.n_obs), cfg) for c in (via_lamin, direct)]
        for s in streams:
            s.set_epoch(epoch)
        pairs = list(zip(*streams, strict=True))
        assert pairs
        for x, y in pairs:
            for field in ("rna", "protein", "protein_mask", "batch", "cell_id"):
                assert np.array_equal(getattr(x, field).numpy(), getattr(y, field).numpy()), field
    # Provenance rides in the registry's extra and survives the JSON round trip; the rest is unchanged.
    assert via_lamin.registry.extra == prov
    assert Registry.from_dict(via_lamin.registry.to_dict()) == via_lamin.registry
    assert via_lamin.registry.to_dict() | {"extra": {}} == direct.registry.to_dict()


def test_records_and_single_artifact_targets(lamin_instance, stored):
    import lamindb as ln

    _, collection, artifacts = stored
    by_uri = lamin_sources(f"lamin://{lamin_instance.name}/{KEY}")[1]
    assert lamin_sources(collection)[1] == by_uri
    via_db = ln.DB(lamin_instance.slug).Collection.get(key=KEY)
    assert lamin_sources(via_db)[1] == by_uri
    assert lamin_sources(KEY, instance=lamin_instance.name)[1] == by_uri

    owner, name = lamin_instance.slug.split("/")
    sources, prov = lamin_sources(f"lamin://{owner}%2F{name}/artifact/loaders/z.zarr")
    assert [type(s) for s in sources] == [ZarrSource] and sources[0].name == "z"
    assert prov["lamindb"]["collection_uid"] is None
    assert prov["lamindb"]["artifact_uids"] == [artifacts[2].uid]
    assert lamin_sources(artifacts[2])[1] == prov


def test_fresh_process_reads_without_switching_or_writing_settings(lamin_instance, stored, tmp_path):
    # The CLI's case: no default instance in the process; lamin:// must not connect one or write settings.
    settings = Path(os.environ["LAMIN_SETTINGS_DIR"]) / ".lamin"
    before = sorted(p.name for p in settings.iterdir())
    code = (
        "import json, lamindb_setup as s\n"
        "from loaders.lamin_sources import lamin_sources\n"
        "configured = s.settings.is_configured\n"
        f"sources, prov = lamin_sources('lamin://{lamin_instance.name}/{KEY}')\n"
        "print(json.dumps([configured, s.settings.is_configured, [x.n_obs for x in sources], prov]))\n"
    )
    root = Path(__file__).resolve().parents[2]
    pythonpath = os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, HOME=str(tmp_path), PYTHONPATH=pythonpath)
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    configured_before, configured_after, sizes, prov = json.loads(out.stdout.strip().splitlines()[-1])
    assert (configured_before, configured_after, sizes) == (False, False, [40, 50, 35])
    assert prov["lamindb"]["collection_uid"] == stored[1].uid
    assert sorted(p.name for p in settings.iterdir()) == before
    assert not (tmp_path / ".lamin").exists()  # neither a dev-dir marker nor a settings dir in HOME


def test_uri_grammar():
    t = parse_lamin_uri("lamin://me%2Finst/artifact/a/b.h5ad")
    assert (t.instance, t.kind, t.key) == ("me/inst", "artifact", "a/b.h5ad")
    t = parse_lamin_uri("lamin://inst/a/b")
    assert (t.instance, t.kind, t.key) == ("inst", "collection", "a/b")
    for bad in ("lamin://inst", "lamin:///key", "lamin://inst/", "s3://x/y"):
        with pytest.raises(LaminError, match="lamin://"):
            parse_lamin_uri(bad)


def test_unknown_instance_and_keys_are_named(lamin_instance, stored):
    with pytest.raises(LaminError, match="instance 'anonymous/no-such-instance' not found"):
        lamin_sources("lamin://no-such-instance/x")
    with pytest.raises(LaminError, match=r"no collection with key 'nope'.*'loaders/cite'"):
        lamin_sources(f"lamin://{lamin_instance.name}/nope")
    with pytest.raises(LaminError, match=r"no artifact with key 'loaders/x.h5ad'.*'loaders/s0.h5ad'"):
        lamin_sources(f"lamin://{lamin_instance.name}/artifact/loaders/x.h5ad")
    with pytest.raises(LaminError, match="contradicts"):
        lamin_sources(f"lamin://{lamin_instance.name}/{KEY}", instance="other")


def test_unsupported_suffix_is_named(lamin_instance, stored):
    path = lamin_instance.root / "loaders" / "table.csv"
    path.write_text("a,b\n1,2\n")
    lamin_instance.save_collection([stored[0][0], path], "loaders/with-csv")
    with pytest.raises(LaminError, match=r"'loaders/table.csv'.*suffix '.csv'"):
        lamin_sources(f"lamin://{lamin_instance.name}/loaders/with-csv")


def test_missing_lamindb_says_how_to_install(monkeypatch):
    real_import = builtins.__import__

    def no_lamindb(name, *args, **kwargs):
        if name == "lamindb" or name.startswith("lamindb."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_lamindb)
    with pytest.raises(LaminError, match=r"pip install 'streamtotal\[lamin\]'"):
        lamin_sources("lamin://any/key")
