import pytest
import torch

from streamtotal.errors import CheckpointError
from streamtotal.training.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint


def _state(step):
    return {"format": "streamtotal-checkpoint", "step": step, "w": torch.full((3,), float(step))}


def test_keeps_newest_and_finds_latest(tmp_path):
    for step in (5, 10, 15):
        save_checkpoint(tmp_path, step, _state(step), keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt-0000000010.pt", "ckpt-0000000015.pt"]
    assert load_checkpoint(latest_checkpoint(tmp_path))["step"] == 15


def test_failed_write_leaves_previous_checkpoint_and_no_temp_file(tmp_path):
    save_checkpoint(tmp_path, 1, _state(1))

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint(tmp_path, 2, {"format": "streamtotal-checkpoint", "bad": Unpicklable()})
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt-0000000001.pt"]
    assert load_checkpoint(latest_checkpoint(tmp_path))["step"] == 1


def test_corrupt_or_foreign_files_are_refused(tmp_path):
    bad = tmp_path / "ckpt-0000000003.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_checkpoint(bad)
    other = tmp_path / "other.pt"
    torch.save({"x": 1}, other)
    with pytest.raises(CheckpointError, match="not a streamtotal checkpoint"):
        load_checkpoint(other)
