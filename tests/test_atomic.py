import json
from pathlib import Path

import pytest

from cdmix.atomic import atomic_write


@pytest.mark.parametrize("data, expected", [
    (b"\x00\x01bytes", b"\x00\x01bytes"),
    ("text é", "text é".encode()),
    (lambda fh: fh.write(json.dumps([1, 2]).encode()), b"[1, 2]"),
])
def test_atomic_write_replaces_the_file_and_leaves_no_temporary(tmp_path, data, expected):
    path = tmp_path / "f.bin"
    path.write_bytes(b"old content")
    atomic_write(path, data)
    assert path.read_bytes() == expected
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "f.txt"
    path.write_text("old")

    def broken(fh):
        fh.write(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(path, broken)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]


@pytest.mark.parametrize("kind", ["symlink", "folder", "fifo", "device"])
def test_atomic_write_refuses_anything_but_a_regular_file(tmp_path, kind):
    import os
    import stat

    from cdmix.errors import UserError

    target = tmp_path / "real.txt"
    target.write_text("keep")
    path = tmp_path / "out"
    if kind == "symlink":
        path.symlink_to(target)
    elif kind == "folder":
        path.mkdir()
    elif kind == "fifo":
        os.mkfifo(path)
    else:  # a character device like /dev/null, made here: a broken writer must not replace a real one
        try:
            os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(1, 3))
        except PermissionError:
            pytest.skip("making a device node needs root")
    with pytest.raises(UserError, match="symbolic link|is a folder|not a regular file"):
        atomic_write(path, "new")
    assert target.read_text() == "keep" and not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    if kind == "symlink":
        assert path.is_symlink()


def test_atomic_write_refuses_a_missing_folder(tmp_path):
    from cdmix.errors import UserError

    with pytest.raises(UserError, match="does not exist"):
        atomic_write(tmp_path / "missing" / "f.txt", "x")
    assert not (tmp_path / "missing").exists()


def test_atomic_write_uses_the_umask(tmp_path):
    import os

    old = os.umask(0o027)
    try:
        atomic_write(tmp_path / "f.txt", "x")
    finally:
        os.umask(old)
    assert (tmp_path / "f.txt").stat().st_mode & 0o777 == 0o640


def test_a_full_disk_names_the_path_and_keeps_the_old_file(tmp_path, monkeypatch):
    import errno
    import os

    from cdmix import atomic
    from cdmix.errors import UserError

    path = tmp_path / "checkpoint.pt"
    path.write_bytes(b"last good")

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(atomic.os, "fsync", full)
    with pytest.raises(UserError, match=f"cannot write {path}: No space left on device; the previous "
                                        "checkpoint.pt is unchanged"):
        atomic_write(path, b"new")
    assert path.read_bytes() == b"last good" and [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]
