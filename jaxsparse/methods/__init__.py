"""One module per method: its frozen config dataclass and its ``init(params, config, key) -> Adapter``.

This module holds what the sparse methods share: which modules an adapter targets by default, and
the split between delta-carrying weights and dense ``modules_to_save`` leaves.

Example:
    >>> import jax.numpy as jnp
    >>> params = {
    ...     "encoder": {"query": {"kernel": jnp.zeros((4, 4))}, "pooler": {"kernel": jnp.zeros((4, 4))}},
    ...     "embed": {"embedding": jnp.zeros((10, 4))},
    ...     "classifier": {"kernel": jnp.zeros((4, 2)), "bias": jnp.zeros(2)},
    ... }
    >>> resolve_targets(params, None, None, ["classifier"])
    (['encoder.pooler.kernel', 'encoder.query.kernel'], ['classifier.bias', 'classifier.kernel'])
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from jaxsparse import tree as tree_lib
from jaxsparse.tree import TargetError, TargetSpec

PyTree = Any

# The output layer is never a default target, as in PEFT's "all-linear": language-model heads
# (`lm_head`, GPT-NeoX `embed_out`, BERT's MLM `predictions.decoder`) and task heads (`classifier`,
# `score`, `qa_outputs`), including every linear inside them (RoBERTa's `classifier.dense`). Body
# linears next to a head (BERT `pooler.dense`, DistilBERT `pre_classifier`) are pretrained and
# stay targets. A head that should train goes in `modules_to_save` (trained densely).
HEAD_MODULES: tuple[str, ...] = (
    "lm_head",
    "embed_out",
    "predictions.decoder",
    "classifier",
    "score",
    "qa_outputs",
)


def _prefixes(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def _within(module: str, spec: TargetSpec) -> bool:
    matches = tree_lib.module_matcher(spec)
    return any(matches(p) for p in _prefixes(module))


def resolve_targets(
    params: PyTree,
    target_modules: TargetSpec,
    exclude_modules: TargetSpec = None,
    modules_to_save: TargetSpec = None,
) -> tuple[list[str], list[str]]:
    """``(delta_paths, dense_paths)``: the 2-D ``kernel`` parameter paths that get a sparse delta,
    and the parameter paths of every leaf under ``modules_to_save`` (trained densely).

    ``target_modules=None`` selects every module with a 2-D ``kernel`` outside :data:`HEAD_MODULES`
    and ``modules_to_save``; otherwise PEFT matching (names by suffix, or a full-match regex),
    minus modules inside ``modules_to_save`` (as PEFT does). ``exclude_modules`` always applies.
    """
    dense = tree_lib.select_leaves_under(params, modules_to_save)
    if target_modules is None:
        candidates = tree_lib.select_modules(params, r".*", exclude_modules, strict=False)
        modules = [m for m in candidates if not _within(m, HEAD_MODULES) and not _within(m, modules_to_save)]
    else:
        # As in PEFT, a module inside modules_to_save is never also a delta target (RoBERTa's
        # `classifier.dense` matches a broad "dense" but trains densely with its head).
        modules = tree_lib.select_modules(params, target_modules, exclude_modules)
        modules = [m for m in modules if not _within(m, modules_to_save)]
    if not modules and not dense:
        raise TargetError("the adapter selects no parameter: no module with a 2-D 'kernel' is targeted")
    return [f"{m}.kernel" for m in modules], dense


def dense_copies(params: PyTree, paths: list[str]) -> dict[str, Any]:
    """Fresh copies of the leaves at ``paths`` (so donating or merging ``params`` never aliases them)."""
    return {p: jnp.array(tree_lib.get_leaf(params, p), copy=True) for p in paths}
