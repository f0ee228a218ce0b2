"""Shared CLI helpers: one-line errors with exit status 2, and the missing-base-model message."""

import pytest

from jaxsparse.cli import common


def test_fail_prints_one_line_and_returns_2(capsys):
    assert common.fail("export", KeyError("no such key 'x'")) == 2
    assert capsys.readouterr().err == "jaxsparse export: error: no such key 'x'\n"  # KeyError text unquoted
    assert common.fail("merge", ValueError("bad\nthing")) == 2
    assert capsys.readouterr().err.startswith("jaxsparse merge: error: bad")


def test_base_model_must_exist(tmp_path):
    adapter = tmp_path / "a"
    adapter.mkdir()
    (adapter / "config.json").write_text('{"sparta_pretrained_model": "hub/name"}')
    (adapter / "sparse_deltas.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="records base model 'hub/name', which is not a local path"):
        common.load_base_for_adapter(None, str(adapter))
    with pytest.raises(FileNotFoundError, match="base model not found"):
        common.load_base_for_adapter(str(tmp_path / "missing"), str(adapter))


def test_message_of_is_one_line_and_names_the_file():
    import errno

    assert common.message_of(OSError(errno.ENOSPC, "No space left on device", "/d/x")) == (
        "/d/x: No space left on device"
    )
    assert common.message_of(ValueError("a\n  b\n\nc")) == "a b c"
    assert common.message_of(KeyError("k 'x'")) == "k 'x'"
    assert common.message_of(ValueError()) == "ValueError"


def test_user_errors_include_lazily_imported_classes_only_once_loaded():
    from jaxsparse import checkpoint

    assert common.is_user_error(checkpoint.CheckpointError("no checkpoint"))
    assert common.is_user_error(PermissionError("read-only"))
    assert not common.is_user_error(RuntimeError("a bug"))
    assert not common.is_user_error(ZeroDivisionError())
