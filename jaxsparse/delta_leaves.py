"""The delta leaves an adapter holds at each targeted weight: :class:`SparseDelta`, :class:`LowRankDelta`.

They live below :mod:`jaxsparse.delta` (the adapter pytree and ``apply``) so that
:mod:`jaxsparse.factored`, which ``apply(..., factored=True)`` calls, can build on them without
importing :mod:`jaxsparse.delta`: dependencies point one way, delta -> factored -> delta_leaves.
Import them from either module; :mod:`jaxsparse.delta` re-exports them.

Example:
    >>> import jax.numpy as jnp
    >>> d = LowRankDelta(a=jnp.ones((2, 1)), b=jnp.ones((1, 3)), scale=0.5)
    >>> d.apply(jnp.zeros((2, 3))).tolist()
    [[0.5, 0.5, 0.5], [0.5, 0.5, 0.5]]
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int


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
    # Sparse LoRA (jaxsparse.methods.sparse_lora): which entries of a / b magnitude pruning keeps.
    # Bookkeeping for the method's hooks, which hold the pruned entries of a and b at exactly zero
    # (masked gradients, re-zeroed after each update), so forward, merge and export read a, b as is.
    a_mask: Array | None = None
    b_mask: Array | None = None
    # LoRA dropout (PEFT's lora_dropout), set only on the training step's view of the adapter
    # (LoraConfig.forward_view): the key of this layer's dropout mask on the adapter's input.
    # Only the factored matmul (jaxsparse.factored) can apply it; forming the dense update refuses.
    dropout_key: Array | None = None
    scale: float = static(1.0)
    dropout_rate: float = static(0.0)

    trainable_fields: ClassVar[tuple[str, ...]] = ("a", "b")

    @property
    def rank(self) -> int:
        return int(self.a.shape[1])

    def product(self) -> Array:
        """The dense (in, out) update; materialised only where a merge or a masked update needs it."""
        if self.dropout_key is not None:
            raise ValueError(
                "LoRA dropout acts on the layer's input, which a dense weight update cannot express: "
                "train LoRA with dropout through the factored path (delta.apply(..., factored=True), as "
                "jaxsparse.trainer does) or set lora_dropout=0"
            )
        a = self.a if self.rank_mask is None else self.a * self.rank_mask.astype(self.a.dtype)
        delta = (a @ self.b) * self.scale
        if self.mask is not None:
            delta = jnp.where(self.mask, delta, 0)
        return delta

    def apply(self, weight: Array) -> Array:
        return (weight.astype(jnp.float32) + self.product().astype(jnp.float32)).astype(weight.dtype)


Delta = SparseDelta | LowRankDelta
