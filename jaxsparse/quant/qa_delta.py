"""QA-SparsePEFT's delta: a LoRA update merged into a sparse base weight and fake-quantized onto the
grid of that base's GPTQ checkpoint (SQFT, Munoz et al. 2024).

A targeted linear of a QA-SparsePEFT model computes, as SQFT's ``SQFTQuantAwareLinear`` does::

    merged = W + (s * B A) * (W != 0)            # W: the NON-quantized sparse base weight
    y      = dropout(x) @ dequant(quant(merged))  # on the GPTQ base's scales / zeros / g_idx

with a straight-through gradient (``d dequant(quant(merged)) / d merged = 1``,
:func:`jaxsparse.quant.fake_quant.fake_quant`), so ``A`` and ``B`` train through the rounding and the
merged model is exactly ``quant(merged)`` on the base's own grid: sparse AND INT-k with the base's
scales. LoRA dropout acts on the input of the whole matmul here (the merged weight is one matrix),
not on the adapter's branch only as in plain LoRA.

:class:`QALowRankDelta` is a :class:`~jaxsparse.delta.LowRankDelta` carrying that grid. Its
``apply(W)`` is the fake-quantized merged weight (used by :func:`jaxsparse.delta.apply` and
:func:`jaxsparse.merge.merge`, which therefore give the dequantized merged model), and the factored
training path (:func:`jaxsparse.factored.matmul`) calls its ``matmul_beside``: a QA layer cannot run
as ``x W + x a b`` because the rounding needs the merged weight, so it is formed per layer.
:meth:`QALowRankDelta.quantized` gives the integer codes a GPTQ merge writes
(:func:`jaxsparse.quant.save.save_gptq`).

The SparsePEFT mask is the delta's ``mask`` when one is stored (:func:`jaxsparse.methods.sqft.init`
stores ``W != 0``), else, with ``mask_base`` (static), ``W != 0`` of the weight it is applied to.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from jaxsparse.quant.grid import rtn_quantize
    >>> w = jnp.array([[0.5, 0.0], [0.0, -1.0], [0.25, 0.75], [-0.5, 0.0]])
    >>> grid = rtn_quantize(w, bits=4, group_size=-1)
    >>> d = QALowRankDelta.from_grid(LowRankDelta(a=jnp.ones((4, 1)), b=jnp.full((1, 2), 0.1)), grid, mask_base=True)
    >>> merged = d.apply(w)
    >>> bool(jnp.all((merged == 0) == (w == 0)))  # the base's zeros stay zero
    True
    >>> q = d.quantized(w)  # integer codes on the base's grid: dequantized, exactly the forward's weight
    >>> bool(jnp.all(dequantize(q) == merged)), bool(jnp.all(q.scales == grid.scales))
    (True, True)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array

from jaxsparse.delta_leaves import LowRankDelta, pytree_dataclass, static
from jaxsparse.factored import lora_dropout
from jaxsparse.quant.fake_quant import fake_quant
from jaxsparse.quant.grid import QuantizedWeight, dequantize, quantize_codes  # noqa: F401  (dequantize: doctests)

__all__ = ["QALowRankDelta", "with_grids"]


@pytree_dataclass
class QALowRankDelta(LowRankDelta):
    """A :class:`~jaxsparse.delta.LowRankDelta` applied as ``fake_quant(W + masked product)`` on a
    fixed GPTQ grid: ``scales`` (groups, out) float32, ``zeros`` (groups, out) int32, ``g_idx`` (in,)
    int32 (not trained); ``bits``, ``group_size``, ``sym`` static, as in
    :class:`~jaxsparse.quant.grid.QuantizedWeight`. ``mask_base``: mask the product by the weight's
    non-zeros where no ``mask`` is stored (SparsePEFT)."""

    scales: Array | None = None
    zeros: Array | None = None
    g_idx: Array | None = None
    bits: int = static(4)
    group_size: int = static(-1)
    sym: bool = static(False)
    mask_base: bool = static(False)

    @classmethod
    def from_grid(cls, delta: LowRankDelta, grid: QuantizedWeight, *, mask_base: bool) -> QALowRankDelta:
        """``delta`` (its factors, masks, scale) on the grid of ``grid`` (a quantized base kernel)."""
        fields = {f.name: getattr(delta, f.name) for f in dataclasses.fields(LowRankDelta)}
        return cls(
            **fields,
            scales=jnp.asarray(grid.scales, jnp.float32),
            zeros=jnp.asarray(grid.zeros, jnp.int32),
            g_idx=jnp.asarray(grid.g_idx, jnp.int32),
            bits=int(grid.bits),
            group_size=int(grid.group_size),
            sym=bool(grid.sym),
            mask_base=bool(mask_base),
        )

    def _bound(self, weight: Array) -> LowRankDelta:
        # The delta with its mask for this weight, without dropout (the dropout acts on the input).
        mask = self.mask
        if mask is None and self.mask_base:
            mask = weight != 0
        return dataclasses.replace(self, mask=mask, dropout_key=None)

    def merged(self, weight: Array) -> Array:
        """``W + masked product`` in float32, before rounding (what SQFT quantizes)."""
        update = LowRankDelta.product(self._bound(weight))
        return weight.astype(jnp.float32) + update.astype(jnp.float32)

    def apply(self, weight: Array) -> Array:
        """``dequant(quant(W + masked product))`` on the grid, straight-through gradient to the factors."""
        out = fake_quant(
            self.merged(weight), self.scales, self.zeros, self.bits, self.group_size, g_idx=self.g_idx
        )
        return out.astype(weight.dtype)

    def matmul_beside(self, x: Array, base: Array, precision: Any = None) -> Array:
        """``dropout(x) @ apply(base)`` (SQFT's QA forward; :func:`jaxsparse.factored.matmul` calls it)."""
        w = self.apply(base).astype(x.dtype)
        x_in = lora_dropout(x, self)
        return jax.lax.dot_general(x_in, w, (((x_in.ndim - 1,), (0,)), ((), ())), precision=precision)

    def quantized(self, weight: Array) -> QuantizedWeight:
        """The merged kernel as integer codes on the grid: ``quant(W + masked product)`` (no gradient)."""
        s = self.scales[self.g_idx]
        z = self.zeros[self.g_idx]
        codes = quantize_codes(self.merged(weight), s, z, self.bits)
        return QuantizedWeight(
            codes=codes.astype(jnp.uint8),
            scales=self.scales,
            zeros=self.zeros,
            g_idx=self.g_idx,
            bits=self.bits,
            group_size=self.group_size,
            sym=self.sym,
        )


def with_grids(
    adapter: Any, grids: Mapping[str, QuantizedWeight], *, mask_base: bool, source: str = "QA"
) -> Any:
    """``adapter`` with each low-rank delta at ``<module>.kernel`` on the grid ``grids[module]``
    (:class:`QALowRankDelta`); ``ValueError`` naming a targeted module the grids lack (not quantized in
    the GPTQ base) or whose grid does not fit its kernel.

    Example:
        >>> import jax.numpy as jnp
        >>> from jaxsparse.delta import Adapter
        >>> from jaxsparse.quant.grid import rtn_quantize
        >>> ad = Adapter({"fc.kernel": LowRankDelta(a=jnp.zeros((8, 2)), b=jnp.zeros((2, 4)))})
        >>> qa = with_grids(ad, {"fc": rtn_quantize(jnp.ones((8, 4)), group_size=4)}, mask_base=False)
        >>> type(qa.deltas["fc.kernel"]).__name__, qa.deltas["fc.kernel"].scales.shape
        ('QALowRankDelta', (2, 4))
    """
    deltas = dict(adapter.deltas)
    for path, d in adapter.deltas.items():
        if not isinstance(d, LowRankDelta):
            raise TypeError(
                f"{source}: {path!r} is a {type(d).__name__}; QA-SparsePEFT adapts low-rank deltas only"
            )
        module = path.removesuffix(".kernel")
        grid = grids.get(module)
        if grid is None:
            raise ValueError(
                f"{source}: the adapted module {module!r} is not quantized in the GPTQ base (its quantized "
                f"modules look like {sorted(grids)[:3]}); target only quantized linears"
            )
        if tuple(grid.shape) != (d.a.shape[0], d.b.shape[1]):
            raise ValueError(
                f"{source}: {module!r} is {tuple(grid.shape)} (in, out) in the GPTQ base but the adapter's "
                f"factors make {(d.a.shape[0], d.b.shape[1])}"
            )
        deltas[path] = QALowRankDelta.from_grid(d, grid, mask_base=mask_base)
    return dataclasses.replace(adapter, deltas=deltas)
