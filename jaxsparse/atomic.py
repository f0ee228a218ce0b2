"""Atomic, non-destructive writes: a reader sees the old file/directory or the complete new one, never a
part, and nothing jaxsparse did not write is ever deleted or replaced.

Files are written to a temporary name in the same directory, flushed to disk, then moved into
place with ``os.replace`` (atomic on POSIX within one file system), with the permissions the
user's umask gives a new file.

Output directories are built in a temporary sibling directory; when the ``with`` block succeeds
its entries are moved into the destination, which is created (mode from the umask) or, when it
already exists, kept as it is (its permissions and any other handle on it stay valid, so
``--output .`` works). Before anything heavy runs, :func:`check_output_dir` refuses:

- a destination that is a file (or a dangling link), lies below a file, or whose directory
  (the nearest existing ancestor, for a new one) cannot be written;
- a non-empty destination, unless ``overwrite=True`` *and* the directory is one jaxsparse wrote:
  it holds the marker file :data:`MARKER` and nothing the marker does not list. Then only the
  entries it lists are replaced; anything else makes it refuse. A marker naming anything but
  plain entry names (``..``, a path) proves nothing.

On any exception inside the block the temporary directory is removed and the destination is
left exactly as it was.

Example:
    >>> import os, tempfile
    >>> root = tempfile.mkdtemp()
    >>> atomic_write_bytes(os.path.join(root, "a.bin"), b"hello")
    >>> with atomic_dir(os.path.join(root, "adapter")) as tmp:
    ...     atomic_write_text(os.path.join(tmp, "config.json"), "{}")
    >>> sorted(os.listdir(root))
    ['a.bin', 'adapter']
    >>> sorted(os.listdir(os.path.join(root, "adapter")))
    ['.jaxsparse-output.json', 'config.json']
    >>> try:
    ...     check_output_dir(root)
    ... except OutputExistsError as e:
    ...     print("refused")
    refused
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator

PathLike = str | os.PathLike

# Written into every output directory jaxsparse creates: which tool wrote it and which entries are
# its own, so `--overwrite` can prove a directory is ours and replace only those entries.
MARKER = ".jaxsparse-output.json"


class OutputExistsError(FileExistsError, ValueError):
    """The output path exists and may not be written (not empty, not ours, or a file)."""


def _umask() -> int:
    # os.umask can only be read by setting it; restore at once (single-threaded at this point).
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def new_file_mode() -> int:
    """The permissions ``open()`` gives a new file under the current umask (``0o666 & ~umask``):
    for files written via ``tempfile.mkstemp`` (always 0600) and then renamed into place."""
    return 0o666 & ~_umask()


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
        # mkstemp makes the file 0600; a file we write gets the mode open() would give it.
        os.chmod(tmp, new_file_mode())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.errno and e.strerror and e.filename is None:
            # A full disk (ENOSPC from write/fsync) names no file: name the one being written.
            raise OSError(e.errno, e.strerror, path) from e
        raise
    _fsync_dir(parent)


def atomic_write_text(path: PathLike, text: str, encoding: str = "utf-8") -> None:
    """Write ``text`` to ``path`` atomically."""
    atomic_write_bytes(path, text.encode(encoding))


def read_marker(path: PathLike) -> dict | None:
    """The marker of a directory jaxsparse wrote (``{"tool", "entries", ...}``), or ``None``."""
    try:
        with open(os.path.join(path, MARKER), encoding="utf-8") as f:
            marker = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict) or marker.get("tool") != "jaxsparse":
        return None
    entries = marker.get("entries")
    if not isinstance(entries, list) or not all(_is_plain_name(e) for e in entries):
        # A marker naming "..", a path or anything odd could make --overwrite reach outside
        # the directory: it proves nothing, and the directory counts as foreign.
        return None
    return marker


def _is_plain_name(entry: object) -> bool:
    return (
        isinstance(entry, str)
        and entry not in ("", ".", "..", MARKER)
        and os.sep not in entry
        and (os.altsep is None or os.altsep not in entry)
        and "\0" not in entry
    )


def write_marker(path: PathLike, entries: list[str], **info: object) -> None:
    """Record ``entries`` (top-level names in ``path``) as jaxsparse's own."""
    from jaxsparse.version import __version__

    marker = {"tool": "jaxsparse", "version": __version__, **info, "entries": sorted(set(entries) - {MARKER})}
    atomic_write_text(os.path.join(path, MARKER), json.dumps(marker, indent=2) + "\n")


def foreign_entries(path: PathLike) -> list[str]:
    """Entries of directory ``path`` that jaxsparse did not write (all of them when it has no marker)."""
    names = sorted(os.listdir(path))
    marker = read_marker(path)
    own = set(marker["entries"]) | {MARKER} if marker else set()
    return [n for n in names if n not in own]


def is_leftover(name: str) -> bool:
    """Whether ``name`` is a temporary directory an interrupted jaxsparse write left inside an output
    (``.jaxsparse-XXXX.tmp`` / ``.old``, from a kill -9 or a power cut): ours, never the user's, so it
    neither makes a directory "not empty" nor "foreign". It is left in place (another run may own it)."""
    return re.fullmatch(r"\.jaxsparse-[A-Za-z0-9_]+\.(tmp|old)", name) is not None


