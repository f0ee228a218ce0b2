"""The output-safety checks every writing verb must pass (export, import, merge, train, ...).

A verb's test module supplies ``run(output: str, overwrite: bool) -> int``, a function that runs
the verb in this process (``jaxsparse.cli.main([...])``) writing to ``output`` (with
``--overwrite`` when asked), and calls :func:`check_output_safety` once per case in
:data:`CASES`::

    from tests.cli.safety import CASES, check_output_safety

    @pytest.mark.parametrize("case", CASES)
    def test_train_output_safety(case, tmp_path, monkeypatch, capsys):
        def run(output, overwrite):
            return main(["train", ..., "--output", output, *(["--overwrite"] if overwrite else [])])
        check_output_safety(case, run, "train", tmp_path, monkeypatch, capsys)

Every refusal must exit 2 with one line on stderr, before anything is written, and leave every
pre-existing file byte-identical and every permission unchanged.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path

from jaxsparse import atomic
from jaxsparse.atomic import MARKER, read_marker

CASES = (
    "non_empty_user_dir",
    "dot_in_a_folder_of_user_files",
    "dot_in_an_empty_folder",
    "path_is_a_file",
    "read_only_parent",
    "overwrite_previous_output",
    "overwrite_foreign_dir",
    "umask_022",
    "umask_077",
)

Run = Callable[[str, bool], int]


def write_llama_and_shira_adapter(root: Path) -> tuple[Path, Path]:
    """``(model_dir, adapter_dir)`` under ``root``: a one-block Llama saved by our own writer and a SHiRA
    adapter on its ``q_proj`` (no PyTorch needed, fast)."""
    import jax
    import transformers

    from jaxsparse import models
    from jaxsparse.adapter_io import save_adapter
    from jaxsparse.methods import shira

    config = transformers.LlamaConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
    )
    models.save_pretrained(models.init_params(config, task="causal_lm", seed=0), root / "model")
    model = models.from_pretrained(root / "model")
    adapter = shira.init(model.params, shira.ShiraConfig(r=1, target_modules=["q_proj"]), jax.random.key(0))
    save_adapter(adapter, root / "adapter", model=model)
    return root / "model", root / "adapter"


def snapshot(root: Path) -> dict[str, tuple[int, bytes | None]]:
    """Every entry under ``root`` (itself included): its mode and, for files, its bytes."""
    out: dict[str, tuple[int, bytes | None]] = {".": (os.stat(root).st_mode, None)}
    for path in sorted(root.rglob("*")):
        st = os.lstat(path)
        out[str(path.relative_to(root))] = (st.st_mode, path.read_bytes() if path.is_file() else None)
    return out


def user_dir(path: Path) -> Path:
    """A directory of the user's own files: a file, a subfolder with a file, an unusual mode."""
    path.mkdir(parents=True)
    (path / "notes.txt").write_text("my notes")
    (path / "sub").mkdir()
    (path / "sub" / "data.bin").write_bytes(b"\x00\x01\x02")
    path.chmod(0o751)
    return path


