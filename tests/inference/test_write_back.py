"""Resumable write-backs: chunk-aligned units, the progress ledger, real interruptions and resumes."""

import json
import os
import shutil
import subprocess
import sys

import anndata as ad
import numpy as np
import pytest
import zarr

from streamtotal.cli.main import main
from streamtotal.inference import write_ledger
from streamtotal.inference.embed import embed
from streamtotal.inference.expression import ExpressionOptions, StorePosterior
from streamtotal.inference.write_back import (FAIL_ENV, InjectedFailure, ObsmTarget, ObsTarget, WriteBack,
                                              aligned_chunk_rows)

N = 500  # cells of small_store


@pytest.fixture
def store(small_store, tmp_path):
    path = tmp_path / "copy.zarr"
    shutil.copytree(small_store, path)
    return path


def _targets():
    return dict(obsm=[ObsmTarget("result", 3, attrs={"feature_names": ["a", "b", "c"]})],
                obs=[ObsTarget("score", "float64"), ObsTarget("kind", ("x", "y"))])


def _unit_values(start, stop):
    rows = np.arange(start, stop)
    return ({"result": np.stack([rows, rows * 2, rows * 3], 1).astype(np.float32)},
            {"score": rows / 7.0, "kind": rows % 2})


def test_aligned_chunk_rows_divide_the_unit():
    for unit, columns in [(1024, 4), (1024, 2000), (1000, 40), (64, 6), (997, 10), (4096, 1)]:
        rows = aligned_chunk_rows(unit, columns)
        assert unit % rows == 0
    from loaders.store_layout import StoreLayoutConfig

    wide = StoreLayoutConfig().row_chunk(2000)
    assert aligned_chunk_rows(1024, 2000) == wide and 1024 % wide == 0  # the layout's own chunks for wide arrays
    assert aligned_chunk_rows(997, 10) == 997  # a prime unit: one chunk per unit, never a shared chunk


def test_resume_skips_recorded_units_and_other_options_start_over(store):
    wb = WriteBack(store, N, 64, {"method": "test", "seed": 1}, **_targets())
    assert wb.n_units == 8 and wb.skipped == 0 and wb.pending_ids().size == N
    for unit in (0, 1, 2, 5):
        wb.write_unit(unit, *_unit_values(*wb.unit_range(unit)))
    del wb  # interrupted: never committed
    assert "result" not in ad.read_zarr(store).obsm

    again = WriteBack(store, N, 64, {"method": "test", "seed": 1}, **_targets())
    assert again.skipped == 4 and again.done == {0, 1, 2, 5}
    pending = again.pending_ids()
    assert pending.size == N - 4 * 64 and not np.isin(np.arange(320, 384), pending).any()
    ledger = json.loads((store / "obsm" / ".tmp-result" / ".zattrs").read_text())[write_ledger.LEDGER_KEY]
    assert ledger["done"] == [[0, 3], [5, 6]]
    for unit in sorted(set(range(8)) - again.done):
        again.write_unit(unit, *_unit_values(*again.unit_range(unit)))
    again.commit()
    adata = ad.read_zarr(store)
    obsm, obs = _unit_values(0, N)
    np.testing.assert_array_equal(adata.obsm["result"], obsm["result"])
    np.testing.assert_array_equal(adata.obs["score"].to_numpy(), obs["score"])
    assert list(adata.obs["kind"].astype(str)) == [("x", "y")[k] for k in obs["kind"]]
    attrs = json.loads((store / "obsm" / "result" / ".zattrs").read_text())
    assert write_ledger.LEDGER_KEY not in attrs and attrs["feature_names"] == ["a", "b", "c"]
    assert not [p for p in (store / "obs").iterdir() if p.name.startswith(".tmp-")]

    # An interrupted run with other options is not resumed by this one: it starts over.
    other = WriteBack(store, N, 64, {"method": "test", "seed": 1}, **_targets())
    other.write_unit(0, *_unit_values(0, 64))
    assert WriteBack(store, N, 64, {"method": "test", "seed": 2}, **_targets()).skipped == 0
    assert WriteBack(store, N, 100, {"method": "test", "seed": 2}, **_targets()).skipped == 0


