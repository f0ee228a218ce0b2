"""Fake quantization for quantization-aware training (QA-SparsePEFT): round a float kernel onto a
fixed INT grid in the forward pass, pass the gradient straight through in the backward pass.

``fake_quant(w, scales, zeros, bits, group_size)`` is ``dequant(quant(w))`` with the grid of a
quantized base (its ``scales``/``zeros``, which receive no gradient), and ``d out / d w = 1``
everywhere (the straight-through estimator, Bengio et al. 2013; no masking of clipped values), so an
adapter merged into the base (``w = base + delta``) trains through the rounding.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from jaxsparse.quant.grid import rtn_quantize
    >>> w = jnp.linspace(-1.0, 1.0, 32).reshape(16, 2)
    >>> qw = rtn_quantize(w, bits=4, group_size=8)
    >>> y = fake_quant(w + 0.01, qw.scales, qw.zeros, bits=4, group_size=8)
    >>> bool(jnp.all(jnp.abs(y - (w + 0.01)) <= qw.scales[qw.g_idx] / 2 + 1e-6))
    True
    >>> g = jax.grad(lambda v: fake_quant(v, qw.scales, qw.zeros, bits=4, group_size=8).sum())(w)
    >>> bool(jnp.all(g == 1.0))
    True
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxsparse.quant.grid import QuantizedWeight, check_spec, default_g_idx, dequantize_codes, quantize_codes


def fake_quant(
    w: jax.Array,
    scales: jax.Array,
    zeros: jax.Array,
    bits: int,
    group_size: int,
    g_idx: jax.Array | None = None,
) -> jax.Array:
    """``w`` (in, out) rounded onto the grid ``scales``/``zeros`` (groups, out), straight-through gradient.

    ``g_idx`` (in,) gives each input row's group (default ``i // group_size``, as without act-order).
    The result has ``w``'s dtype; values that were exactly 0 stay exactly 0.
    """
    n_in = w.shape[0]
    g = check_spec(bits, group_size, n_in)
    if g_idx is None:
        g_idx = default_g_idx(n_in, group_size)
    if scales.shape != (n_in // g, w.shape[1]) or zeros.shape != scales.shape:
        raise ValueError(
            f"grid shapes scales {scales.shape} / zeros {zeros.shape} do not fit a {w.shape} kernel with "
            f"group size {group_size} (expected {(n_in // g, w.shape[1])})"
        )
    s = jnp.asarray(scales, jnp.float32)[g_idx]
    z = jnp.asarray(zeros)[g_idx]
    return _round_ste(w, s, z, bits)


# custom_vjp rather than `w + stop_gradient(q - w)`: the forward value is exactly the grid value.
@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _round_ste(w: jax.Array, s: jax.Array, z: jax.Array, bits: int) -> jax.Array:
    return dequantize_codes(quantize_codes(w, s, z, bits), s, z).astype(w.dtype)


def _round_fwd(w: jax.Array, s: jax.Array, z: jax.Array, bits: int) -> tuple[jax.Array, tuple]:
    return _round_ste(w, s, z, bits), (s, z)


def _round_bwd(bits: int, res: tuple, g: jax.Array) -> tuple:
    s, z = res
    zero_z = None if not jnp.issubdtype(z.dtype, jnp.floating) else jnp.zeros_like(z)
    return g, jnp.zeros_like(s), zero_z


_round_ste.defvjp(_round_fwd, _round_bwd)


def fake_quant_like(w: jax.Array, qw: QuantizedWeight) -> jax.Array:
    """:func:`fake_quant` on the grid (scales, zeros, ``g_idx``) of an existing quantized kernel."""
    return fake_quant(w, qw.scales, qw.zeros, qw.bits, qw.group_size, g_idx=qw.g_idx)
