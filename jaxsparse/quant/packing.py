"""The GPTQ tensor layout: integer codes packed into int32 words, as AutoGPTQ / gptqmodel /
transformers (optimum) store them. NumPy only (this is file I/O, not a jitted path).

Per quantized linear with ``in`` inputs, ``out`` outputs, ``G`` groups and ``k = 32 // bits`` codes
per word:

==========  ===================  ==========================================================
tensor      shape, dtype         content
==========  ===================  ==========================================================
qweight     (in // k, out) i32   word ``[r, o]`` holds the codes of input rows ``r*k .. r*k+k-1``
                                 of output ``o``; row ``r*k + j`` in bits ``[j*bits, (j+1)*bits)``
                                 (the first row in the lowest bits)
qzeros      (G, out // k) i32    word ``[g, c]`` holds the zero points of outputs ``c*k ..``,
                                 output ``c*k + j`` in bits ``[j*bits, (j+1)*bits)``; the classic
                                 ``"gptq"`` format stores ``zero - 1``, ``"gptq_v2"`` the zero itself
scales      (G, out) f16         the group scales
g_idx       (in,) i32            group of each input row (``i // group_size`` without act-order)
==========  ===================  ==========================================================

and ``w[o, i] = scales[g_idx[i], o] * (code[i, o] - zero[g_idx[i], o])`` (PyTorch's (out, in)).

Example (4 bits: eight codes per word, the first in the lowest nibble):
    >>> codes = np.array([[1], [2], [3], [4], [5], [6], [7], [8]])
    >>> word = pack_rows(codes, 4)
    >>> hex(int(word.view(np.uint32)[0, 0]))
    '0x87654321'
    >>> unpack_rows(word, 4).ravel().tolist()
    [1, 2, 3, 4, 5, 6, 7, 8]
"""

from __future__ import annotations

from typing import Any

import numpy as np

from jaxsparse.quant.grid import BITS, QuantizedWeight

CHECKPOINT_FORMATS = ("gptq", "gptq_v2")


def _per_word(bits: int) -> int:
    if bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got {bits}")
    return 32 // bits


