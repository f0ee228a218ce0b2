"""Every ```python block of the README and of docs/*.md runs as written, in order, in one namespace
per file, from a scratch working directory. Blocks that need a finished training run are fenced
```python no-run and are not collected here (their commands are covered by the CLI tests)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MARKDOWN = ["README.md", *sorted(str(p.relative_to(REPO)) for p in (REPO / "docs").glob("*.md"))]
# What a file's blocks must print, so a block that silently does nothing fails.
EXPECTED_OUTPUT = {
    "docs/training_api.md": ["[5, 10]", "factored SpaRTA loss", "peft_shira peft_shira", "SHIRA"],
    "docs/rank_sparse_lora.md": ["components with a gradient: 6 of 64 ( k = 6 )", "importance sums to 1.0"],
    "docs/sqft.md": ["on the grid: True", "zeros kept: True"],
}
# Files whose blocks load the real offline assets (SmolLM2 GGUF, MiniLM).
REAL = {"docs/models.md", "docs/models_decoders.md", "README.md"}


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", path.read_text(encoding="utf-8"), flags=re.S | re.M)


DOCS = [name for name in MARKDOWN if python_blocks(REPO / name)]


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=[pytest.mark.real] if n in REAL else []) for n in DOCS]
)
def test_doc_blocks_run(name, tmp_path, monkeypatch, capsys):
    blocks = python_blocks(REPO / name)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__doc__"}
    for i, block in enumerate(blocks):
        exec(compile(block, f"{name} (python block {i})", "exec"), namespace)
    out = capsys.readouterr().out
    for expected in EXPECTED_OUTPUT.get(name, []):
        assert expected in out, f"{name}: expected {expected!r} in the printed output"


def test_every_doc_has_runnable_blocks():
    """The block pattern is not silently matching nothing, and the README's example is collected."""
    assert "README.md" in DOCS
    assert len(python_blocks(REPO / "docs" / "training_api.md")) >= 5
    assert len(python_blocks(REPO / "docs" / "engine.md")) >= 3
