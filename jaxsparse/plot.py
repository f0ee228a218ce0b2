"""A PNG of a run's curves from its ``metrics.jsonl``: training loss, and eval accuracy/macro-F1
(classification) or eval perplexity (causal LM), against the step.

Each line of ``metrics.jsonl`` is a JSON object with ``step`` and either ``split: "train"``
(``loss``) or ``split: "eval"`` (``loss`` plus ``accuracy``/``macro_f1`` or ``perplexity``).

Example:
    >>> import json, os, tempfile
    >>> d = tempfile.mkdtemp()
    >>> with open(os.path.join(d, "metrics.jsonl"), "w") as f:
    ...     for s in (1, 2):
    ...         print(json.dumps({"split": "train", "step": s, "loss": 1.0 / s}), file=f)
    ...     print(json.dumps({"split": "eval", "step": 2, "loss": 0.4, "accuracy": 0.8}), file=f)
    >>> os.path.basename(plot_metrics(os.path.join(d, "metrics.jsonl")))
    'metrics.png'
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a metrics JSONL file; ``ValueError`` naming the file and line if one is bad."""
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not a JSON object: {e}") from None
            if not isinstance(rec, dict) or "step" not in rec or "split" not in rec:
                raise ValueError(f"{path}:{lineno}: expected an object with 'step' and 'split'")
            records.append(rec)
    return records


def _series(records: list[dict[str, Any]], split: str, key: str) -> tuple[list[int], list[float]]:
    # A resumed run re-logs steps after its checkpoint: the last record of a step wins.
    by_step = {r["step"]: r[key] for r in records if r["split"] == split and r.get(key) is not None}
    steps = sorted(by_step)
    return steps, [float(by_step[s]) for s in steps]


def plot_metrics(
    path: str | os.PathLike, out: str | os.PathLike | None = None, title: str | None = None
) -> str:
    """Draw ``path`` (metrics.jsonl) to ``out`` (default: ``metrics.png`` beside it), atomically.

    Returns the PNG path. Left panel: train (and eval) loss; right panel: eval accuracy and
    macro-F1, or eval perplexity, whichever the records hold.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(path)
    out = Path(out) if out is not None else Path(path).with_name("metrics.png")
    quality = [k for k in ("accuracy", "macro_f1", "perplexity") if _series(records, "eval", k)[0]]
    fig, axes = plt.subplots(1, 2 if quality else 1, figsize=(10 if quality else 5, 3.6), squeeze=False)
    ax = axes[0][0]
    for split, style in (("train", "-"), ("eval", "o-")):
        steps, values = _series(records, split, "loss")
        if steps:
            ax.plot(steps, values, style, label=f"{split} loss", markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    if quality:
        ax = axes[0][1]
        for key in quality:
            steps, values = _series(records, "eval", key)
            ax.plot(steps, values, "o-", label=f"eval {key}", markersize=3)
        ax.set_xlabel("step")
        ax.set_ylabel("perplexity" if quality == ["perplexity"] else "score")
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}.png")
    try:
        fig.savefig(tmp, dpi=100)
    finally:
        plt.close(fig)
    os.replace(tmp, out)
    return str(out)
