"""Tests of loaders.atomic_files: an output is complete or as it was, and no temporary is left either way."""

import os

import pytest

from loaders.atomic_files import (
    atomic_write_bytes,
    atomic_write_text,
    replace_directory,
    temporary_sibling,
    write_directory_atomically,
    write_file_atomically,
)


def _mode(path):
    return os.stat(path).st_mode & 0o777


class _Interrupted(Exception):
    """Raised by a writer half-way through, as a full disk or a kill would stop it."""


def _half_write(f):
    f.write(b"half of the new")
    raise _Interrupted


def test_atomic_write_bytes_replaces_or_leaves_the_old_file(tmp_path):
    path = tmp_path / "sub" / "state.bin"
    atomic_write_bytes(path, lambda f: f.write(b"old"))
    assert path.read_bytes() == b"old"
    with pytest.raises(_Interrupted):
        atomic_write_bytes(path, _half_write)
    assert path.read_bytes() == b"old"
    assert sorted(os.listdir(path.parent)) == ["state.bin"]
    atomic_write_text(path, "new ✓")
    assert path.read_text(encoding="utf-8") == "new ✓"
    assert sorted(os.listdir(path.parent)) == ["state.bin"]
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    assert _mode(path) == _mode(plain)  # others may read it as they could a plainly written file


def test_write_file_atomically_hands_a_path_to_writers_that_need_one(tmp_path):
    path = tmp_path / "table.csv"
    path.write_text("old\n")

    def fail(tmp):
        tmp.write_text("partial")
        raise _Interrupted

    with pytest.raises(_Interrupted):
        write_file_atomically(path, fail)
    assert path.read_text() == "old\n" and sorted(os.listdir(tmp_path)) == ["table.csv"]
    assert write_file_atomically(path, lambda tmp: tmp.write_text("a,b\n1,2\n")) == path
    assert path.read_text() == "a,b\n1,2\n" and sorted(os.listdir(tmp_path)) == ["table.csv"]


def test_write_directory_atomically_keeps_the_old_directory_until_the_new_one_is_complete(tmp_path):
    out = tmp_path / "report"
    out.mkdir()
    (out / "old.txt").write_text("old")

    def fail(tmp):
        (tmp / "new.txt").write_text("new")
        raise _Interrupted

    with pytest.raises(_Interrupted):
        write_directory_atomically(out, fail)
    assert sorted(os.listdir(out)) == ["old.txt"] and sorted(os.listdir(tmp_path)) == ["report"]

    write_directory_atomically(out, lambda tmp: (tmp / "new.txt").write_text("new"))
    assert sorted(os.listdir(out)) == ["new.txt"] and sorted(os.listdir(tmp_path)) == ["report"]
    plain = tmp_path / "plain"
    plain.mkdir()
    assert _mode(out) == _mode(plain)


def test_replace_directory_replaces_a_symlink_without_following_it(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("not ours to delete")
    target = tmp_path / "store.zarr"
    target.symlink_to(elsewhere, target_is_directory=True)
    staged = temporary_sibling(target)
    assert staged.parent == tmp_path and staged.name.startswith(".store.zarr.tmp-") and not staged.exists()
    staged.mkdir()
    (staged / "new.txt").write_text("new")

    replace_directory(staged, target)

    assert not target.is_symlink() and sorted(os.listdir(target)) == ["new.txt"]
    assert (elsewhere / "keep.txt").read_text() == "not ours to delete"
    assert sorted(os.listdir(tmp_path)) == ["elsewhere", "store.zarr"]
