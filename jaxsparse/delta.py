"""Delta leaves and the adapter pytree.

An adapter mirrors the parameter paths it touches: ``deltas`` maps a parameter path (e.g.
``"model.layers.0.self_attn.q_proj.kernel"``) to a delta leaf, ``dense`` maps a parameter path to
a full trainable replacement (PEFT's ``modules_to_save``, e.g. a classifier head).

Only the fields each delta class names in ``trainable_fields`` are trained; :func:`trainable`
and :func:`with_trainable` split an adapter into that small float tree and back, so an optax
optimizer's state is O(k), never the size of the base model.

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
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from jaxsparse import tree as tree_lib

PyTree = Any


def pytree_dataclass(cls: type) -> type:
    """Frozen dataclass registered as a pytree; fields with ``metadata={"static": True}`` are aux data."""
    cls = dataclasses.dataclass(frozen=True)(cls)
    fields = dataclasses.fields(cls)
    data = [f.name for f in fields if not f.metadata.get("static")]
    meta = [f.name for f in fields if f.metadata.get("static")]
    return jax.tree_util.register_dataclass(cls, data_fields=data, meta_fields=meta)


def static(default: Any = dataclasses.MISSING) -> Any:
    """A dataclass field stored as static (hashable) pytree metadata."""
    return dataclasses.field(default=default, metadata={"static": True})


@pytree_dataclass
class SparseDelta:
    """k entries added to a weight: ``w.flat[indices] += values``.

    ``indices`` are sorted, unique int32 positions into the weight *in its own layout* (for a
    Flax kernel, the (in, out) layout), ``values`` the k trainable entries, ``shape`` the weight's.
    """

    indices: Int[Array, " k"]
    values: Float[Array, " k"]
    shape: tuple[int, ...] = static()

    trainable_fields: ClassVar[tuple[str, ...]] = ("values",)

    @property
    def k(self) -> int:
        return int(self.indices.shape[0])

    def apply(self, weight: Array) -> Array:
        """``weight`` with the k entries added, computed in float32 and cast back (SpaRTA's merge rule).

        Differentiable in ``values``: the gradient is the dense gradient gathered at ``indices``.
        """
        flat = weight.reshape(-1)
        old = flat[self.indices]
        new = (old.astype(jnp.float32) + self.values.astype(jnp.float32)).astype(weight.dtype)
        return (
            flat.at[self.indices].set(new, indices_are_sorted=True, unique_indices=True).reshape(weight.shape)
        )


@pytree_dataclass
class LowRankDelta:
    """A low-rank update of a Flax kernel (in, out): ``w += (a * rank_mask) @ b * scale``, optionally masked.

    ``a`` is (in, r) and ``b`` is (r, out), i.e. PEFT's ``lora_A.T`` and ``lora_B.T``. ``rank_mask``
    (r,) switches rank components off (NLS elastic rank, rank-sparse LoRA); ``mask`` (in, out)
    keeps the product to the base weight's non-zeros (SparsePEFT). ``scale`` is static
    (``lora_alpha / r`` or rsLoRA's ``lora_alpha / sqrt(r)``).
    """

    a: Float[Array, "fan_in r"]
    b: Float[Array, "r fan_out"]
    rank_mask: Float[Array, " r"] | None = None
    mask: Array | None = None
    scale: float = static(1.0)

    trainable_fields: ClassVar[tuple[str, ...]] = ("a", "b")

    @property
    def rank(self) -> int:
        return int(self.a.shape[1])

    def product(self) -> Array:
        """The dense (in, out) update; materialised only where a merge or a masked update needs it."""
        a = self.a if self.rank_mask is None else self.a * self.rank_mask.astype(self.a.dtype)
        delta = (a @ self.b) * self.scale
        if self.mask is not None:
            delta = jnp.where(self.mask, delta, 0)
        return delta

    def apply(self, weight: Array) -> Array:
        return (weight.astype(jnp.float32) + self.product().astype(jnp.float32)).astype(weight.dtype)


Delta = SparseDelta | LowRankDelta


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
    ``sampled_max_density`` with the sampled-product gradient). Only for models whose every
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
            from jaxsparse import factored as factored_lib  # factored builds on this module

            density = factored_lib.SAMPLED_MAX_DENSITY if sampled_max_density is None else sampled_max_density
            new[path] = factored_lib.adapt(weight, delta, sampled_max_density=density)
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
