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


@pytest.fixture(scope="module")
def compilation_cache(tmp_path_factory):
    """A module whose runs compile the same train steps again and again: JAX's persistent cache
    (in a fresh directory per module) compiles each once; the settings are restored afterwards."""
    import jax

    keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
    old = {k: getattr(jax.config, k) for k in keys}
    jax.config.update(keys[0], str(tmp_path_factory.mktemp("jax-cache")))
    jax.config.update(keys[1], 0.0)
    yield
    for k, v in old.items():
        jax.config.update(k, v)
