"""Atomic writes: a reader sees either the old file/directory or the complete new one, never a part.

Files are written to a temporary name in the same directory, flushed to disk, then moved into
place with ``os.replace`` (atomic on POSIX within one file system). Directories are built in a
temporary sibling directory and renamed into place only when the ``with`` block succeeds; on any
exception the temporary directory is removed and the destination is left untouched.

Example:
    >>> import os, tempfile
    >>> root = tempfile.mkdtemp()
    >>> atomic_write_bytes(os.path.join(root, "a.bin"), b"hello")
    >>> with atomic_dir(os.path.join(root, "adapter")) as tmp:
    ...     atomic_write_text(os.path.join(tmp, "config.json"), "{}")
    >>> sorted(os.listdir(root))
    ['a.bin', 'adapter']
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator

PathLike = str | os.PathLike


def _fsync_dir(path: PathLike) -> None:
    # Persist the rename itself; not every platform lets a directory be opened.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file beside it, fsync, ``os.replace``)."""
    path = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(parent)


def atomic_write_text(path: PathLike, text: str, encoding: str = "utf-8") -> None:
    """Write ``text`` to ``path`` atomically."""
    atomic_write_bytes(path, text.encode(encoding))


@contextlib.contextmanager
def atomic_dir(path: PathLike, *, overwrite: bool = True) -> Iterator[str]:
    """Yield a fresh temporary directory beside ``path``; on success it replaces ``path``.

    With ``overwrite=False`` an existing ``path`` raises ``FileExistsError`` before anything is
    written. With ``overwrite=True`` an existing directory is swapped out (renamed aside, the new
    one renamed in, the old one deleted), so ``path`` is never missing nor half-written. On any
    exception inside the block, the temporary directory is deleted and ``path`` is unchanged.
    """
    path = os.path.abspath(os.fspath(path))
    parent = os.path.dirname(path)
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"output directory {path!r} already exists (pass overwrite=True to replace it)")
    if os.path.exists(path) and not os.path.isdir(path):
        raise NotADirectoryError(f"output path {path!r} exists and is not a directory")
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=parent)
    try:
        yield tmp
        if os.path.exists(path):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.", suffix=".old", dir=parent)
            os.rmdir(old)
            os.replace(path, old)
            try:
                os.replace(tmp, path)
            except BaseException:
                os.replace(old, path)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
        _fsync_dir(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
