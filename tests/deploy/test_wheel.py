"""A wheel built from a clean checkout holds the compiled kernels, as the Dockerfiles' build stages require."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CHECK = REPO / "deploy" / "docker" / "check_wheel.py"


def _clean_checkout(dest: Path) -> Path:
    """The tracked files of the repository (no in-place build outputs, no untracked files) copied to ``dest``."""
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("needs a git checkout to know the tracked files")
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    for name in filter(None, listed.decode().split("\0")):
        src = REPO / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    return dest


def test_wheel_from_clean_checkout_holds_the_compiled_kernels(tmp_path):
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler here: the Dockerfiles' build stages install one")
    src = _clean_checkout(tmp_path / "src")
    assert not list(src.rglob("*.so")), "the copy must not carry an in-place build"
    out = tmp_path / "wheels"
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "--wheel-dir", str(out), str(src)], capture_output=True, text=True)
    assert built.returncode == 0, built.stdout + built.stderr
    checked = subprocess.run([sys.executable, str(CHECK), str(out)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "streamtotal/model/native/_" in checked.stdout


def test_check_wheel_refuses_a_wheel_without_kernels(tmp_path):
    import zipfile

    with zipfile.ZipFile(tmp_path / "streamtotal-0.1.0-py3-none-any.whl", "w") as zf:
        zf.writestr("streamtotal/model/native/__init__.py", "")
        zf.writestr("streamtotal/__init__.py", "")
    checked = subprocess.run([sys.executable, str(CHECK), str(tmp_path)], capture_output=True, text=True)
    assert checked.returncode == 1
    assert "holds no compiled kernels" in checked.stderr
