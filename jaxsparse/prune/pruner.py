"""Pruning a whole model: magnitude (no data) or Wanda (layer by layer on calibration tokens).

Which layers: by default every linear layer inside the transformer blocks
(:func:`jaxsparse.calibration.linear_paths`: q/k/v/o/gate/up/down on a Llama), never the
embeddings or the head; ``targets`` narrows that with PEFT ``target_modules`` semantics (a list of
names matching a module path or its suffix, or one regex over the whole path).

Wanda runs :func:`jaxsparse.calibration.sequential_capture`: each block's linears are scored with
``|W| * ||X||`` on inputs produced by the already-pruned earlier blocks, as in the Wanda paper.

Example:
    >>> import numpy as np, transformers
    >>> from jaxsparse.models import init_params
    >>> from jaxsparse.prune.report import sparsity_report
    >>> cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
    ...     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    >>> model = init_params(cfg, task="causal_lm")
    >>> ids = np.random.default_rng(0).integers(0, 64, (4, 16))
    >>> pruned = prune_model(model, method="wanda", sparsity=0.5, input_ids=ids, progress=False)
    >>> sparsity_report(pruned.params, prunable_linears(pruned)).overall.sparsity
    0.5
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxsparse import calibration
from jaxsparse.models.base import Model
from jaxsparse.prune.patterns import Pattern, check_sparsity, keep_mask
from jaxsparse.prune.scores import METHODS, magnitude_score, wanda_score
from jaxsparse.tree import TargetSpec, get_leaf, replace_leaves, select_modules


def prunable_linears(model: Model, targets: TargetSpec = None) -> list[str]:
    """Module paths to prune: the linears inside the blocks, narrowed by ``targets`` (PEFT matching).

    A target that selects something outside the blocks (the head, a classifier) is an error: those
    layers have no calibration inputs in the layer-by-layer capture.
    """
    candidates = calibration.linear_paths(model)
    if targets is None:
        return candidates
    chosen = select_modules(model.params, targets)
    outside = [m for m in chosen if m not in set(candidates)]
    if outside:
        raise ValueError(
            f"targets select {outside[:3]}, which are not linear layers inside the transformer blocks "
            "(embeddings and heads are never pruned)"
        )
    return chosen


@dataclasses.dataclass(frozen=True)
class PruneSpec:
    """A validated request: ``method``, ``pattern``, and the per-row ``sparsity`` it achieves."""

    method: str
    pattern: Pattern
    sparsity: float


def prune_spec(method: str, sparsity: float | None, pattern: str | Pattern = "unstructured") -> PruneSpec:
    """Validate ``method``/``sparsity``/``pattern`` together (before any model is loaded).

    Unstructured needs ``sparsity`` in [0, 1). ``N:M`` fixes the sparsity at ``1 - N/M``; a given
    ``sparsity`` must equal it.

    Example:
        >>> prune_spec("wanda", None, "2:4").sparsity
        0.5
    """
    if method not in METHODS:
        raise ValueError(f"unknown pruning method {method!r}; choose from {list(METHODS)}")
    pat = pattern if isinstance(pattern, Pattern) else Pattern.parse(pattern)
    if pat.structured:
        implied = pat.sparsity
        if sparsity is not None and abs(check_sparsity(sparsity) - implied) > 1e-9:
            raise ValueError(f"pattern {pat} means sparsity {implied:g}, but sparsity {sparsity:g} was asked")
        return PruneSpec(method, pat, implied)
    if sparsity is None:
        raise ValueError("unstructured pruning needs a sparsity in [0, 1)")
    return PruneSpec(method, pat, check_sparsity(sparsity))


@partial(jax.jit, static_argnames=("pattern", "sparsity"))
def prune_kernel(kernel: jax.Array, score: jax.Array, pattern: Pattern, sparsity: float) -> jax.Array:
    """``kernel`` with the weights the ``score`` ranks lowest zeroed (see :func:`keep_mask`).

    Example:
        >>> k = jnp.array([[1.0], [-4.0], [2.0], [3.0]])
        >>> prune_kernel(k, jnp.abs(k), Pattern(2, 4), 0.5).ravel().tolist()
        [0.0, -4.0, 0.0, 3.0]
    """
    return jnp.where(keep_mask(score, pattern, sparsity), kernel, jnp.zeros_like(kernel))


@partial(jax.jit, static_argnames=("pattern", "sparsity"))
def _wanda_prune(kernel: jax.Array, sq_norm: jax.Array, pattern: Pattern, sparsity: float) -> jax.Array:
    return prune_kernel(kernel, wanda_score(kernel, sq_norm), pattern, sparsity)


def check_pattern_widths(model: Model, paths: Sequence[str], pattern: Pattern) -> None:
    """``ValueError`` naming the first layer whose input width an N:M pattern's ``M`` does not divide."""
    for p in paths:
        pattern.check_width(int(get_leaf(model.params, p + ".kernel").shape[0]), where=p)


def prune_model(
    model: Model,
    *,
    method: str,
    sparsity: float | None = None,
    pattern: str | Pattern = "unstructured",
    targets: TargetSpec = None,
    input_ids: Any = None,
    attention_mask: Any = None,
    batch_size: int = 8,
    max_blocks: int | None = None,
    progress: bool = True,
) -> Model:
    """``model`` with its selected linears pruned by ``method`` (``"magnitude"`` or ``"wanda"``).

    Wanda needs calibration ``input_ids`` (samples, seq_len) (see
    :func:`jaxsparse.calibration.load_calibration`); magnitude ignores them. ``max_blocks`` limits
    pruning to the first blocks (for quick checks). Every selected row ends with exactly
    ``floor(sparsity * in)`` pruned weights (unstructured) or at most ``N`` non-zeros per ``M``.
    """
    spec = prune_spec(method, sparsity, pattern)
    paths = prunable_linears(model, targets)
    if max_blocks is not None:
        blocks = calibration.block_paths(model)[:max_blocks]
        paths = [p for p in paths if any(p.startswith(b + ".") for b in blocks)]
    check_pattern_widths(model, paths, spec.pattern)
    chosen = set(paths)
    if spec.method == "magnitude":
        from tqdm.auto import tqdm

        new = {}
        for p in tqdm(paths, desc="layers", unit="layer", disable=not progress):
            kernel = get_leaf(model.params, p + ".kernel")
            new[p + ".kernel"] = prune_kernel(kernel, magnitude_score(kernel), spec.pattern, spec.sparsity)
        return dataclasses.replace(model, params=replace_leaves(model.params, new))
    if input_ids is None:
        raise ValueError("Wanda needs calibration input_ids (see jaxsparse.calibration.load_calibration)")

    def update(block: calibration.BlockCapture) -> dict[str, jax.Array]:
        return {
            p: _wanda_prune(k, block.stats[p].sq_norm, spec.pattern, spec.sparsity)
            for p, k in block.kernels.items()
            if p in chosen
        }

    return calibration.sequential_capture(
        model,
        np.asarray(input_ids),
        attention_mask,
        update=update,
        statistics=("sq_norm",),
        batch_size=batch_size,
        max_blocks=max_blocks,
        progress=progress,
    )
