"""TileDB-SOMA Experiments on object storage (issue 18, part 1): read with many S3 operations in flight, and exactly
what the same Experiment on local disk gives, cell for cell."""

import numpy as np
import pytest

from loaders.ingest.soma_ingest import ingest_soma
from loaders.s3_env import tiledb_s3_config_from_env
from loaders.soma_source import READ_CONFIG_DEFAULTS, S3_READ_CONFIG_DEFAULTS, SomaSource, read_context

pytestmark = pytest.mark.filterwarnings("ignore:Writing zarr v2 data will no longer be the default")


def test_s3_experiments_get_parallel_io_and_the_callers_settings_win():
    on_s3 = read_context(None, "s3://bucket/x.soma").tiledb_config
    for key, value in {**READ_CONFIG_DEFAULTS, **S3_READ_CONFIG_DEFAULTS}.items():
        assert on_s3[key] == value
    local = read_context(None, "/data/x.soma").tiledb_config
    assert "sm.io_concurrency_level" not in local and "vfs.s3.max_parallel_ops" not in local  # TileDB's own sizing
    # The heap is trimmed after reads from S3 (many I/O threads' arenas), not after local ones (a third of the time).
    assert (on_s3["sm.mem.malloc_trim"], local["sm.mem.malloc_trim"]) == ("true", "false")
    mine = read_context({"sm.io_concurrency_level": "3"}, "s3://bucket/x.soma").tiledb_config
    assert mine["sm.io_concurrency_level"] == "3"
    assert mine["vfs.s3.max_parallel_ops"] == S3_READ_CONFIG_DEFAULTS["vfs.s3.max_parallel_ops"]


def test_an_experiment_on_s3_reads_exactly_as_on_local_disk(tmp_path, s3_server, cite):
    data = cite.make_cite(n=90, seed=3)
    cite.write_h5ad(tmp_path / "study.h5ad", data)
    local = tmp_path / "study.soma"
    ingest_soma(tmp_path / "study.h5ad", local, batch_key="batch", block_cells=11, progress=False)
    url = s3_server.upload(local, "soma", tmp_path)
    env = {"AWS_ENDPOINT_URL": s3_server.endpoint_url, "AWS_DEFAULT_REGION": s3_server.region}
    config = {
        **tiledb_s3_config_from_env(env),
        "vfs.s3.aws_access_key_id": s3_server.key, "vfs.s3.aws_secret_access_key": s3_server.secret,
    }
    remote = SomaSource(url, context=config)
    in_use = remote._context.tiledb_config
    assert in_use["sm.io_concurrency_level"] == S3_READ_CONFIG_DEFAULTS["sm.io_concurrency_level"]
    on_disk = SomaSource(local)
    rng = np.random.default_rng(1)
    for ids in [cite.sorted_ids_with_runs(rng, 90) for _ in range(4)] + [np.arange(90)]:
        got, want = remote.read(ids), on_disk.read(ids)
        np.testing.assert_array_equal(got.rna.toarray(), want.rna.toarray())
        np.testing.assert_array_equal(got.rna.toarray(), data.rna[ids].toarray())
        np.testing.assert_array_equal(got.protein, want.protein)
