"""GPTQ (Frantar et al., 2022): quantize a kernel column by column, compensating each rounding error
on the not-yet-quantized input rows through the inverse Hessian of the layer's inputs.

For a linear layer ``y = x @ w`` (w: (in, out), our layout) with calibration inputs ``X`` (tokens,
in), GPTQ minimises ``||X w - X w_hat||^2`` row by row of ``w`` (one *input* feature at a time, a
"column" of PyTorch's (out, in) weight). With ``H = 2 X^T X / n``:

1. dead inputs (``H[i, i] == 0``, the feature is always 0) get ``H[i, i] = 1`` and ``w[i] = 0``;
2. act-order (``act_order=True``, ``desc_act`` in checkpoints): rows are processed by decreasing
   ``H[i, i]``; groups are then formed in that order and ``g_idx`` records each row's group;
3. damping: ``H += damp_percent * mean(diag H) * I``; ``U`` = upper Cholesky factor of ``H^-1``;
4. for each row ``i`` in order: the group's grid (:func:`jaxsparse.quant.grid.group_grid`) is fixed
   when its first row is reached (from the current, already compensated rows of the group),
   ``q = quant(w[i])``, ``err = (w[i] - q) / U[i, i]`` and ``w[j] -= U[i, j] * err`` for ``j > i``:
   inside a block of ``block_size`` rows at once, and for the rows after the block in one matrix
   product when the block is done (the paper's lazy batch updates).

**Pruned weights stay exactly zero.** The rows' mask (by default ``w != 0``) is fixed before the
compensation starts. A masked weight is quantized to its group's zero point, i.e. dequantizes to
exactly 0, and the error of forcing it to zero (its compensated value) is propagated like any other
rounding error, so the kept weights absorb it (as SparseGPT does when it prunes and quantizes
jointly). The group grids are computed from the kept weights only.

The whole per-layer procedure is one jitted XLA computation: ``lax.fori_loop`` over blocks and over
the rows of a block, no Python loop over rows.

Example:
    >>> import jax, jax.numpy as jnp
    >>> x = jax.random.normal(jax.random.key(0), (512, 64))
    >>> w = jax.random.normal(jax.random.key(1), (64, 16))
    >>> qw = gptq_quantize(w, hessian(x), bits=4, group_size=32)
    >>> from jaxsparse.quant.grid import dequantize, rtn_quantize
    >>> err = lambda v: float(jnp.linalg.norm(x @ w - x @ v))
    >>> err(dequantize(qw)) < err(dequantize(rtn_quantize(w, bits=4, group_size=32)))
    True
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from jaxsparse.quant.grid import QuantizedWeight, check_spec, dequantize_codes, group_grid, quantize_codes


def hessian(x: Any) -> jax.Array:
    """``2 X^T X / n`` (float32, (in, in)) for inputs ``x`` of shape (..., in), n = number of rows.

    Example:
        >>> hessian(jnp.array([[1.0, 2.0], [3.0, 0.0]])).tolist()
        [[10.0, 2.0], [2.0, 4.0]]
    """
    x = jnp.asarray(x, jnp.float32)
    x = x.reshape(-1, x.shape[-1])
    return 2.0 * (x.T @ x) / max(x.shape[0], 1)


def update_hessian(h: jax.Array, count: int, x: Any) -> tuple[jax.Array, int]:
    """Running :func:`hessian`: ``(h, count)`` over the rows seen so far, plus the rows of ``x``.
    Start from ``(jnp.zeros((in, in)), 0)``; the result equals :func:`hessian` of all rows at once.

    Example:
        >>> x = jnp.arange(12.0).reshape(6, 2)
        >>> h, n = update_hessian(*update_hessian(jnp.zeros((2, 2)), 0, x[:2]), x[2:])
        >>> n, bool(jnp.allclose(h, hessian(x)))
        (6, True)
    """
    x = jnp.asarray(x, jnp.float32).reshape(-1, h.shape[0])
    m = x.shape[0]
    total = count + m
    if total == 0:
        return h, 0
    return h * (count / total) + (2.0 / total) * (x.T @ x), total


def _block_sizes(n_in: int, g: int, block_size: int) -> tuple[int, int]:
    """``(block, superblock)``: rows updated lazily together, and the unit the outer loop walks.

    A group never straddles a block in a way that needs stale rows: either a block holds whole
    groups (``g <= block_size``: block = superblock = a multiple of g) or a group holds whole blocks
    (block = the largest divisor of g not above block_size, superblock = g).
    """
    if g <= block_size:
        b = (block_size // g) * g
        return b, b
    b = max(d for d in range(1, block_size + 1) if g % d == 0)
    return b, g


def gptq_quantize(
    w: Any,
    h: Any,
    *,
    bits: int = 4,
    group_size: int = 128,
    sym: bool = False,
    damp_percent: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
    mask: Any = None,
) -> QuantizedWeight:
    """GPTQ-quantize an (in, out) kernel ``w`` given the Hessian ``h`` (in, in) of its inputs.

    ``mask`` (bool (in, out)) marks the weights to keep (default: ``w != 0``); the others end up
    exactly 0. Raises ``ValueError`` for a bad spec/shape, or when the damped Hessian is not
    positive definite (raise ``damp_percent``).
    """
    w = jnp.asarray(w, jnp.float32)
    h = jnp.asarray(h, jnp.float32)
    if w.ndim != 2:
        raise ValueError(f"expected an (in, out) kernel, got shape {w.shape}")
    n_in = w.shape[0]
    if h.shape != (n_in, n_in):
        raise ValueError(f"Hessian shape {h.shape} does not match the kernel's input width {n_in}")
    if not 0 <= damp_percent < 1:
        raise ValueError(f"damp_percent must be in [0, 1), got {damp_percent}")
    if block_size < 1:
        raise ValueError(f"block_size must be positive, got {block_size}")
    g = check_spec(bits, group_size, n_in)
    mask = (w != 0) if mask is None else jnp.asarray(mask, bool)
    qw, ok = _gptq(
        w, h, mask, bits=bits, g=g, group_size=group_size, sym=sym, damp=float(damp_percent),
        block_size=block_size, act_order=act_order,
    )  # fmt: skip
    if not bool(ok):
        raise ValueError(
            f"GPTQ: the damped Hessian is not positive definite (damp_percent={damp_percent}); "
            "increase damp_percent or use more calibration data"
        )
    return qw


@jax.jit(static_argnames=("bits", "g", "group_size", "sym", "damp", "block_size", "act_order"))
def _gptq(
    w: jax.Array,
    h: jax.Array,
    mask: jax.Array,
    *,
    bits: int,
    g: int,
    group_size: int,
    sym: bool,
    damp: float,
    block_size: int,
    act_order: bool,
) -> tuple[QuantizedWeight, jax.Array]:
    n_in, n_out = w.shape
    n_groups = n_in // g
    block, superblock = _block_sizes(n_in, g, block_size)
    groups_inside = block >= g  # True: grids are fixed inside the block loop

    diag = jnp.diagonal(h)
    dead = diag == 0
    h = h + jnp.diag(dead.astype(h.dtype))
    w = jnp.where(dead[:, None], 0.0, w)
    if act_order:
        perm = jnp.argsort(-jnp.diagonal(h), stable=True)
        w, mask, h = w[perm], mask[perm], h[perm][:, perm]
    h = h + damp * jnp.mean(jnp.diagonal(h)) * jnp.eye(n_in, dtype=h.dtype)
    chol = jnp.linalg.cholesky(h)
    hinv = jax.scipy.linalg.cho_solve((chol, True), jnp.eye(n_in, dtype=h.dtype))
    u = jnp.linalg.cholesky(hinv).T  # upper: H^-1 = U^T U
    ok = jnp.all(jnp.isfinite(u))

    # Pad to whole superblocks with decoupled, masked rows (zero weight, identity Hessian block).
    n_pad = -n_in % superblock
    n_p = n_in + n_pad
    w = jnp.pad(w, ((0, n_pad), (0, 0)))
    mask = jnp.pad(mask, ((0, n_pad), (0, 0)))
    u = jnp.pad(u, ((0, n_pad), (0, n_pad))) + jnp.diag(jnp.arange(n_p) >= n_in).astype(u.dtype)
    g_pad = n_p // g

    def grid_of(x: jax.Array, m: jax.Array) -> tuple[jax.Array, jax.Array]:
        return group_grid(jnp.where(m, x, 0.0), bits=bits, sym=sym)

    def run_block(i1: jax.Array, carry: tuple) -> tuple:
        w_all, codes, scales, zeros, s, z = carry
        w1 = lax.dynamic_slice(w_all, (i1, 0), (block, n_out))
        m1 = lax.dynamic_slice(mask, (i1, 0), (block, n_out))
        u1 = lax.dynamic_slice(u, (i1, i1), (block, block))

        def column(i: jax.Array, c: tuple) -> tuple:
            w1, c1, e1, scales, zeros, s, z = c
            if groups_inside:

                def fresh(args: tuple) -> tuple:
                    scales, zeros, _, _ = args
                    s, z = grid_of(
                        lax.dynamic_slice(w1, (i, 0), (g, n_out)), lax.dynamic_slice(m1, (i, 0), (g, n_out))
                    )
                    grp = (i1 + i) // g
                    return scales.at[grp].set(s), zeros.at[grp].set(z), s, z

                scales, zeros, s, z = lax.cond(i % g == 0, fresh, lambda a: a, (scales, zeros, s, z))
            row, keep = w1[i], m1[i]
            code = jnp.where(keep, quantize_codes(row, s, z, bits), z)
            err = (row - dequantize_codes(code, s, z)) / u1[i, i]
            w1 = w1 - u1[i][:, None] * err[None, :]  # u1[i, j] = 0 for j < i: only later rows move
            return w1, c1.at[i].set(code), e1.at[i].set(err), scales, zeros, s, z

        zeros_block = jnp.zeros((block, n_out), jnp.float32)
        init = (w1, jnp.zeros((block, n_out), jnp.int32), zeros_block, scales, zeros, s, z)
        _, c1, e1, scales, zeros, s, z = lax.fori_loop(0, block, column, init)
        # Lazy batch update of every later row (rows up to this block are not read again).
        w_all = w_all - lax.dynamic_slice(u, (i1, 0), (block, n_p)).T @ e1
        codes = lax.dynamic_update_slice(codes, c1, (i1, 0))
        return w_all, codes, scales, zeros, s, z

    def run_superblock(k: jax.Array, carry: tuple) -> tuple:
        start = k * superblock
        if not groups_inside:  # one group = this superblock; its rows are all current now
            w_all, codes, scales, zeros, _, _ = carry
            s, z = grid_of(
                lax.dynamic_slice(w_all, (start, 0), (g, n_out)),
                lax.dynamic_slice(mask, (start, 0), (g, n_out)),
            )
            carry = (w_all, codes, scales.at[k].set(s), zeros.at[k].set(z), s, z)
        return lax.fori_loop(0, superblock // block, lambda b, c: run_block(start + b * block, c), carry)

    init = (
        w,
        jnp.zeros((n_p, n_out), jnp.int32),
        jnp.ones((g_pad, n_out), jnp.float32),
        jnp.zeros((g_pad, n_out), jnp.int32),
        jnp.ones((n_out,), jnp.float32),
        jnp.zeros((n_out,), jnp.int32),
    )
    _, codes, scales, zeros, _, _ = lax.fori_loop(0, n_p // superblock, run_superblock, init)
    codes, scales, zeros = codes[:n_in], scales[:n_groups], zeros[:n_groups]
    g_idx = (jnp.arange(n_in) // g).astype(jnp.int32)
    if act_order:
        inv = jnp.argsort(perm)
        codes, g_idx = codes[inv], g_idx[inv]
    qw = QuantizedWeight(
        codes=codes.astype(jnp.uint8),
        scales=scales,
        zeros=zeros,
        g_idx=g_idx,
        bits=bits,
        group_size=group_size,
        sym=sym,
    )
    return qw, ok
