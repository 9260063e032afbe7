import pytest
import torch

from streamtotal.errors import CheckpointError
from streamtotal.training.checkpoint import (
    CheckpointWriter,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)


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


def test_background_writer_saves_the_state_as_submitted_even_if_training_mutates_it(tmp_path):
    writer = CheckpointWriter()
    weights = torch.nn.Linear(4, 3)
    optimizer = torch.optim.Adam(weights.parameters())
    weights(torch.ones(2, 4)).sum().backward()
    optimizer.step()
    expected = {k: v.clone() for k, v in weights.state_dict().items()}
    expected_moment = optimizer.state_dict()["state"][0]["exp_avg"].clone()
    state = {"format": "streamtotal-checkpoint", "step": 7, "model": weights.state_dict(),
             "optimizer": optimizer.state_dict(), "nested": [(torch.ones(2),)]}
    writer.submit(tmp_path, 7, state, keep=2)
    with torch.no_grad():  # training goes on while the file is written
        for p in weights.parameters():
            p.add_(1.0)
    optimizer.state[weights.weight]["exp_avg"].add_(1.0)
    state["nested"][0][0].add_(1.0)
    writer.wait()
    saved = load_checkpoint(latest_checkpoint(tmp_path))
    for k, v in expected.items():
        assert torch.equal(saved["model"][k], v)
    assert torch.equal(saved["optimizer"]["state"][0]["exp_avg"], expected_moment)
    assert torch.equal(saved["nested"][0][0], torch.ones(2)) and isinstance(saved["nested"][0], tuple)


def test_background_writer_raises_a_failed_write_at_the_next_call_and_keeps_the_previous_file(tmp_path):
    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("disk full")

    writer = CheckpointWriter()
    writer.submit(tmp_path, 1, _state(1))
    writer.submit(tmp_path, 2, {"format": "streamtotal-checkpoint", "bad": Unpicklable()})
    with pytest.raises(RuntimeError, match="disk full"):
        writer.wait()
    writer.wait()  # raised once
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt-0000000001.pt"]
    writer.submit(tmp_path, 3, {"format": "streamtotal-checkpoint", "bad": Unpicklable()})
    writer.wait(raise_error=False)  # dropped when another error is already on its way
    writer.submit(tmp_path, 4, _state(4))
    writer.wait()
    assert load_checkpoint(latest_checkpoint(tmp_path))["step"] == 4
