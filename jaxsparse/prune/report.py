"""The sparsity report: zeros per layer, per block and overall, as a table or JSON.

A *block* is the layer's path up to its first numeric component (``model.layers.3``); layers outside
any numbered block are their own group. Each layer also says which N:M pattern its zeros satisfy
(``2:4`` if every group of 4 consecutive inputs of every output row has at most 2 non-zeros, else
``4:8`` likewise, else ``-``).

Example:
    >>> import numpy as np
    >>> params = {"layers": {"0": {"fc": {"kernel": np.array([[0.0, 1.0], [2.0, 0.0]])}}}}
    >>> r = sparsity_report(params)
    >>> r.overall.zeros, r.overall.total, r.layers[0].block
    (2, 4, 'layers.0')
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxsparse.tree import get_leaf, leaf_name, leaf_paths, module_of

#: N:M patterns a layer is checked against, strictest first.
DETECTED_PATTERNS = ((2, 4), (4, 8))


@dataclasses.dataclass(frozen=True)
class Count:
    """``zeros`` of ``total`` weights (``sparsity`` is their ratio, 0 for an empty group)."""

    name: str
    zeros: int
    total: int

    @property
    def sparsity(self) -> float:
        return self.zeros / self.total if self.total else 0.0


@dataclasses.dataclass(frozen=True)
class LayerCount(Count):
    block: str = ""
    shape: tuple[int, ...] = ()
    pattern: str = "-"


@dataclasses.dataclass(frozen=True)
class SparsityReport:
    layers: list[LayerCount]
    blocks: list[Count]
    overall: Count

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict: ``layers``, ``blocks`` and ``overall`` with zeros/total/sparsity."""

        def row(c: Count, **extra: Any) -> dict[str, Any]:
            return {"name": c.name, "zeros": c.zeros, "total": c.total, "sparsity": c.sparsity, **extra}

        return {
            "layers": [row(c, block=c.block, shape=list(c.shape), nm_pattern=c.pattern) for c in self.layers],
            "blocks": [row(c) for c in self.blocks],
            "overall": row(self.overall),
        }

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=2)

    def table(self) -> str:
        """Layers, then blocks, then the overall line, as fixed-width text."""
        width = max([len(c.name) for c in self.layers + self.blocks] + [len("overall"), 5])
        lines = [f"{'layer':<{width}}  {'shape':>12}  {'zeros':>12}  {'total':>12}  {'sparsity':>8}  n:m"]
        for c in self.layers:
            shape = "x".join(map(str, c.shape))
            lines.append(
                f"{c.name:<{width}}  {shape:>12}  {c.zeros:>12}  {c.total:>12}  {c.sparsity:>8.2%}  {c.pattern}"
            )
        lines.append("")
        lines.append(f"{'block':<{width}}  {'':>12}  {'zeros':>12}  {'total':>12}  {'sparsity':>8}")
        for c in [*self.blocks, self.overall]:
            lines.append(f"{c.name:<{width}}  {'':>12}  {c.zeros:>12}  {c.total:>12}  {c.sparsity:>8.2%}")
        return "\n".join(lines)


def block_of(module_path: str) -> str:
    """The path up to and including its first numeric component (``a.layers.3.mlp`` -> ``a.layers.3``).

    Example:
        >>> block_of("model.layers.12.mlp.up_proj"), block_of("lm_head")
        ('model.layers.12', 'lm_head')
    """
    parts = module_path.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return module_path


def nm_pattern(kernel: np.ndarray) -> str:
    """The strictest of :data:`DETECTED_PATTERNS` a (in, out) kernel satisfies, as ``"N:M"``, else ``"-"``.

    Example:
        >>> nm_pattern(np.array([[1.0], [0.0], [0.0], [2.0]])), nm_pattern(np.ones((4, 1)))
        ('2:4', '-')
    """
    nonzero = np.asarray(kernel) != 0
    for n, m in DETECTED_PATTERNS:
        if nonzero.shape[0] % m == 0:
            groups = nonzero.T.reshape(nonzero.shape[1], -1, m)
            if (groups.sum(-1) <= n).all():
                return f"{n}:{m}"
    return "-"


def sparsity_report(params: Any, modules: Sequence[str] | None = None) -> SparsityReport:
    """Count exact zeros in the ``kernel`` of each module in ``modules`` (default: every 2-D kernel).

    ``modules`` are module paths (``"model.layers.0.self_attn.q_proj"``); blocks and the overall line
    aggregate over exactly these layers.
    """
    if modules is None:
        modules = [
            module_of(p)
            for p, x in leaf_paths(params).items()
            if leaf_name(p) == "kernel" and np.ndim(x) == 2
        ]
    layers: list[LayerCount] = []
    for path in modules:
        kernel = np.asarray(get_leaf(params, path + ".kernel"))
        zeros = int(kernel.size - np.count_nonzero(kernel))
        layers.append(
            LayerCount(path, zeros, int(kernel.size), block_of(path), tuple(kernel.shape), nm_pattern(kernel))
        )
    blocks: dict[str, list[int]] = {}
    for c in layers:
        acc = blocks.setdefault(c.block, [0, 0])
        acc[0] += c.zeros
        acc[1] += c.total
    overall = Count("overall", sum(c.zeros for c in layers), sum(c.total for c in layers))
    return SparsityReport(layers, [Count(b, z, t) for b, (z, t) in blocks.items()], overall)
