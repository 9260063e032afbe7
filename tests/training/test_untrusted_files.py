"""Checkpoints and model files are untrusted input: through the real command line, a file whose unpickling would
run code is refused before any of it runs, and a truncated or garbage file is a clear error naming it (exit 2,
no traceback). A damaged newest checkpoint is skipped for the one before, with a warning naming it."""

import json
import shutil

import numpy as np
import pytest
import torch

from streamtotal.errors import InteropError
from streamtotal.interop.scvi_model_file import read_scvi_model
from streamtotal.training.checkpoint import list_checkpoints, load_checkpoint
from streamtotal.training.run_dir import load_model_file

from payloads import OpenPayload, ShellPayload


def _copy_run(trained_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    return run


def _assert_refused(proc, path, marker, *words):
    assert proc.returncode == 2, proc.stderr
    assert str(path) in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    for word in words:
        assert word in proc.stderr, proc.stderr
    assert not marker.exists()


def test_train_resume_refuses_a_checkpoint_that_would_run_code(trained_run, small_store, tmp_path, cli):
    run, marker = _copy_run(trained_run, tmp_path), tmp_path / "marker"
    newest = list_checkpoints(run)[-1]
    state = load_checkpoint(newest)
    state["train_state"]["last_validation"] = ShellPayload(marker)
    step = state["step"] + 1
    planted = run / f"ckpt-{step:010d}.pt"
    torch.save(state, planted)
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    proc = cli("train", "--config", run / "config.toml", "--out", run, "--resume", "--no-progress")
    # Refused outright, never skipped for the valid checkpoint before it.
    _assert_refused(proc, planted, marker, "would run code", "posix.system")
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before


def test_embed_refuses_a_model_file_that_would_run_code(trained_run, small_store, tmp_path, cli):
    run, marker = _copy_run(trained_run, tmp_path), tmp_path / "marker"
    state = load_model_file(run / "model.pt")
    state["config"]["train"]["device"] = OpenPayload(marker)
    torch.save(state, run / "model.pt")
    out = tmp_path / "latent.h5ad"
    proc = cli("embed", run, small_store, "--no-write-back", "--export-h5ad", out, "--no-progress")
    _assert_refused(proc, run / "model.pt", marker, "would run code", "io.open")
    assert not out.exists()


def test_import_scvi_refuses_a_model_file_that_would_run_code(tmp_path, cli):
    model_dir, marker = tmp_path / "downloaded", tmp_path / "marker"
    model_dir.mkdir()
    # The layout of scvi-tools' model.save(DIR); the payload sits where scvi-tools keeps its training history.
    saved = {"model_state_dict": {"encoder.weight": torch.ones(2, 2)},
             "var_names": np.array(["GENE1", "GENE2"], dtype=object),
             "attr_dict": {"registry_": {"model_name": "TOTALVI", "scvi_version": "1.4.2"},
                           "history_": {"elbo_train": ShellPayload(marker)}}}
    torch.save(saved, model_dir / "model.pt")
    proc = cli("import-scvi", model_dir, "--out", tmp_path / "imported")
    _assert_refused(proc, model_dir / "model.pt", marker, "would run code", "posix.system")
    assert not (tmp_path / "imported").exists()


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_embed_with_a_damaged_model_file_names_it(trained_run, small_store, tmp_path, cli, damage):
    run = _copy_run(trained_run, tmp_path)
    data = (run / "model.pt").read_bytes()
    (run / "model.pt").write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\x00garbage" * 40)
    proc = cli("embed", run, small_store, "--no-write-back", "--export-h5ad", tmp_path / "x.h5ad", "--no-progress")
    _assert_refused(proc, run / "model.pt", tmp_path / "no-marker", "cannot be read, it is truncated or damaged")


def test_train_resume_with_no_readable_checkpoint_lists_them(trained_run, tmp_path, cli):
    run = _copy_run(trained_run, tmp_path)
    older, newest = list_checkpoints(run)
    older.write_bytes(older.read_bytes()[:1000])
    newest.write_bytes(b"\xff" * 500)
    proc = cli("train", "--config", run / "config.toml", "--out", run, "--resume", "--no-progress")
    _assert_refused(proc, newest, tmp_path / "no-marker", str(older), "no checkpoint in")


def test_train_resume_skips_a_truncated_newest_checkpoint_with_a_warning(trained_run, tmp_path, cli):
    run = _copy_run(trained_run, tmp_path)
    older, newest = list_checkpoints(run)
    older_step, final_step = load_checkpoint(older)["step"], load_checkpoint(newest)["step"]
    newest.write_bytes(newest.read_bytes()[:-200])
    (run / "model.pt").unlink()
    proc = cli("train", "--config", run / "config.toml", "--out", run, "--resume", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert f"skipping a damaged checkpoint: checkpoint {newest}" in proc.stderr
    assert f"resuming from {older}" in proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert older_step < final_step and summary["steps"] == final_step
    assert (run / "model.pt").is_file() and load_checkpoint(newest)["step"] == final_step  # rewritten whole


def test_a_truncated_scvi_tools_model_file_is_named(tmp_path):
    model_dir = tmp_path / "downloaded"
    model_dir.mkdir()
    torch.save({"model_state_dict": {"w": torch.randn(256, 256)}, "attr_dict": {}}, model_dir / "model.pt")
    data = (model_dir / "model.pt").read_bytes()
    (model_dir / "model.pt").write_bytes(data[: len(data) // 3])
    with pytest.raises(InteropError, match=r"downloaded/model.pt cannot be read as a scvi-tools model, it is "
                                           r"truncated or damaged"):
        read_scvi_model(model_dir)
