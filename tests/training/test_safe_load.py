"""``load_weights_only``: files that would run code are refused before anything of them runs; numpy arrays and
scvi-tools' pandas tables load without running numpy or pandas code that is not allow-listed; damaged files
are told apart from unsafe ones."""

import collections
import io
import os

import numpy as np
import pandas as pd
import pytest
import torch

from streamtotal.safe_load import UnreadableFileError, UnsafeFileError, is_inert, load_weights_only

from payloads import OpenPayload, ShellPayload


@pytest.mark.parametrize("payload", [ShellPayload, OpenPayload])
def test_a_file_that_would_run_code_is_refused_and_nothing_runs(tmp_path, payload):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pt"
    torch.save({"weights": torch.ones(2), "extra": [payload(marker)]}, path)
    with pytest.raises(UnsafeFileError) as err:
        load_weights_only(path)
    called = os.system if payload is ShellPayload else open
    assert err.value.names == [f"{called.__module__}.{called.__name__}"]  # posix.system, io.open
    with pytest.raises(UnsafeFileError):
        load_weights_only(io.BytesIO(path.read_bytes()), inert_modules=("pandas",))
    assert not marker.exists()


def test_a_legacy_format_file_is_guarded_too(tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "legacy.pt"
    torch.save({"x": ShellPayload(marker)}, path, _use_new_zipfile_serialization=False)
    with pytest.raises(UnsafeFileError, match="posix.system"):
        load_weights_only(path)
    assert not marker.exists()
    torch.save({"x": torch.arange(3)}, path, _use_new_zipfile_serialization=False)
    assert torch.equal(load_weights_only(path)["x"], torch.arange(3))


def test_numpy_values_and_defaultdicts_load_as_data(tmp_path):
    names = np.array(["GENE1", "GENE2"], dtype=object)
    state = {"names": names, "mask": np.array([True, False]), "ints": np.arange(3, dtype=np.int64),
             "scalar": np.float32(1.5), "registry": collections.defaultdict(dict, {"batch": {"n": 2}}),
             "raw": b"\x00\x01", "weights": torch.ones(2)}
    path = tmp_path / "numpy.pt"
    torch.save(state, path)
    loaded = load_weights_only(path)
    assert loaded["names"].tolist() == ["GENE1", "GENE2"] and loaded["mask"].dtype == bool
    np.testing.assert_array_equal(loaded["ints"], [0, 1, 2])
    assert loaded["scalar"] == np.float32(1.5) and loaded["raw"] == b"\x00\x01"
    # A plain dict: no default factory survives to be called later.
    assert type(loaded["registry"]) is dict and loaded["registry"] == {"batch": {"n": 2}}


def test_pandas_objects_are_refused_unless_asked_to_stand_in_and_then_run_no_pandas_code(tmp_path):
    path = tmp_path / "history.pt"
    torch.save({"history_": {"elbo": pd.DataFrame({"elbo": [1.0, 2.0]})}, "weights": torch.ones(2)}, path)
    with pytest.raises(UnsafeFileError, match="pandas"):
        load_weights_only(path)
    loaded = load_weights_only(path, inert_modules=("pandas",))
    assert is_inert(loaded["history_"]["elbo"]) and torch.equal(loaded["weights"], torch.ones(2))


@pytest.mark.parametrize("damage", ["truncated", "half", "garbage", "empty"])
def test_damaged_files_are_unreadable_not_unsafe(tmp_path, damage):
    good = tmp_path / "good.pt"
    torch.save({"weights": torch.randn(64, 64), "names": np.array(["a", "b"], dtype=object)}, good)
    data = good.read_bytes()
    bad = tmp_path / "bad.pt"
    bad.write_bytes({"truncated": data[:-50], "half": data[: len(data) // 2], "garbage": b"\xff" * 300,
                     "empty": b""}[damage])
    with pytest.raises(UnreadableFileError) as err:
        load_weights_only(bad)
    assert err.value.reason
    with pytest.raises(UnreadableFileError, match="no such file"):
        load_weights_only(tmp_path / "absent.pt")
