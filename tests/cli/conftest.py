"""Fixtures several tests/cli modules share, built once per session."""

from __future__ import annotations

import pytest

from jaxsparse.cli import main
from tests.cli.sqft_qa import make_bases, train_argv


@pytest.fixture(scope="session")
def qa_bases(tmp_path_factory):
    """(dense, sparse, gptq) directories: the tiny Llama, magnitude-pruned to 50%, 4-bit in GPTQ layout."""
    return make_bases(tmp_path_factory.mktemp("qa"))


@pytest.fixture(scope="session")
def qa_run(qa_bases, tmp_path_factory):
    """The directory of one 4-step quantization-aware `jaxsparse train` run on :func:`qa_bases`
    (its adapter in ``run / "adapter"``). Read it only: other tests use it too."""
    _, sparse, gptq = qa_bases
    root = tmp_path_factory.mktemp("qa_run")
    run = root / "run"
    assert main(train_argv(root, sparse, gptq, run)) == 0
    return run