def deny_writes(monkeypatch, denied: Path) -> None:
    """Make ``denied`` read-only for jaxsparse's checks; as root, real permissions are ignored."""
    if os.geteuid() != 0:
        denied.chmod(0o555)
        return
    real_access = os.access

    def access(path, mode, *args, **kwargs):
        if os.path.abspath(path) == str(denied) and mode & os.W_OK:
            return False
        return real_access(path, mode, *args, **kwargs)

    monkeypatch.setattr(atomic.os, "access", access)


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _refused(code: int, capsys, verb: str, *phrases: str) -> str:
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith(f"jaxsparse {verb}: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    for phrase in phrases:
        assert phrase in err, err
    return err


def _written(code: int, capsys, out: Path) -> None:
    captured = capsys.readouterr()
    assert code == 0, captured.err
    marker = read_marker(out)
    assert marker is not None, sorted(os.listdir(out))
    assert sorted(marker["entries"]) == sorted(n for n in os.listdir(out) if n != MARKER)
    assert not [n for n in os.listdir(out) if n.endswith((".tmp", ".old"))]  # no temporary left inside


def check_output_safety(case: str, run: Run, verb: str, tmp_path: Path, monkeypatch, capsys) -> None:
    """Run ``case`` (one of :data:`CASES`) against the verb ``run`` runs; see the module docstring."""
    tmp_path = tmp_path.absolute()
    area = tmp_path / "area"  # everything the case creates lives here, so a stray temporary shows
    area.mkdir()
    if case == "non_empty_user_dir":
        out = user_dir(area / "out")
        before = snapshot(area)
        _refused(run(str(out), False), capsys, verb, "is not empty", "--overwrite", "notes.txt")
        assert snapshot(area) == before
    elif case == "dot_in_a_folder_of_user_files":
        folder = user_dir(area / "home")
        before = snapshot(area)
        monkeypatch.chdir(folder)
        _refused(run(".", False), capsys, verb, "is not empty")
        _refused(run(".", True), capsys, verb, "not written by jaxsparse")
        assert snapshot(area) == before  # every file byte-identical, the folder's mode still 0751
    elif case == "dot_in_an_empty_folder":
        folder = area / "empty"
        folder.mkdir()
        folder.chmod(0o751)
        inode = os.stat(folder).st_ino
        monkeypatch.chdir(folder)
        _written(run(".", False), capsys, folder)
        assert os.stat(folder).st_ino == inode and _mode(folder) == 0o751  # the same folder, its mode kept
        assert os.listdir(area) == ["empty"]
    elif case == "path_is_a_file":
        target = area / "out"
        target.write_text("a file of mine")
        before = snapshot(area)
        _refused(run(str(target), False), capsys, verb, "is not a directory")
        _refused(run(str(target), True), capsys, verb, "is not a directory")
        assert snapshot(area) == before
    elif case == "read_only_parent":
        parent = area / "ro"
        parent.mkdir()
        deny_writes(monkeypatch, parent)
        try:
            _refused(run(str(parent / "out"), False), capsys, verb, "not writable")
            assert os.listdir(parent) == []
        finally:
            parent.chmod(0o755)
    elif case == "overwrite_previous_output":
        out = area / "out"
        _written(run(str(out), False), capsys, out)
        before = snapshot(area)
        inodes = {p.name: os.stat(p).st_ino for p in out.iterdir()}
        _refused(run(str(out), False), capsys, verb, "is not empty", "--overwrite")
        assert snapshot(area) == before
        _written(run(str(out), True), capsys, out)
        assert sorted(os.listdir(out)) == sorted(inodes)  # the same entries ...
        assert all(os.stat(out / n).st_ino != i for n, i in inodes.items())  # ... each one replaced
        assert os.listdir(area) == ["out"]
    elif case == "overwrite_foreign_dir":
        foreign = user_dir(area / "foreign")
        ours = area / "ours"
        _written(run(str(ours), False), capsys, ours)
        (ours / "added-by-me.txt").write_text("mine")
        before = snapshot(area)
        _refused(run(str(foreign), True), capsys, verb, "not written by jaxsparse")
        _refused(run(str(ours), True), capsys, verb, "did not write", "added-by-me.txt")
        assert snapshot(area) == before
    elif case in ("umask_022", "umask_077"):
        umask = int(case.removeprefix("umask_"), 8)
        old = os.umask(umask)
        try:
            out = area / "new" / "out"  # its parent is created too
            code = run(str(out), False)
        finally:
            os.umask(old)
        _written(code, capsys, out)
        for path in [out.parent, out, *out.rglob("*")]:
            want = (0o777 if path.is_dir() else 0o666) & ~umask
            assert _mode(path) == want, f"{path}: {oct(_mode(path))}, want {oct(want)}"
    else:
        raise ValueError(f"unknown case {case!r}; one of {CASES}")
