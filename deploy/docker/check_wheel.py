"""Fails unless the streamtotal wheel in a folder holds the compiled kernels (streamtotal/model/native/_*.so).

setup.py marks the extension optional, so that an install without a C compiler still works; an image build must
not rely on that, or it would ship without the kernels and nobody would notice. Used by both Dockerfiles' build
stages and by tests/deploy/test_wheel.py.

Usage: python check_wheel.py WHEEL_DIR
"""

from __future__ import annotations

import sys
import zipfile
from pathlib import Path


def compiled_modules(wheel: Path) -> list[str]:
    """The compiled extension modules of streamtotal's native kernels inside ``wheel``."""
    with zipfile.ZipFile(wheel) as zf:
        return [n for n in zf.namelist() if n.startswith("streamtotal/model/native/_") and n.endswith(".so")]


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__.strip().splitlines()[-1], file=sys.stderr)
        return 2
    wheels = sorted(Path(argv[1]).glob("streamtotal-*.whl"))
    if len(wheels) != 1:
        print(f"check_wheel: expected one streamtotal wheel in {argv[1]}, found {[w.name for w in wheels]}",
              file=sys.stderr)
        return 1
    found = compiled_modules(wheels[0])
    if not found:
        print(f"check_wheel: {wheels[0].name} holds no compiled kernels (streamtotal/model/native/_*.so): "
              "the C compiler or OpenMP was missing when it was built", file=sys.stderr)
        return 1
    print(f"check_wheel: {wheels[0].name} holds {', '.join(found)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
