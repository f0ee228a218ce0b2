"""Atomic, non-destructive outputs: nothing jaxsparse did not write is ever deleted or changed."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from jaxsparse import atomic
from jaxsparse.atomic import (
    MARKER,
    OutputExistsError,
    atomic_dir,
    atomic_write_bytes,
    atomic_write_text,
    check_output_dir,
    read_marker,
)


def snapshot(root: Path) -> dict[str, tuple[int, bytes | None]]:
    """Every entry under ``root`` (itself included): its mode and, for files, its bytes."""
    out = {".": (os.stat(root).st_mode, None)}
    for path in sorted(root.rglob("*")):
        st = os.lstat(path)
        out[str(path.relative_to(root))] = (st.st_mode, path.read_bytes() if path.is_file() else None)
    return out


def user_dir(path: Path) -> Path:
    """A directory of the user's own files (a file, a subfolder with a file, an unusual mode)."""
    path.mkdir(parents=True)
    (path / "notes.txt").write_text("my notes")
    (path / "sub").mkdir()
    (path / "sub" / "data.bin").write_bytes(b"\x00\x01")
    path.chmod(0o751)
    return path


def write(path: Path, files: dict[str, str], **kw) -> None:
    with atomic_dir(path, **kw) as tmp:
        for name, text in files.items():
            atomic_write_text(os.path.join(tmp, name), text)


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


# --------------------------------------------------------------------------- files


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


def test_a_full_disk_names_the_file_and_keeps_the_old_one(tmp_path, monkeypatch):
    target = tmp_path / "f.txt"
    atomic_write_text(target, "old")

    def full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(atomic.os, "fsync", full)
    with pytest.raises(OSError, match="No space left on device") as e:
        atomic_write_text(target, "new")
    assert e.value.errno == 28 and e.value.filename == str(target)
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["f.txt"]


# --------------------------------------------------------------------------- new directories


def test_new_directory_gets_the_entries_and_a_marker(tmp_path):
    out = tmp_path / "out"
    with atomic_dir(out, verb="test") as tmp:
        assert not out.exists()  # nothing visible before the block succeeds
        Path(tmp, "a").write_text("1")
        os.mkdir(os.path.join(tmp, "d"))
    assert (out / "a").read_text() == "1" and (out / "d").is_dir()
    marker = json.loads((out / MARKER).read_text())
    assert marker["tool"] == "jaxsparse" and marker["verb"] == "test"
    assert marker["entries"] == ["a", "d"]
    assert os.listdir(tmp_path) == ["out"]  # no temporary left beside it


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_new_directories_and_files_get_the_umask_permissions(tmp_path, umask):
    old = os.umask(umask)
    try:
        out = tmp_path / "parent" / "out"  # the missing parent too
        write(out, {"a.json": "{}"})
    finally:
        os.umask(old)
    assert mode(out) == 0o777 & ~umask
    assert mode(out.parent) == 0o777 & ~umask
    assert mode(out / "a.json") == 0o666 & ~umask
    assert mode(out / MARKER) == 0o666 & ~umask


@pytest.mark.parametrize("where", ["out", "new/parents/out"])
def test_failure_inside_the_block_leaves_nothing(tmp_path, where):
    out = tmp_path / where
    with pytest.raises(RuntimeError), atomic_dir(out) as tmp:
        Path(tmp, "a").write_text("partial")
        raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []


# --------------------------------------------------------------------------- existing directories


def test_an_empty_existing_directory_is_used_in_place(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o750)
    inode = os.stat(out).st_ino
    write(out, {"a": "1"})
    assert sorted(os.listdir(out)) == [MARKER, "a"]
    assert os.stat(out).st_ino == inode and mode(out) == 0o750  # the same directory, its mode kept


def test_dot_in_an_empty_folder_works(tmp_path, monkeypatch):
    folder = tmp_path / "here"
    folder.mkdir()
    monkeypatch.chdir(folder)
    write(Path("."), {"a": "1"})
    assert sorted(os.listdir(folder)) == [MARKER, "a"]
    assert os.listdir(tmp_path) == ["here"]


def test_dot_in_a_folder_of_user_files_is_refused(tmp_path, monkeypatch):
    folder = user_dir(tmp_path / "home")
    before = snapshot(folder)
    monkeypatch.chdir(folder)
    for overwrite in (False, True):
        with pytest.raises(OutputExistsError):
            write(Path("."), {"a": "1"}, overwrite=overwrite)
        assert snapshot(folder) == before  # every file byte-identical, permissions unchanged


