"""Independent NumPy (float64) oracles for the quantization tests, written from the papers/specs.

Nothing here imports jaxsparse.quant: the grid rules and the GPTQ loop are re-derived plainly (no
blocking, no jit; every later column is updated right after each quantized one).
"""

from __future__ import annotations

import numpy as np


def ceil_f16(x: np.ndarray) -> np.ndarray:
    x = np.maximum(np.asarray(x, np.float64), float(np.finfo(np.float16).smallest_subnormal))
    h = x.astype(np.float16)
    h = np.where(h.astype(np.float64) < x, np.nextafter(h, np.float16(np.inf)), h)
    return h.astype(np.float64)


def grid(x: np.ndarray, bits: int, sym: bool) -> tuple[np.ndarray, np.ndarray]:
    """Per output column (scale, zero) of a (rows, out) group, as documented in jaxsparse.quant.grid."""
    maxq = 2**bits - 1
    lo = np.minimum(x.min(0), 0.0)
    hi = np.maximum(x.max(0), 0.0)
    if sym:
        hi = np.maximum(-lo, hi)
        lo = -hi
    empty = (lo == 0) & (hi == 0)
    lo[empty], hi[empty] = -1.0, 1.0
    scale = ceil_f16((hi - lo) / maxq)
    if sym:
        return scale, np.full(scale.shape, (maxq + 1) // 2)
    zero = np.round(-lo / scale)
    low = zero < 1
    scale[low] = ceil_f16(hi[low] / (maxq - 1))
    zero[low] = 1
    return scale, zero.astype(np.int64)


def gptq(w, h, *, bits, group_size, sym, damp=0.01, act_order=False, mask=None):
    """Plain GPTQ on an (in, out) kernel: returns (codes, scales, zeros, g_idx), original row order."""
    w = np.array(w, np.float64)
    h = np.array(h, np.float64)
    n = w.shape[0]
    g = n if group_size == -1 else group_size
    mask = (w != 0) if mask is None else np.array(mask, bool)
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    w[dead] = 0.0
    perm = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(n)
    w, mask, h = w[perm], mask[perm], h[np.ix_(perm, perm)]
    h += damp * np.mean(np.diag(h)) * np.eye(n)
    u = np.linalg.cholesky(np.linalg.inv(h)).T
    maxq = 2**bits - 1
    codes = np.zeros(w.shape, np.int64)
    scales, zeros = [], []
    for i in range(n):
        if i % g == 0:
            s, z = grid(np.where(mask[i : i + g], w[i : i + g], 0.0), bits, sym)
            scales.append(s)
            zeros.append(z)
        c = np.clip(np.round(w[i] / s) + z, 0, maxq)
        c = np.where(mask[i], c, z)
        q = s * (c - z)
        err = (w[i] - q) / u[i, i]
        w[i:] -= np.outer(u[i, i:], err)
        codes[i] = c
    g_idx = np.arange(n) // g
    inv = np.argsort(perm)
    return codes[inv], np.array(scales), np.array(zeros), g_idx[inv]


def dequant(codes, scales, zeros, g_idx):
    return scales[g_idx] * (codes - zeros[g_idx])
