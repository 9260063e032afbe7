"""Choosing cells by name: a name that several cells bear is refused as ambiguous, never resolved to one of them."""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import zarr

from streamtotal.errors import SelectionError
from streamtotal.inference.cell_names import cell_ids_from_names


def test_names_map_to_ids_in_the_requested_order():
    ids = cell_ids_from_names(["a", "b", "c", "d"], ["c", "a"])
    np.testing.assert_array_equal(ids, [2, 0])


def test_a_name_borne_by_several_cells_is_ambiguous_and_counted():
    names = ["a", "dup", "b", "dup", "twice", "dup", "twice"]
    assert cell_ids_from_names(names, ["a", "b"]).tolist() == [0, 2]  # unique names still work
    with pytest.raises(SelectionError) as err:
        cell_ids_from_names(names, ["a", "twice", "dup", "twice"])
    message = str(err.value)
    assert "2 requested cell name(s) are ambiguous" in message
    assert "'twice' (2 cells), 'dup' (3 cells)" in message and "'a'" not in message


@pytest.fixture
def duplicated_store(small_store, tmp_path):
    """A copy of ``small_store`` (study ``dups``) where cells 5, 9 and 12 are also named ``cell3``."""
    path = tmp_path / "dups.zarr"
    shutil.copytree(small_store, path)
    index = zarr.open_group(str(path / "obs"), mode="r+", zarr_format=2, use_consolidated=False)["_index"]
    for i in (5, 9, 12):
        index[i] = "cell3"
    return path


def test_the_cli_refuses_an_ambiguous_cell_name_with_exit_2(trained_run, duplicated_store):
    # Duplicated names make every name of the study 'study:name' (Collection.obs_frame); still ambiguous.
    proc = subprocess.run(
        [sys.executable, "-m", "streamtotal", "elbo", str(trained_run), str(duplicated_store), "--cells",
         "dups:cell3", "dups:cell7", "--batch-size", "64", "--device", "cpu", "--no-progress"],
        env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    assert "'dups:cell3' (4 cells)" in proc.stderr and "ambiguous" in proc.stderr
    assert "Traceback" not in proc.stderr