def test_commit_refuses_missing_units(store):
    from loaders.errors import StoreFormatError

    wb = WriteBack(store, N, 256, {"method": "test"}, **_targets())
    wb.write_unit(0, *_unit_values(0, 256))
    with pytest.raises(StoreFormatError, match="rerun the same command"):
        wb.commit()


def test_embed_resumes_after_an_injected_failure(trained_run, store, tmp_path, monkeypatch):
    reference = tmp_path / "reference.zarr"
    shutil.copytree(store, reference)
    full = embed(trained_run, str(reference), batch_size=64, device="cpu", progress=False)
    assert full.chunks_computed == 8 and full.chunks_skipped == 0
    monkeypatch.setenv(FAIL_ENV, "3")
    with pytest.raises(InjectedFailure):
        embed(trained_run, str(store), batch_size=64, device="cpu", progress=False)
    assert "X_streamtotal" not in ad.read_zarr(store).obsm
    monkeypatch.delenv(FAIL_ENV)
    resumed = embed(trained_run, str(store), batch_size=64, device="cpu", progress=False, return_latent=True)
    assert (resumed.chunks_skipped, resumed.chunks_computed) == (3, 5)
    expected = ad.read_zarr(reference).obsm["X_streamtotal"]
    np.testing.assert_array_equal(ad.read_zarr(store).obsm["X_streamtotal"], expected)
    np.testing.assert_array_equal(resumed.latent, expected)


def _denoise_args(run, store, seed):
    return ["denoise", str(run), str(store), "--what", "all", "--n-samples", "3", "--sample-protein-mixing",
            "--seed", str(seed), "--batch-size", "64", "--device", "cpu", "--no-progress"]


def test_denoise_killed_in_a_subprocess_resumes_to_the_uninterrupted_result(trained_run, store, tmp_path, capsys):
    """A real process dies after 3 of 8 chunks; the rerun computes only the other 5 and equals a clean run."""
    reference = tmp_path / "reference.zarr"
    shutil.copytree(store, reference)
    assert main(_denoise_args(trained_run, reference, 4)) == 0
    env = {**os.environ, FAIL_ENV: "3", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "streamtotal", *_denoise_args(trained_run, store, 4)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "injected failure after 3 write units" in proc.stderr
    tmp_dirs = sorted(p.name for p in (store / "obsm").iterdir() if p.name.startswith(".tmp-"))
    assert tmp_dirs == [".tmp-denoised_protein", ".tmp-denoised_rna", ".tmp-protein_foreground_prob"]
    capsys.readouterr()
    assert main(_denoise_args(trained_run, store, 4)) == 0
    assert "resumed: 3 of 8 chunks were already written" in capsys.readouterr().out
    got, expected = ad.read_zarr(store), ad.read_zarr(reference)
    for key in ("denoised_rna", "denoised_protein", "protein_foreground_prob"):
        np.testing.assert_array_equal(got.obsm[key], expected.obsm[key])
    # Per-chunk seeding: the in-memory result over every cell is the same draws.
    post = StorePosterior(trained_run, store, batch_size=64, device="cpu", progress=False)
    opts = ExpressionOptions(n_samples=3, sample_protein_mixing=True, seed=4)
    np.testing.assert_array_equal(post.denoised_protein(options=opts), got.obsm["denoised_protein"])


def test_a_resume_with_changed_options_starts_over(trained_run, store, tmp_path, monkeypatch, capsys):
    reference = tmp_path / "reference.zarr"
    shutil.copytree(store, reference)
    assert main(_denoise_args(trained_run, reference, 5)) == 0
    monkeypatch.setenv(FAIL_ENV, "2")
    with pytest.raises(InjectedFailure):
        main(_denoise_args(trained_run, store, 9))  # another seed
    monkeypatch.delenv(FAIL_ENV)
    capsys.readouterr()
    assert main(_denoise_args(trained_run, store, 5)) == 0
    assert "resumed" not in capsys.readouterr().out
    got, expected = ad.read_zarr(store), ad.read_zarr(reference)
    for key in ("denoised_rna", "denoised_protein", "protein_foreground_prob"):
        np.testing.assert_array_equal(got.obsm[key], expected.obsm[key])
    attrs = zarr.open_group(str(store), mode="r")["obsm/denoised_protein"].attrs
    assert attrs["streamtotal"]["options"]["seed"] == 5
