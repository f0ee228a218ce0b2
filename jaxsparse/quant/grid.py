"""Integer group quantization of linear kernels: the grid, quantize/dequantize, round-to-nearest (RTN).

A kernel ``w`` of shape (in, out) (our Flax layout) is quantized in groups of ``group_size``
consecutive *input* rows: every output column ``o`` of group ``g`` has its own ``scale[g, o]`` and
integer ``zero[g, o]``, and a weight is stored as a code ``q`` in ``[0, 2**bits - 1]``::

    q = clip(round(w / scale) + zero, 0, 2**bits - 1)        w_hat = scale * (q - zero)

This is the GPTQ convention (AutoGPTQ / gptqmodel / transformers read exactly this dequantization);
``group_size=-1`` means one group over the whole input dimension. ``g_idx[i]`` names the group of
input row ``i`` (``i // group_size`` unless GPTQ's act-order permuted the rows).

How the grid of a group is chosen (per output column, over the group's values ``x``):

- the range always contains 0 (``xmin = min(x, 0)``, ``xmax = max(x, 0)``), and the zero point is an
  integer, so **0 is exactly representable**: a pruned weight quantizes to code ``zero`` and
  dequantizes to exactly ``0.0``, whatever the scale;
- asymmetric: ``scale = (xmax - xmin) / maxq``, ``zero = round(-xmin / scale)``; a group whose
  ``zero`` would be 0 (no negative value below ``-scale/2``) gets ``zero = 1`` and
  ``scale = xmax / (maxq - 1)`` instead, because the classic GPTQ checkpoint stores ``zero - 1`` in
  ``bits`` bits and cannot hold ``-1`` (AutoGPTQ itself silently corrupts such groups);
- symmetric: ``zero = 2**(bits-1)``, ``scale = 2 * max|x| / maxq`` (AutoGPTQ keeps a smaller
  scale when a group has no negative value, which then clips its largest values; we do not);
- an all-zero group gets the range [-1, 1] (as AutoGPTQ), so its scale is never 0;
- the scale is rounded *up* to the nearest float16 (checkpoints store float16 scales): the codes are
  computed with the stored scale, so dequantizing a written checkpoint gives exactly our values, and
  every in-range weight is within ``scale / 2`` of its dequantized value.

Example:
    >>> import jax.numpy as jnp
    >>> w = jnp.linspace(-1.0, 1.0, 256 * 8).reshape(256, 8)
    >>> qw = rtn_quantize(w, bits=4, group_size=128)
    >>> qw.codes.shape, qw.scales.shape, int(qw.codes.max()) <= 15
    ((256, 8), (2, 8), True)
    >>> bool(jnp.all(jnp.abs(dequantize(qw) - w) <= qw.scales[qw.g_idx] / 2 + 1e-7))
    True
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

BITS = (2, 4, 8)


def check_spec(bits: int, group_size: int, in_features: int | None = None) -> int:
    """Validate ``bits``/``group_size`` (and that the group size divides ``in_features``); return the
    effective group size (``in_features`` for ``-1``). ``ValueError`` says what was expected.

    Example:
        >>> check_spec(4, 128, 256), check_spec(8, -1, 96)
        (128, 96)
    """
    if bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got {bits}")
    if group_size != -1 and group_size < 1:
        raise ValueError(f"group size must be a positive integer or -1 (one group per row), got {group_size}")
    if in_features is None:
        return group_size
    if group_size == -1:
        return in_features
    if in_features % group_size:
        raise ValueError(
            f"group size {group_size} does not divide the input width {in_features}; "
            f"choose a divisor of {in_features} (or -1 for one group)"
        )
    return group_size


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedWeight:
    """A group-quantized (in, out) kernel.

    ``codes`` (in, out) uint8 in ``[0, 2**bits - 1]``; ``scales`` (groups, out) float32 holding
    float16-exact values; ``zeros`` (groups, out) int32 zero points; ``g_idx`` (in,) int32, the group
    of each input row. ``bits``, ``group_size`` (as requested, ``-1`` allowed) and ``sym`` are static.
    """

    codes: jax.Array
    scales: jax.Array
    zeros: jax.Array
    g_idx: jax.Array
    bits: int = dataclasses.field(metadata={"static": True})
    group_size: int = dataclasses.field(metadata={"static": True})
    sym: bool = dataclasses.field(metadata={"static": True})

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)


def ceil_to_float16(x: jax.Array) -> jax.Array:
    """The smallest float16 value >= ``x`` (returned as float32), at least float16's smallest subnormal.

    Example:
        >>> float(ceil_to_float16(jnp.float32(0.1))) >= 0.1
        True
    """
    x = jnp.maximum(jnp.asarray(x, jnp.float32), float(np.finfo(np.float16).smallest_subnormal))
    h = x.astype(jnp.float16)
    h = jnp.where(h.astype(jnp.float32) < x, jnp.nextafter(h, jnp.float16(jnp.inf)), h)
    return h.astype(jnp.float32)


def group_grid(x: jax.Array, *, bits: int, sym: bool) -> tuple[jax.Array, jax.Array]:
    """``(scale, zero)`` per output column for one group of rows ``x`` (rows, out): float32 scale
    (float16-exact), int32 zero point (see the module docstring for the rules).

    Example:
        >>> s, z = group_grid(jnp.array([[-1.0], [0.5]]), bits=4, sym=False)
        >>> int(z[0]), round(float(s[0]), 3)
        (10, 0.1)
    """
    maxq = 2**bits - 1
    x = jnp.asarray(x, jnp.float32)
    xmin = jnp.minimum(x.min(axis=0), 0.0)
    xmax = jnp.maximum(x.max(axis=0), 0.0)
    if sym:
        xmax = jnp.maximum(-xmin, xmax)
        xmin = -xmax
    empty = (xmin == 0) & (xmax == 0)
    xmin = jnp.where(empty, -1.0, xmin)
    xmax = jnp.where(empty, 1.0, xmax)
    if sym:
        scale = ceil_to_float16((xmax - xmin) / maxq)
        zero = jnp.full(scale.shape, (maxq + 1) // 2, jnp.int32)
        return scale, zero
    scale = ceil_to_float16((xmax - xmin) / maxq)
    zero = jnp.round(-xmin / scale)
    # zero must be >= 1 for the classic checkpoint (it stores zero - 1): widen the grid by one step.
    low = zero < 1
    scale = jnp.where(low, ceil_to_float16(xmax / (maxq - 1)), scale)
    zero = jnp.clip(jnp.where(low, 1.0, zero), 1, maxq).astype(jnp.int32)
    return scale, zero


def quantize_codes(w: jax.Array, scale: jax.Array, zero: jax.Array, bits: int) -> jax.Array:
    """Integer codes ``clip(round(w / scale) + zero, 0, 2**bits - 1)`` (int32; broadcasting)."""
    q = jnp.round(jnp.asarray(w, jnp.float32) / scale) + zero
    return jnp.clip(q, 0, 2**bits - 1).astype(jnp.int32)


def dequantize_codes(codes: jax.Array, scale: jax.Array, zero: jax.Array) -> jax.Array:
    """``scale * (codes - zero)`` in float32 (broadcasting)."""
    return scale * (codes.astype(jnp.int32) - zero).astype(jnp.float32)


@jax.jit
def dequantize(qw: QuantizedWeight) -> jax.Array:
    """The float32 (in, out) kernel that ``qw`` represents: ``scales[g_idx] * (codes - zeros[g_idx])``."""
    return dequantize_codes(qw.codes, qw.scales[qw.g_idx], qw.zeros[qw.g_idx])


def default_g_idx(in_features: int, group_size: int) -> jax.Array:
    """``i // group_size`` for each input row (all 0 for ``group_size=-1``)."""
    g = in_features if group_size == -1 else group_size
    return (jnp.arange(in_features) // g).astype(jnp.int32)


def rtn_quantize(
    w: Any, *, bits: int = 4, group_size: int = 128, sym: bool = False, mask: Any = None
) -> QuantizedWeight:
    """Round-to-nearest group quantization of an (in, out) kernel.

    ``mask`` (bool, (in, out)), when given, marks the weights to keep: the others get code ``zero``
    and dequantize to exactly 0. By default the zeros of ``w`` are kept zero (``mask = w != 0``
    changes nothing for RTN since 0 is on every grid; it matters for GPTQ).

    Example:
        >>> w = jnp.array([[0.0, 1.0], [0.5, -1.0], [-0.25, 0.0], [1.0, 0.3]])
        >>> qw = rtn_quantize(w, bits=8, group_size=-1)
        >>> float(dequantize(qw)[0, 0]), bool(jnp.allclose(dequantize(qw), w, atol=qw.scales.max()))
        (0.0, True)
    """
    w = jnp.asarray(w, jnp.float32)
    if w.ndim != 2:
        raise ValueError(f"expected an (in, out) kernel, got shape {w.shape}")
    g = check_spec(bits, group_size, w.shape[0])
    return _rtn(
        w, None if mask is None else jnp.asarray(mask, bool), bits=bits, g=g, group_size=group_size, sym=sym
    )


@jax.jit(static_argnames=("bits", "g", "group_size", "sym"))
def _rtn(
    w: jax.Array, mask: jax.Array | None, *, bits: int, g: int, group_size: int, sym: bool
) -> QuantizedWeight:
    n_in, n_out = w.shape
    if mask is not None:
        w = jnp.where(mask, w, 0.0)
    groups = w.reshape(n_in // g, g, n_out)
    scales, zeros = jax.vmap(lambda x: group_grid(x, bits=bits, sym=sym))(groups)
    g_idx = default_g_idx(n_in, group_size)
    codes = quantize_codes(w, scales[g_idx], zeros[g_idx], bits)
    if mask is not None:
        codes = jnp.where(mask, codes, zeros[g_idx])
    return QuantizedWeight(
        codes=codes.astype(jnp.uint8),
        scales=scales,
        zeros=zeros,
        g_idx=g_idx,
        bits=bits,
        group_size=group_size,
        sym=sym,
    )