def _nearest_existing(path: str) -> str:
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def _shown(names: list[str]) -> str:
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def check_output_dir(path: PathLike, *, overwrite: bool = False, _ignore: str | None = None) -> None:
    """Refuse, before any heavy work, an output directory jaxsparse may not write.

    Raises :class:`OutputExistsError` for a file, a non-empty directory (without ``overwrite``) or
    one holding anything jaxsparse did not write (even with ``overwrite``), and ``PermissionError``
    when the directory (or the parent it would be created in) cannot be written.
    """
    path = os.path.abspath(os.fspath(path))
    if os.path.lexists(path) and not os.path.isdir(path):
        raise OutputExistsError(f"output {path!r} exists and is not a directory; choose a directory path")
    if os.path.isdir(path):
        names = sorted(n for n in os.listdir(path) if n != _ignore and not is_leftover(n))
        if names and not overwrite:
            raise OutputExistsError(
                f"output directory {path!r} is not empty ({_shown(names)}); nothing was changed. Choose a "
                "new or empty directory, or pass --overwrite (in Python: overwrite=True) to replace a previous jaxsparse "
                "output there"
            )
        if names:
            foreign = [n for n in foreign_entries(path) if n != _ignore and not is_leftover(n)]
            if foreign:
                shown = _shown(foreign)
                why = (
                    "it holds entries jaxsparse did not write"
                    if read_marker(path)
                    else f"it was not written by jaxsparse (no {MARKER})"
                )
                raise OutputExistsError(
                    f"refusing to overwrite {path!r}: {why} ({shown}); nothing was changed. "
                    "Choose another output directory"
                )
    writable_dir = path if os.path.isdir(path) else _nearest_existing(os.path.dirname(path))
    if not os.path.isdir(writable_dir):
        raise OutputExistsError(
            f"cannot create the output {path!r}: {writable_dir!r} is a file, not a directory"
        )
    if not os.access(writable_dir, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write the output {path!r}: {writable_dir!r} is not writable")


def _install(tmp: str, path: str, info: dict) -> None:
    """Move the entries of ``tmp`` into ``path``; our previous entries there are set aside first and
    restored if anything fails."""
    # A marker already in tmp (a nested atomic_dir wrote into it) is replaced by this one.
    new = sorted(n for n in os.listdir(tmp) if n != MARKER)
    write_marker(tmp, new, **info)
    if not os.path.isdir(path):
        os.chmod(tmp, 0o777 & ~_umask())
        os.replace(tmp, path)
        return
    marker = read_marker(path)
    own = {*(marker["entries"] if marker else []), MARKER}
    # Only names that are really there (listdir never yields "..", a path, or a missing name).
    old = [n for n in sorted(os.listdir(path)) if n in own]
    # Set aside inside `path` itself: its parent (say /home for --output ~) may not be writable.
    aside = tempfile.mkdtemp(prefix=".jaxsparse-", suffix=".old", dir=path)
    moved_aside: list[str] = []
    moved_in: list[str] = []
    try:
        for name in old:
            os.replace(os.path.join(path, name), os.path.join(aside, name))
            moved_aside.append(name)
        for name in [*new, MARKER]:
            os.replace(os.path.join(tmp, name), os.path.join(path, name))
            moved_in.append(name)
    except BaseException:
        for name in moved_in:
            with contextlib.suppress(OSError):
                os.replace(os.path.join(path, name), os.path.join(tmp, name))
        for name in moved_aside:
            with contextlib.suppress(OSError):
                os.replace(os.path.join(aside, name), os.path.join(path, name))
        raise
    finally:
        shutil.rmtree(aside, ignore_errors=True)
    os.rmdir(tmp)


@contextlib.contextmanager
def atomic_dir(path: PathLike, *, overwrite: bool = False, **info: object) -> Iterator[str]:
    """Yield a fresh temporary directory beside ``path``; on success its entries land in ``path``.

    ``path`` must be new, empty, or (with ``overwrite=True``) a previous jaxsparse output holding
    nothing else (see :func:`check_output_dir`, called first). A marker (:data:`MARKER`, with
    ``info`` such as the verb) records the entries as ours. On any exception inside the block, the
    temporary directory (and any parent directory made for ``path``) is deleted and ``path`` is
    unchanged.
    """
    path = os.path.abspath(os.fspath(path))
    check_output_dir(path, overwrite=overwrite)
    parent = os.path.dirname(path)
    made_parents: list[str] = []  # deepest first
    if os.path.isdir(path):
        # Built inside the existing directory: same file system, and its parent may be read-only.
        tmp = tempfile.mkdtemp(prefix=".jaxsparse-", suffix=".tmp", dir=path)
    else:
        missing = parent
        while not os.path.exists(missing):
            made_parents.append(missing)
            missing = os.path.dirname(missing)
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=parent)
    try:
        yield tmp
        # Checked again: the directory may have changed while the block ran.
        check_output_dir(path, overwrite=overwrite, _ignore=os.path.basename(tmp))
        _install(tmp, path, info)
        _fsync_dir(path)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        for made in made_parents:
            with contextlib.suppress(OSError):  # not empty any more: someone else's now
                os.rmdir(made)
        if isinstance(e, OSError) and e.errno and e.strerror and e.filename is None:
            # A full disk (EFBIG/ENOSPC from a writer deep inside) names no file: name the output.
            raise OSError(e.errno, e.strerror, path) from e
        raise
