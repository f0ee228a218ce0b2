"""`jaxsparse export / import / merge` never destroy what was in --output (see tests/cli/safety.py).

A tiny Llama saved by our own writer and a SHiRA adapter for it: no PyTorch needed, fast.
"""

from __future__ import annotations

import pytest

from jaxsparse import models
from jaxsparse.cli import main
from tests.cli.safety import CASES, check_output_safety, write_llama_and_shira_adapter


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return write_llama_and_shira_adapter(tmp_path_factory.mktemp("safety").absolute())


def _argv(verb, model, adapter, output, overwrite):
    flags = ["--overwrite"] if overwrite else []
    if verb == "export":
        return [
            "export",
            "--adapter",
            adapter,
            "--format",
            "sparta",
            "--model",
            model,
            "--output",
            output,
            *flags,
        ]
    return [verb, "--model", model, "--adapter", adapter, "--output", output, *flags]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("verb", ["export", "import", "merge"])
def test_writing_verbs_never_destroy_the_output(verb, case, inputs, tmp_path, monkeypatch, capsys):
    model, adapter = inputs

    def run(output: str, overwrite: bool) -> int:
        return main([str(a) for a in _argv(verb, model, adapter, output, overwrite)])

    check_output_safety(case, run, verb, tmp_path, monkeypatch, capsys)


@pytest.mark.parametrize("verb", ["export", "import", "merge"])
def test_refusal_comes_before_any_model_is_loaded(verb, inputs, tmp_path, capsys, monkeypatch):
    model, adapter = inputs
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the output was checked")

    monkeypatch.setattr(models, "from_pretrained", no_loading)
    assert main([str(a) for a in _argv(verb, model, adapter, tmp_path / "out", False)]) == 2
    assert "is not empty" in capsys.readouterr().err
