"""``streamtotal info`` reports the kernel path actually in use."""

import json
import os
import subprocess
import sys

from streamtotal.model import native


def _info(**env) -> dict:
    res = subprocess.run([sys.executable, "-m", "streamtotal", "info", "--json"], capture_output=True, text=True,
                         env={**os.environ, **env})
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def test_info_names_the_kernel_path_and_follows_the_switch():
    on = _info(STREAMTOTAL_NATIVE="1")
    off = _info(STREAMTOTAL_NATIVE="0")
    assert "STREAMTOTAL_NATIVE=0" in off["kernels"] and off["kernels"].startswith("torch operations")
    if native._cpu_kernels is not None:
        assert on["kernels"].startswith("compiled CPU kernels")
    else:
        assert "not built" in on["kernels"]
    assert set(on["extras"]) == {"s3", "soma", "lamin", "mudata", "evaluate"}
    assert on["torch"]