def pack_rows(codes: Any, bits: int) -> np.ndarray:
    """Pack integer codes (n, m) in ``[0, 2**bits)`` along axis 0 into int32 words (n * bits / 32, m)."""
    k = _per_word(bits)
    codes = np.asarray(codes)
    n, m = codes.shape
    if n % k:
        raise ValueError(
            f"cannot pack {n} rows of {bits}-bit codes into 32-bit words: {n} is not a multiple of {k}"
        )
    if codes.size and (codes.min() < 0 or codes.max() >= 2**bits):
        raise ValueError(f"codes must lie in [0, {2**bits - 1}] to pack with {bits} bits")
    c = codes.astype(np.uint32).reshape(n // k, k, m)
    shifts = (np.arange(k, dtype=np.uint32) * bits)[None, :, None]
    words = np.bitwise_or.reduce(c << shifts, axis=1)
    return words.view(np.int32)


def unpack_rows(words: Any, bits: int) -> np.ndarray:
    """Inverse of :func:`pack_rows`: int32 words (r, m) -> int32 codes (r * 32 / bits, m)."""
    k = _per_word(bits)
    w = np.asarray(words).astype(np.int32).view(np.uint32)
    r, m = w.shape
    shifts = (np.arange(k, dtype=np.uint32) * bits)[None, :, None]
    codes = (w[:, None, :] >> shifts) & np.uint32(2**bits - 1)
    return codes.reshape(r * k, m).astype(np.int32)


def pack_cols(codes: Any, bits: int) -> np.ndarray:
    """Pack codes (n, m) along axis 1 into int32 words (n, m * bits / 32) (the ``qzeros`` layout)."""
    return np.ascontiguousarray(pack_rows(np.asarray(codes).T, bits).T)


def unpack_cols(words: Any, bits: int) -> np.ndarray:
    """Inverse of :func:`pack_cols`."""
    return np.ascontiguousarray(unpack_rows(np.asarray(words).T, bits).T)


def to_gptq_tensors(qw: QuantizedWeight, *, checkpoint_format: str = "gptq") -> dict[str, np.ndarray]:
    """``qweight``, ``qzeros``, ``scales`` (float16), ``g_idx`` of one quantized kernel.

    ``checkpoint_format="gptq"`` (classic, what transformers/optimum and AutoGPTQ read by default)
    stores ``zero - 1``; ``"gptq_v2"`` (gptqmodel's internal format) stores the zero point.

    Example:
        >>> import jax.numpy as jnp
        >>> from jaxsparse.quant.grid import rtn_quantize
        >>> t = to_gptq_tensors(rtn_quantize(jnp.ones((16, 8)), bits=4, group_size=8, sym=True))
        >>> {k: (v.shape, str(v.dtype)) for k, v in sorted(t.items())}["qzeros"], hex(int(t["qzeros"][0, 0]))
        (((2, 1), 'int32'), '0x77777777')
    """
    if checkpoint_format not in CHECKPOINT_FORMATS:
        raise ValueError(f"checkpoint_format must be one of {CHECKPOINT_FORMATS}, got {checkpoint_format!r}")
    zeros = np.asarray(qw.zeros).astype(np.int64)
    if checkpoint_format == "gptq":
        if zeros.size and zeros.min() < 1:
            raise ValueError(
                "a zero point of 0 cannot be stored in the classic 'gptq' format (it stores zero - 1)"
            )
        zeros = zeros - 1
    return {
        "qweight": pack_rows(np.asarray(qw.codes), qw.bits),
        "qzeros": pack_cols(zeros, qw.bits),
        "scales": np.asarray(qw.scales).astype(np.float16),
        "g_idx": np.asarray(qw.g_idx).astype(np.int32),
    }


def from_gptq_tensors(
    tensors: dict[str, Any],
    *,
    bits: int,
    group_size: int,
    sym: bool = True,
    checkpoint_format: str = "gptq",
    name: str = "layer",
) -> QuantizedWeight:
    """The :class:`QuantizedWeight` (NumPy leaves) stored in ``qweight``/``qzeros``/``scales``/``g_idx``
    (``g_idx`` may be absent: ``i // group_size``). ``ValueError`` names ``name`` on inconsistent shapes.

    A classic-format zero is the stored value plus one, exactly as AutoGPTQ's dequantization reads it
    (so a stored ``2**bits - 1`` reads as ``2**bits``).
    """
    if checkpoint_format not in CHECKPOINT_FORMATS:
        raise ValueError(
            f"{name}: checkpoint_format {checkpoint_format!r} is not supported; expected one of {CHECKPOINT_FORMATS}"
        )
    missing = [k for k in ("qweight", "qzeros", "scales") if tensors.get(k) is None]
    if missing:
        raise ValueError(f"{name}: GPTQ tensors {missing} are missing")
    codes = unpack_rows(tensors["qweight"], bits)
    n_in, n_out = codes.shape
    scales = np.asarray(tensors["scales"]).astype(np.float32)
    zeros = unpack_cols(tensors["qzeros"], bits)
    if checkpoint_format == "gptq":
        zeros = zeros + 1
    g = n_in if group_size == -1 else group_size
    if "g_idx" in tensors and tensors["g_idx"] is not None:
        g_idx = np.asarray(tensors["g_idx"]).astype(np.int32)
    else:
        g_idx = (np.arange(n_in) // g).astype(np.int32)
    problems = []
    if scales.ndim != 2 or scales.shape[1] != n_out:
        problems.append(f"scales {scales.shape} vs qweight's {n_out} outputs")
    if zeros.shape != scales.shape:
        problems.append(f"qzeros unpack to {zeros.shape}, scales are {scales.shape}")
    if g_idx.shape != (n_in,):
        problems.append(f"g_idx {g_idx.shape} vs qweight's {n_in} inputs")
    elif g_idx.size and (g_idx.min() < 0 or g_idx.max() >= scales.shape[0]):
        problems.append(f"g_idx values outside [0, {scales.shape[0]})")
    if problems:
        raise ValueError(f"{name}: inconsistent GPTQ tensors ({bits} bits): " + "; ".join(problems))
    return QuantizedWeight(
        codes=codes, scales=scales, zeros=zeros, g_idx=g_idx, bits=bits, group_size=group_size, sym=sym
    )


def dequantize_numpy(qw: QuantizedWeight) -> np.ndarray:
    """float32 (in, out) kernel of ``qw`` computed in NumPy (no device transfer)."""
    g = np.asarray(qw.g_idx)
    return np.asarray(qw.scales)[g] * (
        np.asarray(qw.codes).astype(np.int32) - np.asarray(qw.zeros)[g]
    ).astype(np.float32)
