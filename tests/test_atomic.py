import os
from pathlib import Path

import pytest

from jaxsparse.atomic import atomic_dir, atomic_write_bytes, atomic_write_text


def test_write_bytes_replaces_and_leaves_no_temp(tmp_path):
    target = tmp_path / "f.bin"
    atomic_write_bytes(target, b"one")
    atomic_write_bytes(target, b"two")
    assert target.read_bytes() == b"two"
    assert os.listdir(tmp_path) == ["f.bin"]


def test_write_failure_keeps_old_file(tmp_path):
    target = tmp_path / "f.txt"
    atomic_write_text(target, "old")
    with pytest.raises(TypeError):
        atomic_write_bytes(target, "not bytes")  # type: ignore[arg-type]
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["f.txt"]


def test_atomic_dir_success_and_overwrite(tmp_path):
    out = tmp_path / "out"
    with atomic_dir(out) as tmp:
        assert not out.exists()
        Path(tmp, "a").write_text("1")
    assert (out / "a").read_text() == "1"
    with atomic_dir(out) as tmp:
        Path(tmp, "b").write_text("2")
    assert sorted(os.listdir(out)) == ["b"]
    assert os.listdir(tmp_path) == ["out"]


def test_atomic_dir_failure_leaves_nothing(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError), atomic_dir(out) as tmp:
        Path(tmp, "a").write_text("partial")
        raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []


def test_atomic_dir_failure_keeps_previous(tmp_path):
    out = tmp_path / "out"
    with atomic_dir(out) as tmp:
        Path(tmp, "a").write_text("good")
    with pytest.raises(RuntimeError), atomic_dir(out) as tmp:
        raise RuntimeError("boom")
    assert (out / "a").read_text() == "good"
    assert os.listdir(tmp_path) == ["out"]


def test_atomic_dir_no_overwrite(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(FileExistsError, match="already exists"), atomic_dir(out, overwrite=False):
        pass
