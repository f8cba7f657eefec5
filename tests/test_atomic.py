import json

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
