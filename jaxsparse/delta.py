"""The adapter pytree: delta leaves and dense replacements keyed by parameter path, and ``apply``.

An adapter mirrors the parameter paths it touches: ``deltas`` maps a parameter path (e.g.
``"model.layers.0.self_attn.q_proj.kernel"``) to a delta leaf, ``dense`` maps a parameter path to
a full trainable replacement (PEFT's ``modules_to_save``, e.g. a classifier head).

Only the fields each delta class names in ``trainable_fields`` are trained; :func:`trainable`
and :func:`with_trainable` split an adapter into that small float tree and back, so an optax
optimizer's state is O(k), never the size of the base model. The delta leaves themselves
(:class:`SparseDelta`, :class:`LowRankDelta`) are defined in :mod:`jaxsparse.delta_leaves`, below
:mod:`jaxsparse.factored`, and re-exported here.

Example:
    >>> import jax.numpy as jnp
    >>> w = jnp.zeros((2, 3))
    >>> d = SparseDelta(indices=jnp.array([1, 4], jnp.int32), values=jnp.array([1.0, 2.0]), shape=(2, 3))
    >>> d.apply(w).tolist()
    [[0.0, 1.0, 0.0], [0.0, 2.0, 0.0]]
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
from jaxtyping import Array

from jaxsparse import factored as factored_lib
from jaxsparse import tree as tree_lib
from jaxsparse.delta_leaves import Delta, LowRankDelta, SparseDelta, pytree_dataclass, static

PyTree = Any

__all__ = [
    "Adapter",
    "Delta",
    "LowRankDelta",
    "SparseDelta",
    "apply",
    "pytree_dataclass",
    "static",
    "trainable",
    "with_trainable",
]


@pytree_dataclass
class Adapter:
    """Delta leaves and dense replacements keyed by parameter path, plus the method's config.

    ``config`` is static metadata (a frozen, hashable method config such as ``ShiraConfig``).
    """

    deltas: dict[str, Any]
    dense: dict[str, Array] = dataclasses.field(default_factory=dict)
    config: Any = static(None)

    def num_trainable(self) -> int:
        """Number of trainable scalars (delta entries plus dense leaves)."""
        return sum(int(x.size) for x in jax.tree_util.tree_leaves(trainable(self)))


def apply(
    params: PyTree, adapter: Adapter, *, factored: bool = False, sampled_max_density: float | None = None
) -> PyTree:
    """Effective parameters: every targeted leaf with its delta applied, dense leaves replaced.

    Pure and jit-able; use it inside the loss so gradients reach the adapter's trainable leaves.

    With ``factored=True`` a delta on a 2-D ``kernel`` leaf is not added to the weight: the leaf
    becomes a :class:`jaxsparse.factored.AdaptedKernel` that the model zoo's linear layers apply
    beside the frozen weight (LoRA as ``x W + x a b s``; sparse deltas at density at most
    ``sampled_max_density`` with the sampled-product gradient; ``None``: the backend's default,
    :func:`jaxsparse.factored.default_sampled_max_density`). Only for models whose every
    ``kernel`` is read by :func:`jaxsparse.factored.matmul` (all of :mod:`jaxsparse.models`).

    Example:
        >>> import jax.numpy as jnp
        >>> params = {"lin": {"kernel": jnp.zeros((2, 2))}}
        >>> d = SparseDelta(jnp.array([3], jnp.int32), jnp.array([5.0]), (2, 2))
        >>> apply(params, Adapter({"lin.kernel": d}))["lin"]["kernel"].tolist()
        [[0.0, 0.0], [0.0, 5.0]]
    """
    new: dict[str, Any] = {}
    for path, delta in adapter.deltas.items():
        weight = tree_lib.get_leaf(params, path)
        if factored and path.rsplit(".", 1)[-1] == "kernel" and weight.ndim == 2:
            new[path] = factored_lib.adapt(weight, delta, sampled_max_density=sampled_max_density)
        else:
            new[path] = delta.apply(weight)
    for path, leaf in adapter.dense.items():
        new[path] = leaf
    return tree_lib.replace_leaves(params, new)


def trainable(adapter: Adapter) -> dict[str, Any]:
    """The adapter's trainable leaves only: ``{"deltas": {path: {field: array}}, "dense": {...}}``."""
    return {
        "deltas": {
            p: {f: getattr(d, f) for f in type(d).trainable_fields} for p, d in adapter.deltas.items()
        },
        "dense": dict(adapter.dense),
    }


def with_trainable(adapter: Adapter, leaves: Mapping[str, Any]) -> Adapter:
    """Inverse of :func:`trainable`: the adapter with its trainable leaves replaced by ``leaves``."""
    deltas = {p: dataclasses.replace(d, **leaves["deltas"][p]) for p, d in adapter.deltas.items()}
    return dataclasses.replace(adapter, deltas=deltas, dense=dict(leaves["dense"]))