def test_a_non_empty_user_directory_is_refused_with_or_without_overwrite(tmp_path):
    out = user_dir(tmp_path / "out")
    before = snapshot(out)
    with pytest.raises(OutputExistsError, match=r"is not empty \(notes.txt, sub\).*--overwrite"):
        write(out, {"a": "1"})
    with pytest.raises(OutputExistsError, match=f"not written by jaxsparse \\(no {MARKER}\\)"):
        write(out, {"a": "1"}, overwrite=True)
    assert snapshot(out) == before
    assert os.listdir(tmp_path) == ["out"]


def test_overwrite_replaces_a_previous_output(tmp_path):
    out = tmp_path / "out"
    write(out, {"a": "1", "old-only": "x"})
    before = snapshot(out)
    with pytest.raises(OutputExistsError, match="not empty"):
        write(out, {"a": "2"})
    assert snapshot(out) == before
    write(out, {"a": "2", "b": "3"}, overwrite=True)
    assert sorted(os.listdir(out)) == [MARKER, "a", "b"]  # our stale entry is gone too
    assert (out / "a").read_text() == "2"
    assert read_marker(out)["entries"] == ["a", "b"]
    assert os.listdir(tmp_path) == ["out"]


def test_overwrite_refuses_a_previous_output_with_a_user_file_added(tmp_path):
    out = tmp_path / "out"
    write(out, {"a": "1"})
    (out / "mine.txt").write_text("mine")
    before = snapshot(out)
    with pytest.raises(OutputExistsError, match=r"entries jaxsparse did not write \(mine.txt\)"):
        write(out, {"a": "2"}, overwrite=True)
    assert snapshot(out) == before


@pytest.mark.parametrize(
    "marker",
    [
        "not json",
        json.dumps({"tool": "other", "entries": ["notes.txt", "sub"]}),
        json.dumps({"tool": "jaxsparse", "entries": "notes.txt"}),
        json.dumps({"tool": "jaxsparse", "entries": ["notes.txt", "sub", "../victim"]}),
        json.dumps({"tool": "jaxsparse", "entries": ["notes.txt", "sub", "/abs"]}),
        json.dumps(["tool", "jaxsparse"]),
    ],
)
def test_a_forged_or_broken_marker_proves_nothing(tmp_path, marker):
    out = user_dir(tmp_path / "out")
    (out / MARKER).write_text(marker)
    victim = tmp_path / "victim"
    victim.write_text("outside")
    before = snapshot(tmp_path)
    with pytest.raises(OutputExistsError, match="not written by jaxsparse"):
        write(out, {"a": "1"}, overwrite=True)
    assert snapshot(tmp_path) == before


def test_failure_inside_the_block_keeps_the_previous_output(tmp_path):
    out = tmp_path / "out"
    write(out, {"a": "good"})
    before = snapshot(out)
    with pytest.raises(RuntimeError), atomic_dir(out, overwrite=True) as tmp:
        Path(tmp, "a").write_text("partial")
        raise RuntimeError("boom")
    assert snapshot(out) == before
    assert os.listdir(tmp_path) == ["out"]


# os.replace calls: 1-3 write a, b and the marker in the temporary directory; 4-6 set our old
# entries aside; 7-9 move the new ones in. A failure at any stage must restore the old output.
@pytest.mark.parametrize("failing_call", [4, 6, 7, 9])
def test_a_failed_install_puts_the_previous_output_back(tmp_path, monkeypatch, failing_call):
    out = tmp_path / "out"
    write(out, {"a": "good", "b": "good"})
    before = snapshot(out)
    real_replace = os.replace
    calls = []

    def flaky_replace(src, dst):
        calls.append(dst)
        if len(calls) == failing_call:
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "replace", flaky_replace)
    with pytest.raises(OSError, match="No space left"):
        write(out, {"a": "new", "b": "new"}, overwrite=True)
    monkeypatch.setattr(atomic.os, "replace", real_replace)
    assert snapshot(out) == before
    assert os.listdir(tmp_path) == ["out"]


