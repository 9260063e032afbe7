"""One command's results are published together: a kill between two renames never leaves a mix of two runs."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import zarr

from loaders.publish_journal import JOURNAL_NAME
from loaders.zarr_source import ZarrSource
from streamtotal.cli.main import main
from streamtotal.inference import write_ledger
from streamtotal.inference.write_back import (FAIL_RENAMES_ENV, InjectedFailure, ObsmTarget, ObsTarget,
                                              WriteBack)

N = 500  # cells of small_store
DENOISED = ("denoised_rna", "denoised_protein", "protein_foreground_prob")


@pytest.fixture
def store(small_store, tmp_path):
    path = tmp_path / "copy.zarr"
    shutil.copytree(small_store, path)
    return path


def _denoise_args(run, store, seed):
    return ["denoise", str(run), str(store), "--what", "all", "--n-samples", "2", "--sample-protein-mixing",
            "--seed", str(seed), "--batch-size", "64", "--device", "cpu", "--no-progress"]


def _tree_bytes(element: Path) -> dict[str, bytes]:
    """Every file of a store element by relative path: equal dicts mean byte-identical elements."""
    return {p.relative_to(element).as_posix(): p.read_bytes() for p in sorted(element.rglob("*")) if p.is_file()}


def _hidden(store: Path) -> list[str]:
    return sorted(f"{parent}/{p.name}" for parent in ("obs", "obsm") for p in (store / parent).iterdir()
                  if p.name.startswith((".tmp-", ".old-")))


def _killed_denoise(run, store, seed, renames_done):
    """``streamtotal denoise`` as a real process that dies right after ``renames_done`` renames."""
    env = {**os.environ, FAIL_RENAMES_ENV: str(renames_done), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "streamtotal", *_denoise_args(run, store, seed)], env=env,
                          capture_output=True, text=True)
    assert proc.returncode != 0, proc.stdout
    assert f"injected failure after {renames_done} renames of a publication" in proc.stderr
    return proc


@pytest.fixture
def previous_and_new(trained_run, store, tmp_path):
    """``store`` holding seed 4's denoised results, and a copy holding seed 5's (an uninterrupted run)."""
    assert main(_denoise_args(trained_run, store, 4)) == 0
    new = tmp_path / "new.zarr"
    shutil.copytree(store, new)
    assert main(_denoise_args(trained_run, new, 5)) == 0
    previous = {key: _tree_bytes(store / "obsm" / key) for key in DENOISED}
    for key in DENOISED:  # the two runs differ in every array, so a mix would show
        assert previous[key] != _tree_bytes(new / "obsm" / key)
    return previous, new


def test_denoise_killed_between_two_renames_is_completed_by_the_next_open(trained_run, store, previous_and_new,
                                                                          capsys):
    _, new = previous_and_new
    _killed_denoise(trained_run, store, 5, renames_done=1)
    # The dangerous instant was hit: on disk, one array of the new run sits beside two of the previous run.
    assert (store / JOURNAL_NAME).is_file()
    assert _hidden(store) == ["obsm/.old-denoised_rna", "obsm/.tmp-denoised_protein",
                              "obsm/.tmp-protein_foreground_prob"]
    assert _tree_bytes(store / "obsm" / "denoised_rna") == _tree_bytes(new / "obsm" / "denoised_rna")

    ZarrSource(store)  # any reader's open rolls the publication forward before reading
    assert not (store / JOURNAL_NAME).exists() and _hidden(store) == []
    got, expected = ad.read_zarr(store), ad.read_zarr(new)
    for key in DENOISED:  # every array is the new run's, byte for byte, and the metadata describes them
        assert _tree_bytes(store / "obsm" / key) == _tree_bytes(new / "obsm" / key)
        np.testing.assert_array_equal(got.obsm[key], expected.obsm[key])
        attrs = zarr.open_group(str(store), mode="r")[f"obsm/{key}"].attrs  # through the consolidated metadata
        assert attrs["streamtotal"]["options"]["seed"] == 5 and write_ledger.LEDGER_KEY not in attrs

    capsys.readouterr()
    assert main(_denoise_args(trained_run, store, 5)) == 0  # a rerun completes and changes nothing
    for key in DENOISED:
        np.testing.assert_array_equal(ad.read_zarr(store).obsm[key], expected.obsm[key])


def test_denoise_killed_before_the_journal_keeps_every_previous_array_and_resumes(trained_run, store,
                                                                                  previous_and_new, capsys):
    previous, new = previous_and_new
    _killed_denoise(trained_run, store, 5, renames_done=0)
    assert not (store / JOURNAL_NAME).exists()
    ZarrSource(store)
    for key in DENOISED:  # nothing was published: the previous run's arrays, byte for byte
        assert _tree_bytes(store / "obsm" / key) == previous[key]
    assert ad.read_zarr(store).obsm.keys() >= set(DENOISED)

    capsys.readouterr()
    assert main(_denoise_args(trained_run, store, 5)) == 0  # every unit was recorded: only the publication is left
    assert "resumed: 8 of 8 chunks were already written" in capsys.readouterr().out
    for key in DENOISED:
        assert _tree_bytes(store / "obsm" / key) == _tree_bytes(new / "obsm" / key)


def _targets():
    return dict(obsm=[ObsmTarget("result", 2)], obs=[ObsTarget("score", "float64"), ObsTarget("kind", ("x", "y"))])


def _write_all(store, offset, monkeypatch=None, fail_after=None):
    writer = WriteBack(store, N, 128, {"method": "test", "offset": offset}, **_targets())
    for unit in range(writer.n_units):
        start, stop = writer.unit_range(unit)
        rows = np.arange(start, stop) + offset
        writer.write_unit(unit, obsm={"result": np.stack([rows, -rows], 1)},
                          obs={"score": rows / 3.0, "kind": rows % 2})
    if fail_after is not None:
        monkeypatch.setenv(FAIL_RENAMES_ENV, str(fail_after))
    writer.commit()


def test_obsm_and_obs_results_of_one_write_back_are_published_together(store, monkeypatch):
    _write_all(store, offset=0)
    for done in (1, 2):  # killed after obsm/result, then after obsm/result and obs/score were renamed
        with pytest.raises(InjectedFailure):
            _write_all(store, offset=1000 * done, monkeypatch=monkeypatch, fail_after=done)
        monkeypatch.delenv(FAIL_RENAMES_ENV)
        journal = json.loads((store / JOURNAL_NAME).read_text())
        assert [r[2] for r in journal["renames"]] == ["result", "score", "kind"]
        # The next write-back (here: with other targets) first completes the pending publication.
        WriteBack(store, N, 128, {"method": "other"}, obsm=[ObsmTarget("other", 1)]).discard()
        adata = ad.read_zarr(store)
        rows = np.arange(N) + 1000 * done
        np.testing.assert_array_equal(adata.obsm["result"], np.stack([rows, -rows], 1))
        np.testing.assert_array_equal(adata.obs["score"].to_numpy(), rows / 3.0)
        assert list(adata.obs["kind"].astype(str)) == [("x", "y")[k] for k in rows % 2]
        order = json.loads((store / "obs" / ".zattrs").read_text())["column-order"]
        assert order.count("score") == 1 and order.count("kind") == 1
        assert _hidden(store) == [] and not (store / JOURNAL_NAME).exists()


def test_an_unreadable_journal_is_a_clear_error(store):
    (store / JOURNAL_NAME).write_text("{not json")
    from loaders.errors import StoreFormatError

    with pytest.raises(StoreFormatError, match=r"publication journal .* cannot be read"):
        ZarrSource(store)