@pytest.mark.parametrize("exists", [False, True])
def test_a_nested_atomic_dir_lands_as_one_output(tmp_path, exists):
    # `jaxsparse merge`: save_pretrained (itself atomic) writes into the verb's temporary directory.
    out = tmp_path / "out"
    if exists:
        out.mkdir()
    with atomic_dir(out) as tmp:
        write(Path(tmp), {"a": "1"})
        Path(tmp, "b").write_text("2")
    assert sorted(os.listdir(out)) == [MARKER, "a", "b"]
    assert read_marker(out)["entries"] == ["a", "b"]


def test_a_user_file_appearing_during_the_write_is_kept(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(OutputExistsError, match="not empty"), atomic_dir(out) as tmp:
        Path(tmp, "a").write_text("1")
        (out / "late.txt").write_text("written meanwhile")
    assert sorted(os.listdir(out)) == ["late.txt"]
    assert (out / "late.txt").read_text() == "written meanwhile"


# --------------------------------------------------------------------------- paths that cannot be written


def test_a_file_is_refused(tmp_path):
    target = tmp_path / "out"
    target.write_text("a file")
    for overwrite in (False, True):
        with pytest.raises(OutputExistsError, match="is not a directory"):
            write(target, {"a": "1"}, overwrite=overwrite)
    assert target.read_text() == "a file" and os.listdir(tmp_path) == ["out"]


def test_a_path_below_a_file_is_refused(tmp_path):
    (tmp_path / "f").write_text("a file")
    with pytest.raises(OutputExistsError, match="is a file, not a directory"):
        check_output_dir(tmp_path / "f" / "out")


def test_a_dangling_symlink_is_refused(tmp_path):
    (tmp_path / "link").symlink_to(tmp_path / "nowhere")
    with pytest.raises(OutputExistsError, match="not a directory"):
        write(tmp_path / "link", {"a": "1"})
    assert not (tmp_path / "nowhere").exists()


def _deny_writes_under(monkeypatch, denied: Path) -> None:
    """Emulate a read-only directory for a process that ignores permissions (root)."""
    real_access = os.access

    def access(path, mode_, *args, **kwargs):
        if os.path.abspath(path) == str(denied) and mode_ & os.W_OK:
            return False
        return real_access(path, mode_, *args, **kwargs)

    monkeypatch.setattr(atomic.os, "access", access)


def test_a_read_only_parent_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    parent = tmp_path / "ro"
    parent.mkdir()
    _deny_writes_under(monkeypatch, parent)
    with pytest.raises(PermissionError, match="is not writable"):
        check_output_dir(parent / "a" / "out")  # the nearest existing ancestor counts
    with pytest.raises(PermissionError, match="is not writable"), atomic_dir(parent / "out"):
        pytest.fail("the block must not run")
    assert os.listdir(parent) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_a_really_read_only_parent_is_refused(tmp_path):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        with pytest.raises(PermissionError):
            write(parent / "out", {"a": "1"})
        assert os.listdir(parent) == []
    finally:
        parent.chmod(0o755)


def test_an_empty_directory_in_a_read_only_parent_works(tmp_path, monkeypatch):
    # --output ~ where /home is not writable: everything is built inside the directory itself.
    parent = tmp_path / "ro"
    out = parent / "home"
    out.mkdir(parents=True)
    _deny_writes_under(monkeypatch, parent)
    write(out, {"a": "1"})
    write(out, {"a": "2"}, overwrite=True)
    assert (out / "a").read_text() == "2" and os.listdir(parent) == ["home"]


def test_leftover_temp_of_a_killed_write_does_not_block(tmp_path):
    """A `kill -9` mid-write leaves `.jaxsparse-XXXX.tmp` inside the output: ours, so the directory still
    counts as empty (and as ours under --overwrite), and the leftover is not deleted."""
    out = tmp_path / "out"
    out.mkdir()
    leftover = out / ".jaxsparse-abc123.tmp"
    leftover.mkdir()
    (leftover / "partial.bin").write_bytes(b"x")
    with atomic_dir(out) as tmp:
        Path(tmp, "a").write_text("1")
    assert (out / "a").read_text() == "1"
    assert (leftover / "partial.bin").read_bytes() == b"x"
    with atomic_dir(out, overwrite=True) as tmp:
        Path(tmp, "a").write_text("2")
    assert (out / "a").read_text() == "2"
    # A user's hidden folder of another name is still foreign.
    (out / ".jaxsparse-notes").mkdir()
    with pytest.raises(OutputExistsError, match="did not write"), atomic_dir(out, overwrite=True):
        pass
